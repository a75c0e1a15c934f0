"""Judge calibration and the label gate on the tiny model, with real engines and a real store: the gate calibrates
the judge once (stored per judge fingerprint, settings and gold file), a failing enforced gate marks the run's AI
pairs 'judge_failed_gate' and export leaves them out, `enforce: false` keeps them without calibrating again; and
`run_calibration` (what `factory judge calibrate` calls) stores a calibration with self-preference and a plot, shown
by `factory judge-report`."""

import os
import subprocess
from pathlib import Path

import pytest

from conftest import ROOT, factory_cmd, tiny_pipeline_cfg
from factory.calibration import load_gold
from factory.constitution import load_constitution
from factory.export import ExportFilter, build_export
from factory.pipeline import run_pipeline
from factory.store import Store

pytestmark = pytest.mark.integration


@pytest.fixture
def gold6(tmp_path) -> Path:
    path = tmp_path / "gold.jsonl"
    path.write_text("".join((ROOT / "data" / "judge_gold.jsonl").read_text().splitlines(True)[:6]))
    return path


def _ai_pairs(s: Store, run_id: str) -> list[dict]:
    return s.query("""SELECT * FROM preference_pairs p SEMI JOIN (SELECT id FROM run_rows WHERE run_id = ?
                      AND tbl = 'preference_pairs') m ON m.id = p.pair_id WHERE p.source = 'ai_feedback'""", [run_id])


def _exported_ai(store: str, run_id: str) -> int:
    with Store.open(store, read_only=True) as s:
        try:
            dd, _ = build_export(s, "preference", ExportFilter(runs=[run_id], sources=["ai_feedback"]))
        except ValueError as e:  # no row to export
            assert "nothing to export" in str(e)
            return 0
    return sum(len(split) for split in dd.values())


def test_failing_gate_marks_ai_pairs_and_enforce_false_keeps_them(tmp_path, tiny_model_dir, engines, gold6):
    gate = {"gold": str(gold6), "max_order_disagreement": 0.0}  # any disagreement between the orders fails
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "vllm",
                            label={"enabled": True, "tie_threshold": 0.0, "gate": gate})
    first = run_pipeline(cfg, engines=engines)
    with Store.open(cfg.store, read_only=True) as s:
        cals = s.query("SELECT * FROM judge_calibrations")
        judges = {r["model_id"] for r in s.query("SELECT DISTINCT model_id FROM comparisons")}
        pairs = _ai_pairs(s, first.run_id)
        judged = s.query("SELECT count(*) AS n FROM judgments")[0]["n"]
    assert len(cals) == 1 and {cals[0]["model_id"]} == judges  # stored under the judge comparisons name
    rep = first.calibration["report"]
    assert rep["n_gold"] == 6 and rep["n"] + rep["not_judged"] == 6
    assert sum(k["n"] for k in rep["per_kind"].values()) == rep["n"]
    names = {p.id for p in load_constitution(cfg.constitution).principles}
    assert rep["principles"]["pinned"] == sum(g["principle"] in names for g in load_gold(gold6))
    assert Path(rep["plot"]).is_file()
    failed = rep["mean_order_disagreement"] > 0.0
    assert first.gate["failed"] is failed and failed  # the tiny random judge's orders disagree
    assert judged > 0  # the failing judge still judged
    would_keep = [p for p in pairs if p["dropped_reason"] in (None, "judge_failed_gate")]
    assert would_keep and all(p["dropped_reason"] == "judge_failed_gate" for p in would_keep)
    assert all(p["label"] is not None for p in would_keep)  # labels stored all the same
    assert first.judge_report["pairs"].get("judge_failed_gate") == len(would_keep)
    assert f"its {len(would_keep)} AI pairs are excluded" in first.gate["line"]
    assert _exported_ai(cfg.store, first.run_id) == 0

    # the same gate, not enforced: the label stage runs again (its definition changed), the stored calibration is
    # used (no second one), and the pairs are kept and exported
    cfg2 = cfg.model_copy(deep=True)
    cfg2.label.gate.enforce = False
    second = run_pipeline(cfg2, engines=engines)
    with Store.open(cfg.store, read_only=True) as s:
        assert s.query("SELECT count(*) AS n FROM judge_calibrations")[0]["n"] == 1
        pairs2 = _ai_pairs(s, second.run_id)
    kept = [p for p in pairs2 if p["dropped_reason"] is None]
    # the kept pairs are rows of their own: the marked rows of the first run stay as they were
    assert len(kept) == len(would_keep) and not {p["pair_id"] for p in kept} & {p["pair_id"] for p in would_keep}
    assert second.gate["failed"] and "kept because label.gate.enforce is false" in second.gate["line"]
    assert 0 < _exported_ai(cfg.store, second.run_id) <= len(kept)

    # enforced again: the label stage is adopted from the first run (same definition and inputs), whose rows are
    # still marked, so the pairs are excluded again without judging anything
    third = run_pipeline(cfg, engines=engines)
    assert not any(k.startswith("label|") for k in third.stats)  # no judge call
    with Store.open(cfg.store, read_only=True) as s:
        pairs3 = _ai_pairs(s, third.run_id)
    assert {p["pair_id"] for p in pairs3} == {p["pair_id"] for p in pairs}
    assert _exported_ai(cfg.store, third.run_id) == 0 and third.gate["failed"]

def test_run_calibration_stores_figures_self_preference_and_plot(tmp_path, tiny_model_dir, gold6):
    from factory.calibrate import run_calibration

    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "transformers", label={"enabled": True})
    cal = run_calibration(cfg, str(gold6), None, str(tmp_path / "plots"), None)
    rep = cal["report"]
    assert rep["n"] + rep["not_judged"] == 6
    # the judge is the policy: self-preference is measured over the gold prompts it answered usably
    assert rep["self_preference_n"] + rep["self_preference_unusable"] == 6
    assert rep["self_preference_n"] == 0 or 0.0 <= rep["self_preference"] <= 1.0
    assert Path(rep["plot"]).parent == tmp_path / "plots" and Path(rep["plot"]).is_file()
    with Store.open(cfg.store, read_only=True) as s:
        rows = s.query("SELECT * FROM judge_calibrations")
    assert [r["calibration_id"] for r in rows] == [cal["calibration_id"]]
    assert rows[0]["gold_sha256"] == cal["gold_sha256"] and rows[0]["model_id"] == str(tiny_model_dir)
    # judge-report shows it once the store has a pipeline run with this judge's comparisons
    run_pipeline(cfg, engines=None)
    r = subprocess.run(factory_cmd("judge-report", "--store", cfg.store), capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, "COLUMNS": "250"})
    assert r.returncode == 0, r.stderr
    assert "judge calibration" in r.stdout and "Cohen's kappa" in r.stdout
