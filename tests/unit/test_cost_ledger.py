"""The cost ledger (factory/cost.py) and the --estimate projection (factory/estimate.py) without a model: prices per
engine, seconds shared out to the runs whose rows a run uses, kept pairs without flagged ones, and the scaling."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from factory.config import PipelineConfig, make_model_config
from factory.cost import gpus, run_cost, stage_usd
from factory.estimate import project, sample_positions
from factory.store import Store, now


def _cfg(**models) -> dict:
    return PipelineConfig.model_validate({"models": models}).model_dump(mode="json")


def test_prices_per_engine():
    api = {"engine": "openai", "base_url": "http://x/v1", "price": {"input_per_million": 1.0, "output_per_million": 2.0}}
    cfg = _cfg(policy=api)
    assert stage_usd(cfg, "generate", 2_000_000, 1_000_000, 99.0) == pytest.approx(4.0)  # tokens, not seconds
    assert stage_usd(cfg, "label", 1_000_000, 0, 1.0) == pytest.approx(1.0)  # the judge is the policy here
    local = _cfg(policy={"engine": "vllm", "gpu_hour": 3.0, "tensor_parallel_size": 2})
    assert stage_usd(local, "critique r1", 10**9, 10**9, 1800.0) == pytest.approx(3.0)  # 0.5 h x $3 x 2 GPUs
    local["executor"], local["ray"]["replicas"] = "ray", 2
    assert gpus(local, local["models"]["policy"]) == 4
    hf = _cfg(policy={"engine": "transformers", "gpu_hour": 1.2})
    assert stage_usd(hf, "revise r2", 0, 0, 3600.0) == pytest.approx(1.2)
    assert stage_usd(_cfg(), "generate", 10, 10, 10.0) is None  # no price configured
    assert stage_usd(local, "decontaminate", 0, 0, 10.0) is None  # no model


def test_a_judge_on_another_engine_has_its_own_price():
    cfg = _cfg(policy={"engine": "vllm", "gpu_hour": 2.0},
               judge={"engine": "openai", "base_url": "http://x/v1", "price": {"input_per_million": 5.0}})
    assert stage_usd(cfg, "generate", 10**6, 0, 3600.0) == pytest.approx(2.0)
    assert stage_usd(cfg, "label", 10**6, 10**6, 3600.0) == pytest.approx(5.0)


def test_prices_belong_to_their_engine():
    with pytest.raises(ValidationError):
        make_model_config(engine="vllm", price={"input_per_million": 1.0})
    with pytest.raises(ValidationError):
        make_model_config(engine="openai", gpu_hour=1.0)
    with pytest.raises(ValidationError):
        make_model_config(engine="vllm", gpu_hour=-1.0)


def _row(table: str, rid: str, run: str, pin: int, pout: int, **extra) -> dict:
    key = {"responses": "response_id", "critiques": "critique_id"}[table]
    return {key: rid, "prompt_id": "p" + rid[-1], "run_id": run, "stage": table, "status": "ok", "text": rid,
            "prompt_tokens": pin, "output_tokens": pout, "created_at": now(), **extra}


def _progress(s: Store, run: str, stage: str, seconds: float) -> None:
    s.record_progress({"run_id": run, "stage": stage, "model_id": "m", "wanted": 0, "stored_before": 0, "done": 0,
                       "seconds": seconds, "started_at": now(), "updated_at": now()})


def test_run_cost_from_stored_rows_shares_seconds_with_the_run_that_wrote_them(tmp_path):
    """Run A wrote two responses in 10 s. Run B reused one of them, wrote one more in 4 s and a critique in 6 s: B's
    data cost 10 x 1/2 + 4 = 9 s of generate and 6 s of critique r1, tokens summed over B's rows."""
    cfg = _cfg(policy={"engine": "vllm", "gpu_hour": 36.0})  # $0.01 per second
    with Store.open(tmp_path / "s.duckdb") as s:
        a = s.start_run("x", "pipeline", cfg, None)
        s.insert("responses", [_row("responses", "r1", a, 100, 10, sample_index=0),
                               _row("responses", "r2", a, 200, 20, sample_index=0)])
        s.add_members(a, "responses", ["r1", "r2"])
        _progress(s, a, "generate", 10.0)
        b = s.start_run("x", "pipeline", cfg, None)
        s.insert("responses", [_row("responses", "r3", b, 300, 30, sample_index=0)])
        s.insert("critiques", [_row("critiques", "c3", b, 1000, 50, response_id="r3", parent_id="r3", round=1)])
        s.add_members(b, "responses", ["r2", "r3"])
        s.add_members(b, "critiques", ["c3"])
        _progress(s, b, "generate", 4.0)
        _progress(s, b, "critique r1", 6.0)
        _progress(s, b, "decontaminate", 0.5)
        pair = {"run_id": b, "prompt_id": "p3", "source": "final_vs_initial", "chosen_id": "v3", "rejected_id": "r3",
                "created_at": now()}
        s.insert("preference_pairs", [{**pair, "pair_id": "k1"}, {**pair, "pair_id": "k2", "chosen_id": "v4"},
                                      {**pair, "pair_id": "d1", "dropped_reason": "identical_texts"},
                                      {**pair, "pair_id": "x1", "chosen_id": "v5"}])
        s.add_members(b, "preference_pairs", ["k1", "k2", "d1", "x1"])
        s.insert("contamination", [{"row_id": "v5", "tbl": "revisions", "benchmark": "bench", "ngram": "g", "hits": 1,
                                    "run_id": b, "created_at": now()}])
        cost = run_cost(s, b)
        assert run_cost(s, a)["stages"]["generate"]["seconds"] == pytest.approx(10.0)
    assert list(cost["stages"]) == ["generate", "critique r1", "decontaminate"]
    gen, crit = cost["stages"]["generate"], cost["stages"]["critique r1"]
    assert (gen["input_tokens"], gen["output_tokens"]) == (500, 50)
    assert gen["seconds"] == pytest.approx(9.0) and gen["usd"] == pytest.approx(0.09)
    assert (crit["input_tokens"], crit["seconds"], crit["usd"]) == (1000, pytest.approx(6.0), pytest.approx(0.06))
    assert cost["stages"]["decontaminate"]["usd"] is None
    assert cost["total_usd"] == pytest.approx(0.15)
    assert cost["kept_pairs"] == 2  # not the dropped pair, not the one with a flagged side
    assert cost["usd_per_kept_pair"] == pytest.approx(0.075)
    json.dumps(cost)  # stored in runs.stats as JSON


