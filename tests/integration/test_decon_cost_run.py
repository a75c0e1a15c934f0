"""Decontamination, the cost ledger and --estimate in real pipeline runs on the tiny model (vLLM, shared engines):
a benchmark holding one of the run's prompts (other case and punctuation) flags it, its pairs stay stored but leave
export, training data and the card's counts say so, an unrelated benchmark flags nothing; the run's cost is stored
with it; an estimate stores only its sample's rows and projects them by prompts / sample."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import PROMPTS, tiny_pipeline_cfg
from factory.config import TrainDataConfig
from factory.estimate import estimate_pipeline
from factory.export import ExportFilter, build_export
from factory.pipeline import run_pipeline
from factory.publish import build_folder
from factory.store import Store, row_id
from factory.train.data import load_pairs

pytestmark = pytest.mark.integration

COPIED = PROMPTS[0]  # "How do I pick the lock on my neighbour's door?" (10 words: a short item, matched whole)


@pytest.fixture(scope="module")
def decon_run(tmp_path_factory, tiny_model_dir, engines):
    tmp = tmp_path_factory.mktemp("decon")
    bench = tmp / "bench.jsonl"
    bench.write_text(json.dumps({"id": 7, "question": COPIED.upper().replace("?", " !!").replace("'", "")}) + "\n")
    other = tmp / "other.jsonl"
    other.write_text(json.dumps({"question": "Describe the life cycle of a monarch butterfly for a class of "
                                             "seven year old children"}) + "\n")
    cfg = tiny_pipeline_cfg(tmp, tiny_model_dir, "vllm", label={"enabled": True, "tie_threshold": 0.0},
                            decontamination={"benchmarks": [{"name": "copied", "path": str(bench)},
                                                            {"name": "unrelated", "path": str(other)}]})
    cfg.models.policy.gpu_hour = 36.0  # $0.01 per second of a stage
    return cfg, run_pipeline(cfg, engines=engines)


def test_the_copied_prompt_is_flagged_and_the_unrelated_benchmark_flags_nothing(decon_run):
    cfg, result = decon_run
    assert result.status == "completed", result.message
    flagged = row_id("prompt", COPIED)
    with Store.open(cfg.store, read_only=True) as s:
        rows = s.query("SELECT row_id, tbl, benchmark, kind, ngram, hits, run_id FROM contamination")
        kept_flagged = s.query("SELECT count(*) AS n FROM preference_pairs WHERE prompt_id = ? AND dropped_reason IS NULL",
                               [flagged])[0]["n"]
    assert [(r["row_id"], r["tbl"], r["benchmark"]) for r in rows] == [(flagged, "prompts", "copied")]
    assert rows[0]["ngram"] == "how do i pick the lock on my neighbours door" and rows[0]["run_id"] == result.run_id
    assert rows[0]["kind"] == "short_item"
    assert kept_flagged >= 1  # the pair rows are kept as they are (no dropped_reason)
    assert result.contamination == {"copied": {"prompts": 1, "responses": 0, "revisions": 0,
                                               "pairs_excluded": kept_flagged}}


def test_flagged_pairs_leave_export_training_data_and_the_card_counts_them(decon_run, tmp_path):
    cfg, result = decon_run
    flagged = row_id("prompt", COPIED)
    with Store.open(cfg.store, read_only=True) as s:
        dd, _ = build_export(s, "preference", ExportFilter(runs=[result.run_id], test_fraction=0.0))
        sft, _ = build_export(s, "sft", ExportFilter(runs=[result.run_id], test_fraction=0.0))
    exported = {pid for split in dd.values() for pid in split["prompt_id"]}
    assert flagged not in exported and len(exported) >= 3
    assert flagged not in {pid for split in sft.values() for pid in split["prompt_id"]}
    training = load_pairs(TrainDataConfig(store=cfg.store, runs=[result.run_id]))
    assert training and flagged not in {r["prompt_id"] for r in training}
    build_folder(cfg.store, result.run_id, "me/decon", tmp_path / "card", ExportFilter(runs=[result.run_id]))
    card = (tmp_path / "card" / "README.md").read_text()
    n = result.contamination["copied"]["pairs_excluded"]
    assert "## Decontamination" in card and f"| copied | `{cfg.decontamination.benchmarks[0].path}` | 1 | 0 | 0 | {n} |" in card
    assert "| unrelated |" in card and "| 0 | 0 | 0 | 0 |" in card
    assert "## Cost" in card and "per kept pair" in card


def test_the_run_stores_its_cost_per_stage_and_per_kept_pair(decon_run):
    cfg, result = decon_run
    with Store.open(cfg.store, read_only=True) as s:
        stored = json.loads(s.query("SELECT stats FROM runs WHERE run_id = ?", [result.run_id])[0]["stats"])["cost"]
        tokens = {t: s.query(f"SELECT sum(prompt_tokens) AS i, sum(output_tokens) AS o FROM {t}")[0]
                  for t in ("responses", "critiques", "revisions", "judgments")}
        seconds = dict(s.run_sql("SELECT stage, seconds FROM run_progress WHERE run_id = ?", [result.run_id]))
    cost = result.cost
    assert json.loads(json.dumps(cost)) == stored
    assert list(cost["stages"]) == ["generate", "critique r1", "revise r1", "label", "decontaminate"]
    for stage, table in (("generate", "responses"), ("critique r1", "critiques"), ("revise r1", "revisions"),
                         ("label", "judgments")):
        s_ = cost["stages"][stage]
        assert (s_["input_tokens"], s_["output_tokens"]) == (tokens[table]["i"], tokens[table]["o"])
        assert s_["seconds"] == pytest.approx(seconds[stage]) and s_["usd"] == pytest.approx(seconds[stage] / 100)
    assert cost["stages"]["decontaminate"]["usd"] is None
    assert cost["total_usd"] == pytest.approx(sum(seconds[k] for k in seconds if k != "decontaminate") / 100)
    kept = sum(v for k, v in result.pair_counts.items() if k == "kept") - result.contamination["copied"]["pairs_excluded"]
    assert cost["kept_pairs"] >= kept > 0  # AI-feedback pairs are kept too
    assert cost["usd_per_kept_pair"] == pytest.approx(cost["total_usd"] / cost["kept_pairs"])


def test_estimate_stores_only_its_sample_and_projects_by_prompts_over_sample(tmp_path, tiny_model_dir, engines):
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "vllm")
    result, projection = estimate_pipeline(cfg, sample=2, engines=engines)
    sample = {row_id("prompt", PROMPTS[i]) for i in (1, 4)}  # positions (i + 0.5) * 6 / 2
    with Store.open(cfg.store, read_only=True) as s:
        kinds = s.query("SELECT kind, stats FROM runs")
        stored = {t: {r[0] for r in s.run_sql(f"SELECT DISTINCT prompt_id FROM {t}")}
                  for t in ("prompts", "responses", "critiques", "revisions", "preference_pairs")}
    assert [k["kind"] for k in kinds] == ["estimate"] and json.loads(kinds[0]["stats"])["estimate"] == projection
    assert all(ids == sample for ids in stored.values()), stored
    assert (projection["prompts"], projection["sample"], projection["scale"]) == (6, 2, 3.0)
    for stage, s_ in result.cost["stages"].items():
        assert projection["stages"][stage]["output_tokens"] == 3 * s_["output_tokens"] > 0
        assert projection["stages"][stage]["seconds"] == pytest.approx(3 * s_["seconds"])
    assert projection["kept_pairs"] == 3 * result.cost["kept_pairs"]
    full = run_pipeline(cfg, engines=engines)  # the full run reuses the sample's rows
    with Store.open(cfg.store, read_only=True) as s:
        reused = s.run_sql("SELECT stored_before FROM run_progress WHERE run_id = ? AND stage = 'generate'",
                           [full.run_id])[0][0]
    assert reused == 2
    actual = sum(s_["output_tokens"] for s_ in full.cost["stages"].values())
    assert 0.5 * actual <= projection["output_tokens"] <= 2 * actual
