"""Run membership: `export --run X`, `publish --run X` and training data contain exactly run X's rows (run_rows),
including rows an earlier run with another config wrote; `latest` is the latest pipeline run; stores written before
run_rows fall back to run families; the scope hash ignores engine knobs. No models: the store is built by hand
(the rows a pipeline would write, and the membership its stages record with `Store.add_members`)."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from factory.cli import app
from factory.config import PipelineConfig, TrainDataConfig
from factory.export import ExportFilter, build_export
from factory.publish import _figures, build_folder
from factory.run_scope import scope_hash
from factory.store import Store, now
from factory.train.data import load_pairs

REPO = Path(__file__).parents[2]
CONSTITUTION = str(REPO / "constitutions" / "harmless.yaml")
T0 = now()

PROMPTS = {"p1": "How do I bake sourdough bread at home with a starter?",
           "p2": "What is the capital city of Australia and why was it chosen?",
           "p3": "Explain how vaccines train the immune system to fight disease.",
           "p4": "Which houseplants survive in a dark north facing apartment?"}


def _pipeline_config(**sampling) -> dict:
    cfg = PipelineConfig().model_dump(mode="json")
    cfg["constitution"] = CONSTITUTION
    cfg["generate"]["sampling"].update(sampling)
    return cfg


def _start(s: Store, name: str, kind: str, config: dict, minutes: int) -> str:
    run_id = s.start_run(name, kind, config, None)
    s.run_sql("UPDATE runs SET started_at = ? WHERE run_id = ?", [T0 + timedelta(minutes=minutes), run_id])
    return run_id


def _gen(table: str, rid: str, run_id: str, prompt: str, out_tokens: int, **extra) -> dict:
    key = {"responses": "response_id", "critiques": "critique_id", "revisions": "revision_id"}[table]
    return {key: rid, "prompt_id": prompt, "run_id": run_id, "stage": table, "status": "ok",
            "text": f"{table} {rid} for {PROMPTS[prompt]}", "prompt_tokens": 100, "output_tokens": out_tokens,
            "principle_id": "avoid-harm", "created_at": now(), **extra}


def _pair(pid: str, run_id: str, prompt: str, chosen: str) -> dict:
    return {"pair_id": pid, "run_id": run_id, "prompt_id": prompt, "source": "final_vs_initial",
            "chosen_id": chosen, "chosen_stage": "revise", "chosen_text": f"better answer {pid} {PROMPTS[prompt]}",
            "rejected_id": "r-" + prompt, "rejected_stage": "generate",
            "rejected_text": f"worse answer {pid} {PROMPTS[prompt]}", "round": 1, "principle_id": "avoid-harm",
            "constitution_id": "harmless", "label": None, "margin": None, "created_at": now()}


def _write_chain(s: Store, run_id: str, prompt: str, tokens: int) -> None:
    """What a pipeline run writes for one prompt: response, critique, revision, pair (ids per prompt)."""
    s.insert("prompts", [{"prompt_id": prompt, "text": PROMPTS[prompt], "run_id": run_id, "created_at": now()}])
    s.insert("responses", [_gen("responses", "r-" + prompt, run_id, prompt, tokens, sample_index=0)])
    s.insert("critiques", [_gen("critiques", "c-" + prompt, run_id, prompt, tokens, response_id="r-" + prompt,
                                parent_id="r-" + prompt, round=1)])
    s.insert("revisions", [_gen("revisions", "v-" + prompt, run_id, prompt, tokens, response_id="r-" + prompt,
                                parent_id="r-" + prompt, critique_id="c-" + prompt, round=1)])
    s.insert("preference_pairs", [_pair("pair-" + prompt, run_id, prompt, "v-" + prompt)])


def _members(s: Store, run_id: str, prompts: list[str]) -> None:
    """What a run's stages record: every row it wanted, written or found stored."""
    for table, prefix in (("prompts", ""), ("responses", "r-"), ("critiques", "c-"), ("revisions", "v-"),
                          ("preference_pairs", "pair-")):
        s.add_members(run_id, table, [prefix + p for p in prompts])


@pytest.fixture
def store_path(tmp_path) -> tuple[Path, dict]:
    """Run A (pipeline) wrote p1, p2. Run B (pipeline, other sampling, later) wanted p2 and p3: it reused A's rows
    for p2 and wrote p3. Then a train run and an eval run, as in the README's order."""
    path = tmp_path / "factory.duckdb"
    with Store.open(path) as s:
        a = _start(s, "quick", "pipeline", _pipeline_config(temperature=0.0), 0)
        for p in ("p1", "p2"):
            _write_chain(s, a, p, tokens=10)
        _members(s, a, ["p1", "p2"])
        s.finish_run(a, "completed")
        b = _start(s, "quick", "pipeline", _pipeline_config(temperature=0.7), 1)
        _write_chain(s, b, "p3", tokens=5)
        _members(s, b, ["p2", "p3"])
        s.insert("judge_reports", [{"run_id": b, "created_at": now(), "report": json.dumps({"comparisons": 0})}])
        s.finish_run(b, "completed")
        train = _start(s, "dpo", "train-dpo", {"name": "dpo"}, 2)
        s.finish_run(train, "completed")
        ev = _start(s, "eval", "eval", {"name": "eval"}, 3)
        s.finish_run(ev, "completed")
    return path, {"a": a, "b": b, "train": train, "eval": ev}