def test_no_price_gives_null_usd(tmp_path):
    with Store.open(tmp_path / "s.duckdb") as s:
        run = s.start_run("x", "pipeline", _cfg(), None)
        s.insert("responses", [_row("responses", "r1", run, 5, 5, sample_index=0)])
        s.add_members(run, "responses", ["r1"])
        cost = run_cost(s, run)
    assert cost["stages"]["generate"]["usd"] is None and cost["total_usd"] is None
    assert cost["usd_per_kept_pair"] is None and cost["kept_pairs"] == 0


def test_sample_positions_spread_over_the_file():
    assert sample_positions(16, 8) == [1, 3, 5, 7, 9, 11, 13, 15]
    assert sample_positions(1000, 4) == [125, 375, 625, 875]
    assert sample_positions(3, 16) == [0, 1, 2]  # a file smaller than the sample: all of it


def test_projection_scales_the_sample_by_prompts_over_sample():
    cost = {"currency": "USD", "kept_pairs": 3, "total_usd": 0.5,
            "stages": {"generate": {"input_tokens": 100, "output_tokens": 40, "seconds": 2.0, "usd": 0.5},
                       "decontaminate": {"input_tokens": 0, "output_tokens": 0, "seconds": 0.1, "usd": None}}}
    p = project(cost, total=1000, sample=4)
    assert p["scale"] == 250 and p["stages"]["generate"]["output_tokens"] == 10_000
    assert p["input_tokens"] == 25_000 and p["seconds"] == pytest.approx(525.0)
    assert p["total_usd"] == pytest.approx(125.0) and p["kept_pairs"] == 750
    assert p["usd_per_kept_pair"] == pytest.approx(0.5 / 3) and p["stages"]["decontaminate"]["usd"] is None
