"""A re-run adopts a stage an earlier run finished with the same definition and inputs (factory/stages/reuse.py):
the run's rows are exactly those the full path would record, and any change to the config, the inputs (ids or
statuses) or the stored outputs makes the stage run as usual. With the instant engine (tests/instant_engine.py):
this is factory's own orchestration."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from instant_engine import InstantEngines
from factory.pipeline import run_pipeline
from factory.store import TABLES, Store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.scale import pipeline_config, synthetic_prompts, write_prompts  # noqa: E402

pytestmark = pytest.mark.integration
N = 60
STAGES = ["generate", "critique round=1", "revise round=1", "pairs", "label"]


def _members(path, run_id) -> dict[str, set[str]]:
    with Store.open(path, read_only=True) as s:
        return {t: {r[0] for r in s.run_sql("SELECT id FROM run_rows WHERE run_id = ? AND tbl = ?", [run_id, t])}
                for t in TABLES}


def _run(cfg):
    logs: list[str] = []
    engines = InstantEngines()
    result = run_pipeline(cfg, engines=engines, log=logs.append)
    assert result.status == "completed", result.message
    adopted = [m.split(":")[0] for m in logs if "finished by run" in m]
    return result, engines, adopted


def _rounded(value):
    """Floats to 9 places: SQL averages may sum in another order from one run to the next."""
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return round(value, 9) if isinstance(value, float) else value


def _forget_stage_runs(path) -> None:
    with Store.open(path) as s:
        s.run_sql("DELETE FROM stage_runs")


@pytest.fixture
def first(tmp_path):
    cfg = pipeline_config(tmp_path / "s.duckdb", write_prompts(tmp_path / "p.jsonl", N))
    result, _, adopted = _run(cfg)
    assert adopted == []
    return cfg, result


def test_a_rerun_adopts_every_stage_with_exactly_the_rows_the_full_path_records(first):
    cfg, run1 = first
    run2, engines, adopted = _run(cfg)
    assert adopted == STAGES
    assert engines.gets == 0 and engines.model_calls == 0
    # The full path (no records): the same membership, table by table, as the adopted run.
    _forget_stage_runs(cfg.store)
    run3, _, adopted3 = _run(cfg)
    assert adopted3 == []
    m1, m2, m3 = (_members(cfg.store, r.run_id) for r in (run1, run2, run3))
    assert m2 == m3 == m1 and all(m1[t] for t in TABLES)
    assert run2.pair_counts == run3.pair_counts == run1.pair_counts
    assert _rounded(run2.judge_report) == _rounded(run3.judge_report) == _rounded(run1.judge_report)
    assert run2.scope_counts == run1.scope_counts


def test_a_changed_config_is_not_adopted(first):
    cfg, run1 = first
    cfg.label.principles_per_comparison = 1
    run2, engines, adopted = _run(cfg)
    assert adopted == []  # the definition hashes the whole run scope
    m1, m2 = _members(cfg.store, run1.run_id), _members(cfg.store, run2.run_id)
    assert m2["responses"] == m1["responses"] and m2["revisions"] == m1["revisions"]
    assert len(m2["comparisons"]) == len(m1["comparisons"]) // 2


def test_new_prompts_and_changed_statuses_are_not_adopted(first):
    cfg, run1 = first
    # More prompts: generate's inputs differ; only the new prompts reach the engine.
    with open(cfg.prompts.path, "a") as f:
        for rec in list(synthetic_prompts(N + 5))[N:]:
            f.write(json.dumps(rec) + "\n")
    run2, engines, adopted = _run(cfg)
    assert adopted == []
    assert engines.calls["generate_stream"] == 3 and engines.prompts_handled == 5 * 3 + 5 * 4
    # A response whose status changed (same id): critique's inputs differ, while generate's do not.
    rid = sorted(_members(cfg.store, run2.run_id)["responses"])[0]
    with Store.open(cfg.store) as s:
        s.run_sql("UPDATE responses SET status = 'failed' WHERE response_id = ?", [rid])
    run3, engines, adopted = _run(cfg)
    assert adopted == ["generate"]
    with Store.open(cfg.store, read_only=True) as s:
        (critiqued,), = s.run_sql("""SELECT count(*) FROM critiques c SEMI JOIN (SELECT id FROM run_rows
                                     WHERE run_id = ? AND tbl = 'critiques') m ON m.id = c.critique_id""",
                                  [run3.run_id])
    assert critiqued == N + 5 - 1  # the failed response is no longer critiqued in this run


def test_rows_removed_since_are_not_adopted_and_come_back(first):
    cfg, run1 = first
    with Store.open(cfg.store) as s:
        n = s.count("judgments")
        s.run_sql("DELETE FROM judgments WHERE judgment_id IN (SELECT judgment_id FROM judgments ORDER BY 1 LIMIT 3)")
    run2, engines, adopted = _run(cfg)
    assert adopted == STAGES[:-1]  # label's record is not used: rows it wanted are gone
    assert engines.calls["score_next_token"] == 1 and engines.prompts_handled == 3
    with Store.open(cfg.store, read_only=True) as s:
        assert s.count("judgments") == n
    assert _members(cfg.store, run2.run_id) == _members(cfg.store, run1.run_id)
