"""The whole pipeline on the tiny model with a real DuckDB file: every table filled with lineage,
re-runs make no model calls, long prompts are skipped and recorded, and the token budget resumes."""

import json

import pytest

from conftest import PROMPTS, tiny_model_cfg, tiny_pipeline_cfg, write_prompts
from factory.pipeline import run_pipeline
from factory.store import TABLES, Store

pytestmark = pytest.mark.integration


class NoEngines:
    """Stands in for Engines where a test asserts that no engine is ever started."""

    def getter(self, cfg):
        def get():
            raise AssertionError("a model engine was requested, but every row should already be stored")
        return get


def counts(path):
    with Store.open(path, read_only=True) as s:
        return {t: s.count(t) for t in TABLES}


@pytest.mark.parametrize("engine", ["vllm", "transformers"])
def test_pipeline_fills_every_table_with_lineage(tmp_path, tiny_model_dir, engines, engine):
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, engine, critique__rounds=2, pairs__include_intermediate=True)
    result = run_pipeline(cfg, engines=engines)
    assert result.status == "completed"
    with Store.open(cfg.store, read_only=True) as s:
        assert s.count("prompts") == len(PROMPTS)
        responses = s.query("SELECT * FROM responses")
        assert len(responses) == len(PROMPTS)
        for r in responses:
            assert r["run_id"] == result.run_id and r["engine"] == engine and r["stage"] == "generate"
            assert r["model_id"] == str(tiny_model_dir) and r["template_hash"] and json.loads(r["sampling"])
            assert r["raw_output"] is not None and r["prompt_tokens"] > 0 and r["created_at"] is not None
        crit = s.query("SELECT * FROM critiques")
        principles = {p["id"] for p in __import__("yaml").safe_load(open(cfg.constitution))["principles"]}
        assert crit and all(c["principle_id"] in principles and c["constitution_id"] == "harmless" for c in crit)
        assert {c["round"] for c in crit} <= {1, 2}
        revs = s.query("SELECT * FROM revisions")
        assert {r["critique_id"] for r in revs} <= {c["critique_id"] for c in crit}
        ok_crit = [c for c in crit if c["status"] == "ok"]
        assert len(revs) == len(ok_crit)
        pairs = s.query("SELECT * FROM preference_pairs")
        final = [r for r in revs if r["round"] == 2 and r["status"] == "ok"]
        assert len([p for p in pairs if p["source"] == "final_vs_initial"]) == len(final)
        for p in pairs:
            assert p["chosen_stage"] == "revision"
            assert p["dropped_reason"] in (None, "empty_response", "identical_texts")


def test_rerun_makes_no_model_calls_and_adds_no_rows(tmp_path, tiny_model_dir, engines):
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "vllm")
    first = run_pipeline(cfg, engines=engines)
    before = counts(cfg.store)
    second = run_pipeline(cfg, engines=NoEngines())
    assert second.status == "completed" and second.stats == {}
    assert counts(cfg.store) == before
    assert second.scope_counts == first.scope_counts