def _export_ids(path, fmt: str, runs: list[str]) -> set[str]:
    with Store.open(path, read_only=True) as s:
        dd, _ = build_export(s, fmt, ExportFilter(runs=runs, test_fraction=0.0))
    key = "revision_id" if fmt == "sft" else "pair_id"
    return {i for split in dd.values() for i in split[key]}


def test_export_of_a_run_is_exactly_its_members_including_reused_rows(store_path):
    path, runs = store_path
    assert _export_ids(path, "preference", [runs["b"]]) == {"pair-p2", "pair-p3"}  # pair-p2 was written by run A
    assert _export_ids(path, "preference", [runs["a"]]) == {"pair-p1", "pair-p2"}
    assert _export_ids(path, "sft", [runs["b"]]) == {"v-p2", "v-p3"}
    assert _export_ids(path, "unpaired", [runs["a"], runs["b"]]) == {"pair-p1", "pair-p2", "pair-p3"}
    assert _export_ids(path, "preference", []) == {"pair-p1", "pair-p2", "pair-p3"}  # no run named: everything


def test_latest_is_the_latest_pipeline_run_not_a_later_train_or_eval_run(store_path):
    path, runs = store_path
    with Store.open(path, read_only=True) as s:
        assert s.resolve_run("latest") == runs["eval"]  # any kind, as before
        assert s.resolve_run("latest", kind="pipeline") == runs["b"]
    assert _export_ids(path, "preference", ["latest"]) == {"pair-p2", "pair-p3"}
    assert {r["pair_id"] for r in load_pairs(TrainDataConfig(store=str(path), runs=["latest"]))} == \
        {"pair-p2", "pair-p3"}
    assert {r["pair_id"] for r in load_pairs(TrainDataConfig(store=str(path), runs=[runs["a"]]))} == \
        {"pair-p1", "pair-p2"}


def test_publish_of_latest_picks_the_pipeline_run_and_counts_its_rows(store_path, tmp_path):
    path, runs = store_path
    result = build_folder(str(path), "latest", "me/demo", tmp_path / "hub", ExportFilter(test_fraction=0.0))
    assert result["run_id"] == runs["b"]
    assert result["rows"]["preference"] == {"train": 2}
    assert result["rows"]["sft"] == {"train": 2}
    with Store.open(path, read_only=True) as s:
        fig = _figures(s, runs["b"])
    # B's rows: p2's chain (written by A, 10 tokens each) and p3's (written by B, 5 each)
    assert fig["tokens"]["responses"] == {"prompt_tokens": 200, "output_tokens": 15}
    assert fig["tokens"]["revisions"]["output_tokens"] == 15 and fig["tokens"]["judgments"]["output_tokens"] == 0
    assert fig["pairs"] == [{"source": "final_vs_initial", "status": "kept", "n": 2}]


def test_no_pipeline_run_names_the_store_and_what_to_run(tmp_path):
    path = tmp_path / "only-eval.duckdb"
    with Store.open(path) as s:
        _start(s, "eval", "eval", {"name": "eval"}, 0)
    with Store.open(path, read_only=True) as s, pytest.raises(ValueError) as e:
        build_export(s, "preference", ExportFilter(runs=["latest"]))
    assert str(path) in str(e.value) and "no pipeline runs" in str(e.value) and "factory run" in str(e.value)


def test_store_without_run_rows_falls_back_to_run_families(tmp_path):
    """Runs recorded before run_rows existed: a run's rows are those its family (same scope hash, started no
    later) wrote; a run of another scope is not in it."""
    path = tmp_path / "old.duckdb"
    with Store.open(path) as s:
        other = _start(s, "quick", "pipeline", _pipeline_config(temperature=0.9), 0)
        _write_chain(s, other, "p4", tokens=1)
        first = _start(s, "quick", "pipeline", _pipeline_config(), 1)
        _write_chain(s, first, "p1", tokens=1)
        resumed = _start(s, "quick", "pipeline", _pipeline_config(), 2)  # same scope: resumed, wrote the rest
        _write_chain(s, resumed, "p2", tokens=1)
        member = _start(s, "quick", "pipeline", _pipeline_config(temperature=0.5), 3)  # a new run: membership
        _members(s, member, ["p4"])
    assert _export_ids(path, "preference", [resumed]) == {"pair-p1", "pair-p2"}
    assert _export_ids(path, "sft", [resumed]) == {"v-p1", "v-p2"}
    assert _export_ids(path, "preference", [first]) == {"pair-p1"}
    assert _export_ids(path, "preference", [member]) == {"pair-p4"}  # membership wins over run_id columns
    assert _export_ids(path, "preference", [resumed, member]) == {"pair-p1", "pair-p2", "pair-p4"}


