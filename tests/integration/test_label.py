"""The AI-feedback label stage on the tiny model through both engines: valid stored probabilities, both
orders stored, engines agree, chain-of-thought clamping, rubric retries, and the judge report."""

import shutil

import pytest

from conftest import tiny_model_cfg, tiny_pipeline_cfg
from factory.pipeline import run_pipeline
from factory.report import load_report
from factory.store import Store

pytestmark = pytest.mark.integration


def _label_cfg(tmp_path, model_dir, engine="vllm", **label):
    return tiny_pipeline_cfg(tmp_path, model_dir, engine, label={"enabled": True, "principles_per_comparison": 2,
                                                                 "sampling": {"max_tokens": 12}, **label})


def test_logprob_labels_are_valid_and_both_orders_stored(tmp_path, tiny_model_dir, engines):
    cfg = _label_cfg(tmp_path, tiny_model_dir)
    result = run_pipeline(cfg, engines=engines)
    assert result.status == "completed"
    with Store.open(cfg.store, read_only=True) as s:
        judgments = s.query("SELECT * FROM judgments")
        comparisons = s.query("SELECT * FROM comparisons")
        revisions_ok = s.query("SELECT count(*) AS n FROM revisions WHERE status = 'ok'")[0]["n"]
        assert judgments and all(j["status"] == "ok" for j in judgments)
        for j in judgments:
            assert 0.0 <= j["p_a"] <= 1.0 and j["logprob_a"] <= 0.0 and j["logprob_b"] <= 0.0
            expected = j["p_a"] if j["answer_order"] == "xy" else 1 - j["p_a"]
            assert j["p_x"] == pytest.approx(expected)
        by_comparison = {}
        for j in judgments:
            by_comparison.setdefault(j["comparison_id"], set()).add(j["answer_order"])
        assert all(orders == {"xy", "yx"} for orders in by_comparison.values())
        assert len(comparisons) == len(by_comparison)
        for c in comparisons:
            assert c["p_x"] == pytest.approx((c["p_x_xy"] + c["p_x_yx"]) / 2)
            assert c["disagreement"] == pytest.approx(abs(c["p_x_xy"] - c["p_x_yx"]))
        # two principles per candidate pair, each its own comparison (the ensemble's votes are kept)
        per_pair = {}
        for c in comparisons:
            per_pair.setdefault((c["candidate_x"], c["candidate_y"]), set()).add(c["principle_id"])
        assert all(len(p) == 2 for p in per_pair.values())
        pairs = s.query("SELECT * FROM preference_pairs WHERE source = 'ai_feedback'")
        assert pairs
        for p in pairs:
            if p["dropped_reason"] is None:
                assert 0.5 < p["label"] <= 1.0 and p["margin"] == pytest.approx(2 * p["label"] - 1)
            else:
                assert p["dropped_reason"] in ("tie", "identical_texts", "empty_response", "not_judged")
        assert len(pairs) <= revisions_ok
        report = load_report(s, result.run_id)
    assert report == result.judge_report
    assert report["comparisons"] == len(comparisons)
    assert 0.0 <= report["position_consistency"] <= 1.0
    assert sum(report["label_entropy_histogram"].values()) == len(comparisons)
    assert sum(report["pairs"].values()) == len(pairs)


def test_engines_agree_on_judge_probabilities(tmp_path, tiny_model_dir, engines):
    cfg = _label_cfg(tmp_path, tiny_model_dir, "vllm")
    run_pipeline(cfg, engines=engines)
    other = tmp_path / "hf.duckdb"
    shutil.copy(cfg.store, other)
    with Store.open(other) as s:  # keep the responses and revisions, judge them again with transformers
        for t in ("judgments", "comparisons", "judge_reports"):
            s.run_sql(f"DELETE FROM {t}")
        s.run_sql("DELETE FROM preference_pairs WHERE source = 'ai_feedback'")
    hf_cfg = cfg.model_copy(deep=True)
    hf_cfg.store = str(other)
    hf_cfg.models.policy = tiny_model_cfg(tiny_model_dir, "transformers")
    run_pipeline(hf_cfg, engines=engines)
    with Store.open(cfg.store, read_only=True) as a, Store.open(other, read_only=True) as b:
        q = "SELECT judgment_id, p_a, engine FROM judgments ORDER BY judgment_id"
        va, vb = a.query(q), b.query(q)
    assert [r["judgment_id"] for r in va] == [r["judgment_id"] for r in vb] and va
    assert {r["engine"] for r in va} == {"vllm"} and {r["engine"] for r in vb} == {"transformers"}
    for x, y in zip(va, vb):
        assert x["p_a"] == pytest.approx(y["p_a"], abs=2e-3)


