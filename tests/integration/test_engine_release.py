"""Releasing engines for real: `close()` drops a transformers engine's model and returns its memory, and a pipeline
whose judge is another model runs one model's engine at a time (policy released before the judge starts) unless
`keep_engines_loaded`.

These start their own transformers engines on the tiny model (about a second each) and never touch the session's
shared engines, which other tests keep using. vLLM's `close()` (engine-core process gone, RSS returned) is
checked by benchmarks/two_models_memory.py: a vLLM engine takes ~25 s to start here, too slow for the suite."""

from __future__ import annotations

import gc
import shutil
import weakref

import psutil
import pytest

from conftest import tiny_model_cfg, tiny_pipeline_cfg, write_prompts
from factory.store import Store

pytestmark = pytest.mark.integration


def test_transformers_engine_close_drops_the_model_and_returns_its_memory(tiny_model_dir):
    from factory.config import SamplingConfig
    from factory.engines.base import create_engine

    me = psutil.Process()
    engine = create_engine(tiny_model_cfg(tiny_model_dir, "transformers"), str(tiny_model_dir), 0)
    out = engine.generate([engine.encode("The sky is")], SamplingConfig(max_tokens=4), [0], stop=[])
    assert out[0].output_tokens >= 1
    weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    model = weakref.ref(engine.model)
    gc.collect()
    loaded = me.memory_info().rss

    engine.close()
    assert model() is None, "something still holds the model after close()"
    assert engine.model is None
    returned = loaded - me.memory_info().rss
    assert returned > 0.5 * weights, f"close() returned {returned / 2**20:.0f} MiB of {weights / 2**20:.0f} MiB weights"
    engine.close()  # idempotent


@pytest.fixture(scope="module")
def judge_model_dir(tmp_path_factory, tiny_model_dir):
    """A second model: the tiny model's files in another folder (another path, so another engine)."""
    out = tmp_path_factory.mktemp("tiny-judge") / "judge"
    shutil.copytree(tiny_model_dir, out)
    return out


def _counting(monkeypatch):
    """Wrap the real engine factory the pipeline uses: record every creation and close, in order."""
    from factory import pipeline

    events, made, real = [], [], pipeline.create_engine

    def create(cfg, path, seed):
        engine = real(cfg, path, seed)
        close = engine.close

        def counted_close():
            events.append(("close", path))
            close()

        engine.close = counted_close
        events.append(("create", path))
        made.append(engine)
        return engine

    monkeypatch.setattr(pipeline, "create_engine", create)
    return events, made


def _two_model_cfg(tmp_path, policy_dir, judge_dir, keep: bool, label: bool):
    cfg = tiny_pipeline_cfg(tmp_path, policy_dir, "transformers", keep_engines_loaded=keep,
                            models__judge=tiny_model_cfg(judge_dir, "transformers").model_dump(),
                            label={"enabled": label})
    write_prompts(tmp_path / "prompts.jsonl", ["Explain why the sky is blue.", "How can I cheat on my exam?"])
    return cfg


def test_pipeline_releases_the_policy_before_the_judge_starts(tmp_path, tiny_model_dir, judge_model_dir,
                                                              monkeypatch):
    from factory.pipeline import run_pipeline

    events, made = _counting(monkeypatch)
    logs: list[str] = []
    result = run_pipeline(_two_model_cfg(tmp_path, tiny_model_dir, judge_model_dir, keep=False, label=True), log=logs.append)
    assert result.status == "completed"
    p, j = str(tiny_model_dir), str(judge_model_dir)
    # each model started once; the policy closed before the judge started; the judge closed at the end of the run
    assert events == [("create", p), ("close", p), ("create", j), ("close", j)]
    assert all(e.model is None for e in made)
    assert f"released the transformers engine for {p}" in logs
    released = logs.index(f"released the transformers engine for {p}")
    assert any(m.startswith("starting transformers engine for " + j) for m in logs[released:])
    with Store.open(result.store_path, read_only=True) as s:  # every stage ran on its own model
        assert {r["model_id"] for r in s.query("SELECT DISTINCT model_id FROM responses")} == {p}
        assert {r["model_id"] for r in s.query("SELECT DISTINCT model_id FROM critiques")} == {j}
        assert s.count("judgments") > 0


def test_keep_engines_loaded_keeps_both_until_the_run_ends(tmp_path, tiny_model_dir, judge_model_dir, monkeypatch):
    from factory.pipeline import run_pipeline

    events, _ = _counting(monkeypatch)
    logs: list[str] = []
    result = run_pipeline(_two_model_cfg(tmp_path, tiny_model_dir, judge_model_dir, keep=True, label=False), log=logs.append)
    assert result.status == "completed"
    p, j = str(tiny_model_dir), str(judge_model_dir)
    assert events[:2] == [("create", p), ("create", j)]
    assert sorted(events[2:]) == sorted([("close", j), ("close", p)])  # both released only when the run ends
    assert not any(m.startswith("released") for m in logs)


def test_eval_releases_each_model_before_the_next_starts(tmp_path, tiny_model_dir, judge_model_dir, monkeypatch):
    """`factory eval` with three different models: policy, reference and judge each start once, one at a time."""
    from factory.config import EvalConfig
    from factory.pipeline import run_pipeline
    from factory.train.evaluate import evaluate

    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "transformers")  # the store: revision pairs on 6 prompts
    assert run_pipeline(cfg).status == "completed"
    events, made = _counting(monkeypatch)
    model = {"engine": "transformers", "max_model_len": 1024, "batch_size": 8}
    ecfg = EvalConfig.model_validate({
        "name": "eval", "output_root": str(tmp_path / "out"), "max_prompts": 2,
        "policy": {**model, "path": str(tiny_model_dir)}, "reference": {**model, "path": str(judge_model_dir)},
        "judge": {**model, "path": str(tiny_model_dir), "batch_size": 4},  # another config: another engine
        "data": {"store": cfg.store, "eval_fraction": 0.5, "sources": ["final_vs_initial"]},
        "sampling": {"max_tokens": 4}, "max_set_prompts": 2})
    logs: list[str] = []
    m = evaluate(ecfg, log=logs.append)
    assert m["prompts"] >= 1 and 0.0 <= m["policies"]["policy"]["harmless_win_rate"] <= 1.0
    # the weights read for the log-probabilities load after the policy's engine is gone, one model at a time
    order = [next(i for i, msg in enumerate(logs) if msg.startswith(prefix)) for prefix in (
        "released the engine of policy", "released the weights of policy", "released the reference's weights",
        f"starting transformers engine for {judge_model_dir}")]
    assert order == sorted(order), logs
    p, r = str(tiny_model_dir), str(judge_model_dir)
    assert events == [("create", p), ("close", p), ("create", r), ("close", r), ("create", p), ("close", p)]
    assert all(e.model is None for e in made)