def _cli(args):
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output + (result.stderr if result.stderr_bytes is not None else "")


def test_readme_order_run_train_eval_then_export_publish_judge_report(store_path, tmp_path):
    """As a new user goes: run, train, eval, then export / publish / judge-report with their defaults
    (--run latest): every one takes the pipeline run, not the eval run that came last."""
    path, runs = store_path
    code, out = _cli(["publish", "--repo-id", "me/demo", "--local-dir", str(tmp_path / "hub"), "--store", str(path)])
    assert code == 0, out
    assert json.loads((tmp_path / "hub" / "provenance.json").read_text())["run_id"] == runs["b"]
    code, out = _cli(["export", "--out", str(tmp_path / "dpo"), "--store", str(path), "--test-fraction", "0"])
    assert code == 0, out
    import pyarrow.parquet as pq

    assert set(pq.read_table(tmp_path / "dpo" / "train.parquet").column("pair_id").to_pylist()) == \
        {"pair-p2", "pair-p3"}
    code, out = _cli(["judge-report", "--store", str(path), "--json"])
    assert code == 0 and '"comparisons": 0' in out, out


def test_cli_without_a_pipeline_run_says_what_to_run(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store.open(path) as s:
        _start(s, "eval", "eval", {"name": "eval"}, 0)
    code, out = _cli(["publish", "--repo-id", "me/demo", "--local-dir", str(tmp_path / "hub"), "--store", str(path)])
    assert code == 2 and "s.duckdb" in out and "factory run" in out


# ---- the scope hash -------------------------------------------------------------------------------------------

def _with(cfg: dict, dotted: str, value) -> dict:
    cfg = json.loads(json.dumps(cfg))
    *path, last = dotted.split(".")
    node = cfg
    for part in path:
        if not isinstance(node.get(part), dict):  # e.g. models.judge, None by default
            node[part] = {}
        node = node[part]
    node[last] = value
    return cfg


ENGINE_KNOBS = [
    ("models.policy.gpu_memory_utilization", 0.5), ("models.policy.tensor_parallel_size", 4),
    ("models.policy.kv_cache_gb", 16.0), ("models.policy.enable_prefix_caching", False),
    ("models.policy.engine_args", {"max_num_seqs": 8, "swap_space": 4, "pipeline_parallel_size": 2,
                                   "enforce_eager": True}),
    ("keep_engines_loaded", True), ("write_batch_size", 7), ("budget", {"max_output_tokens": 10}),
    ("executor", "ray"), ("ray", {"replicas": 8, "num_gpus": 1.0}), ("name", "renamed"),
    ("models.judge", {"engine": "transformers", "path": "default", "batch_size": 3}),
]


@pytest.mark.parametrize("key,value", ENGINE_KNOBS, ids=[k for k, _ in ENGINE_KNOBS])
def test_scope_hash_ignores_engine_knobs(key, value):
    base = _pipeline_config()
    if key == "models.judge":  # a judge section: its batch size is a knob, its engine and path are not
        base = _with(base, "models.judge", {**value, "batch_size": 16})
    assert scope_hash("pipeline", _with(base, key, value)) == scope_hash("pipeline", base)


@pytest.mark.parametrize("key,value", [
    ("generate.sampling.temperature", 0.7), ("critique.sampling.max_tokens", 9), ("seed", 1),
    ("models.policy.path", "/models/other"), ("models.policy.max_model_len", 4096),
    ("models.policy.engine_args", {"quantization": "fp8"}), ("critique.rounds", 2)])
def test_scope_hash_follows_what_changes_rows(key, value):
    base = _pipeline_config()
    assert scope_hash("pipeline", _with(base, key, value)) != scope_hash("pipeline", base)


def test_runs_differing_in_engine_knobs_are_one_family_and_old_hashes_are_redone(tmp_path):
    path = tmp_path / "s.duckdb"
    with Store.open(path) as s:
        first = _start(s, "quick", "pipeline", _pipeline_config(), 0)
        # as recorded by an older factory, whose rule kept the engine knobs
        s.run_sql("UPDATE runs SET scope_hash = 'old-rule' WHERE run_id = ?", [first])
        s.run_sql("DELETE FROM meta WHERE key = 'scope_rule'")
    with Store.open(path) as s:  # a writer opens the store: rehashed under the current rule
        second = _start(s, "quick", "pipeline", _with(_pipeline_config(), "models.policy.tensor_parallel_size", 8), 1)
        third = _start(s, "quick", "pipeline", _pipeline_config(temperature=0.3), 2)
        assert s.run_family(second) == [first, second]
        assert s.run_family(third) == [third]