def test_chain_of_thought_stores_reasoning_and_clamps(tmp_path, tiny_model_dir, engines):
    cfg = _label_cfg(tmp_path, tiny_model_dir, "vllm", mode="cot")
    run_pipeline(cfg, engines=engines)
    with Store.open(cfg.store, read_only=True) as s:
        judgments = s.query("SELECT * FROM judgments")
        comparisons = s.query("SELECT * FROM comparisons")
    assert judgments and all(j["raw_output"] is not None and j["output_tokens"] >= 1 for j in judgments)
    assert any(j["text"] for j in judgments)
    assert comparisons and all(0.4 <= c["p_x"] <= 0.6 for c in comparisons)
    unclamped = [(c["p_x_xy"] + c["p_x_yx"]) / 2 for c in comparisons]
    for c, raw in zip(comparisons, unclamped):
        assert c["p_x"] == pytest.approx(min(0.6, max(0.4, raw)))


def test_rubric_replies_that_do_not_parse_are_kept_and_retried(tmp_path, tiny_model_dir, engines):
    # A random model cannot follow the score format: every reply fails, is kept with a reason, and is
    # retried up to the limit; the pair is then stored as not judged.
    cfg = _label_cfg(tmp_path, tiny_model_dir, "vllm", mode="rubric", rubric_retries=1, principles_per_comparison=1)
    result = run_pipeline(cfg, engines=engines)
    with Store.open(cfg.store, read_only=True) as s:
        judgments = s.query("SELECT * FROM judgments")
        pairs = s.query("SELECT * FROM preference_pairs WHERE source = 'ai_feedback'")
    failed = [j for j in judgments if j["status"] == "failed"]
    assert failed and all(j["reason"] and j["raw_output"] is not None for j in failed)
    attempts = {}
    for j in judgments:
        attempts.setdefault((j["comparison_id"], j["answer_order"]), []).append(j["attempt"])
    for key, tries in attempts.items():
        ok = any(j["status"] == "ok" for j in judgments if (j["comparison_id"], j["answer_order"]) == key)
        assert sorted(tries) == ([0] if ok and len(tries) == 1 else sorted(tries))
        assert max(tries) <= 1
    assert any(len(t) == 2 for t in attempts.values())  # a failed first attempt was retried
    assert result.judge_report["judgments"].get("failed", 0) == len(failed)
    assert all(p["dropped_reason"] in ("not_judged", "tie", "identical_texts", "empty_response") or p["label"] > 0.5
               for p in pairs)


def test_samples_mode_compares_every_two_policy_samples(tmp_path, tiny_model_dir, engines):
    cfg = _label_cfg(tmp_path, tiny_model_dir, "vllm", compare=["samples"], principles_per_comparison=1)
    cfg.generate.samples_per_prompt = 3
    cfg.generate.sampling.temperature = 1.0
    cfg.critique.rounds = 0
    run_pipeline(cfg, engines=engines)
    with Store.open(cfg.store, read_only=True) as s:
        responses = s.query("SELECT * FROM responses WHERE status = 'ok'")
        pairs = s.query("SELECT * FROM preference_pairs WHERE source = 'ai_feedback'")
    per_prompt = {}
    for r in responses:
        per_prompt[r["prompt_id"]] = per_prompt.get(r["prompt_id"], 0) + 1
    assert len(pairs) == sum(n * (n - 1) // 2 for n in per_prompt.values())
    assert all(p["chosen_stage"] == "response" and p["rejected_stage"] == "response" for p in pairs)


def test_judge_report_command_prints_the_stored_report(tmp_path, tiny_model_dir, engines):
    from typer.testing import CliRunner

    from factory.cli import app

    cfg = _label_cfg(tmp_path, tiny_model_dir, "vllm")
    result = run_pipeline(cfg, engines=engines)
    res = CliRunner().invoke(app, ["judge-report", "--store", cfg.store, "--run", result.run_id, "--json"])
    assert res.exit_code == 0
    import json

    assert json.loads(res.output)["comparisons"] == result.judge_report["comparisons"]
    res = CliRunner().invoke(app, ["judge-report", "--store", cfg.store])
    assert res.exit_code == 0 and "position consistency" in res.output