def test_prompt_longer_than_context_is_skipped_and_recorded(tmp_path, tiny_model_dir, engines):
    long_prompt = "word " * 700
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "transformers",
                            models__policy=tiny_model_cfg(tiny_model_dir, "transformers", max_model_len=512).model_dump())
    write_prompts(tmp_path / "prompts.jsonl", [long_prompt, "Explain why the sky is blue."])
    result = run_pipeline(cfg, engines=engines)
    assert result.status == "completed"
    with Store.open(cfg.store, read_only=True) as s:
        rows = {r["prompt_id"]: r for r in s.query("SELECT * FROM responses")}
        skipped = [r for r in rows.values() if r["status"] == "skipped"]
        assert len(skipped) == 1 and skipped[0]["reason"].startswith("prompt_too_long")
        assert skipped[0]["output_tokens"] == 0
        assert len([r for r in rows.values() if r["status"] == "ok"]) == 1
    assert result.scope_counts["responses"] == {"ok": 1, "skipped": 1}

    # A larger context: the skipped prompt is tried again, its row replaced by an 'ok' one (same id), and the
    # later stages pick it up (issue 11, item 6).
    bigger = cfg.model_copy(update={"models": cfg.models.model_copy(update={
        "policy": tiny_model_cfg(tiny_model_dir, "transformers", max_model_len=2048)})})
    again = run_pipeline(bigger, engines=engines)
    assert again.status == "completed"
    with Store.open(cfg.store, read_only=True) as s:
        after = {r["prompt_id"]: r for r in s.query("SELECT * FROM responses")}
        assert set(after) == set(rows)
        retried = after[skipped[0]["prompt_id"]]
        assert retried["response_id"] == skipped[0]["response_id"]
        assert retried["status"] == "ok" and retried["max_model_len"] == 2048 and retried["output_tokens"] > 0
        assert s.query("SELECT count(*) AS n FROM critiques WHERE response_id = ?",
                       [retried["response_id"]])[0]["n"] > 0


def test_budget_stops_cleanly_and_rerun_resumes_without_duplicates(tmp_path, tiny_model_dir, engines):
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "transformers", budget__max_output_tokens=30)
    stopped = run_pipeline(cfg, engines=engines)
    assert stopped.status == "budget_exhausted"
    assert "run the same command again" in stopped.message
    spent = sum(s["output_tokens"] for s in stopped.stats.values())
    assert 30 <= spent <= 30 + 12  # at most one completion's worth of overshoot
    partial = counts(cfg.store)
    assert 0 < partial["responses"] + partial["critiques"]
    cfg.budget.max_output_tokens = None
    done = run_pipeline(cfg, engines=engines)
    assert done.status == "completed"
    full_store = tmp_path / "full"
    full_store.mkdir()
    full = tiny_pipeline_cfg(full_store, tiny_model_dir, "transformers")
    run_pipeline(full, engines=engines)
    assert counts(cfg.store) == counts(full.store)
    with Store.open(cfg.store, read_only=True) as a, Store.open(full.store, read_only=True) as b:
        for table in ("responses", "critiques", "revisions", "preference_pairs"):
            q = f"SELECT * EXCLUDE (run_id, created_at) FROM {table} ORDER BY ALL"
            assert a.query(q) == b.query(q), table
        with Store.open(cfg.store, read_only=True) as s:
            runs = s.query("SELECT status FROM runs ORDER BY started_at")
        assert [r["status"] for r in runs] == ["budget_exhausted", "completed"]


def test_rows_follow_the_model_not_its_path(tmp_path, tiny_model_dir, engines, monkeypatch):
    """Row ids hash the model's fingerprint: the same folder reached by another path reuses every stored row
    (no engine is started), and a model retrained into the same folder makes new rows."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    model = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model)
    monkeypatch.chdir(tmp_path)
    cfg = tiny_pipeline_cfg(tmp_path, model, "transformers")
    assert run_pipeline(cfg, engines=engines).status == "completed"
    before = counts(cfg.store)
    for alias in ("./m", "m"):
        relative = cfg.model_copy(update={"models": cfg.models.model_copy(update={
            "policy": cfg.models.policy.model_copy(update={"path": alias})})})
        result = run_pipeline(relative, engines=NoEngines())
        assert result.status == "completed" and not result.stats and counts(cfg.store) == before
    lm = AutoModelForCausalLM.from_pretrained(model)
    with torch.no_grad():
        for p in lm.parameters():
            p.add_(1e-3)
    lm.save_pretrained(model)  # "retrained" into the same folder
    fresh = _fresh_engines()
    try:
        result = run_pipeline(cfg, engines=fresh)
    finally:
        fresh.close()
    assert result.stats and counts(cfg.store)["responses"] == 2 * before["responses"]


def _fresh_engines():
    from factory.pipeline import Engines

    return Engines(seed=0, log=lambda m: None)
