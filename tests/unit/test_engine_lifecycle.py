"""Unit tests for factory.pipeline.Engines: one model's engine resident at a time unless told to keep them all.

The engines here are scripted stand-ins that only count creations and closes. That is allowed only because these
tests are about our orchestration logic (which engine is released when), not about any model or backend; the real
release of memory is tested in tests/integration/test_engine_release.py and measured in
benchmarks/two_models_memory.py."""

from __future__ import annotations

import pytest

from factory.config import RayConfig
from factory import pipeline
from factory.pipeline import Engines


class FakeEngine:
    def __init__(self, name: str, model: str, events: list):
        self.name, self.model_id, self.events, self.closed = name, model, events, False
        events.append(("create", name, model))

    def close(self):
        assert not self.closed, "closed twice"
        self.closed = True
        self.events.append(("close", self.name, self.model_id))


@pytest.fixture
def events(monkeypatch):
    got: list = []
    monkeypatch.setattr(pipeline, "resolve_model", lambda path: path)
    monkeypatch.setattr(pipeline, "create_engine", lambda cfg, path, seed: FakeEngine(cfg.engine, path, got))
    return got


def cfg(path: str, engine: str = "vllm", **kw):
    from factory import config

    make = getattr(config, "make_model_config", None) or config.ModelConfig  # per-engine sections, or one class
    return make(path=f"/models/{path}", engine=engine, **kw)


def test_a_different_model_closes_the_resident_engine_first(events):
    logs: list[str] = []
    engines = Engines(seed=0, log=logs.append)
    policy, judge = engines.getter(cfg("policy")), engines.getter(cfg("judge"))
    p = policy()
    assert policy() is p  # the resident engine is reused, not restarted
    assert events == [("create", "vllm", "/models/policy")]
    judge(), judge(), judge()
    assert events == [("create", "vllm", "/models/policy"), ("close", "vllm", "/models/policy"),
                      ("create", "vllm", "/models/judge")]
    assert p.closed
    assert "released the vllm engine for /models/policy" in logs
    engines.close()
    assert events[-1] == ("close", "vllm", "/models/judge")
    assert engines.started == {cfg("policy").model_dump_json(): 1, cfg("judge").model_dump_json(): 1}


def test_keep_loaded_keeps_both_until_close(events):
    logs: list[str] = []
    engines = Engines(seed=0, log=logs.append, keep_loaded=True)
    p = engines.getter(cfg("policy"))()
    j = engines.getter(cfg("judge"))()
    assert engines.getter(cfg("policy"))() is p and engines.getter(cfg("judge"))() is j
    assert [e[0] for e in events] == ["create", "create"] and not p.closed
    assert not any(m.startswith("released") for m in logs)
    engines.close()
    assert sorted(e for e in events if e[0] == "close") == [("close", "vllm", "/models/judge"),
                                                           ("close", "vllm", "/models/policy")]


def test_the_same_model_config_shares_one_engine(events):
    engines = Engines(seed=0, log=lambda m: None)
    a, b = engines.getter(cfg("same"))(), engines.getter(cfg("same"))()
    assert a is b and events == [("create", "vllm", "/models/same")]


def test_asking_again_for_a_released_model_restarts_it_and_says_so(events):
    logs: list[str] = []
    engines = Engines(seed=0, log=logs.append)
    engines.getter(cfg("policy"))()
    engines.getter(cfg("judge"))()
    engines.getter(cfg("policy"))()
    assert [e[0] for e in events] == ["create", "close", "create", "close", "create"]
    assert any("again" in m and "/models/policy" in m for m in logs)
    assert engines.started[cfg("policy").model_dump_json()] == 2


def test_an_openai_engine_holds_no_memory_so_it_neither_releases_nor_is_released(events):
    engines = Engines(seed=0, log=lambda m: None)
    local = engines.getter(cfg("policy"))()
    remote = engines.getter(cfg("served", "openai", base_url="http://127.0.0.1:9/v1"))()
    assert not local.closed  # starting an HTTP client needs no room
    judge = engines.getter(cfg("judge", "transformers"))()
    assert local.closed and not remote.closed  # the local policy made room; the client stays
    assert engines.getter(cfg("served", "openai", base_url="http://127.0.0.1:9/v1"))() is remote
    engines.close()
    assert remote.closed and judge.closed


def test_a_ray_pool_counts_as_one_engine(monkeypatch, events):
    from factory.engines import ray_replicas

    class FakePool:
        def __init__(self, model_cfg, ray_cfg, seed, log):
            self.name, self.model_id, self.closed = model_cfg.engine, model_cfg.path, False
            events.append(("pool", ray_cfg.replicas, model_cfg.path))

        def close(self):
            self.closed = True
            events.append(("close pool", self.model_id))

    monkeypatch.setattr(ray_replicas, "RayReplicas", FakePool)
    logs: list[str] = []
    engines = Engines(seed=0, log=logs.append, ray=RayConfig(replicas=2))
    engines.getter(cfg("policy"))()
    engines.getter(cfg("judge"))()
    assert events == [("pool", 2, "/models/policy"), ("close pool", "/models/policy"), ("pool", 2, "/models/judge")]
    assert "released the vllm engine for /models/policy (2 Ray replicas)" in logs

    events.clear()
    kept = Engines(seed=0, log=lambda m: None, ray=RayConfig(replicas=2), keep_loaded=True)
    kept.getter(cfg("policy"))()
    kept.getter(cfg("judge"))()
    assert [e[0] for e in events] == ["pool", "pool"]


def test_the_pipeline_field_defaults_to_one_engine_at_a_time():
    from factory.config import PipelineConfig

    assert PipelineConfig().keep_engines_loaded is False
    assert PipelineConfig.model_validate({"keep_engines_loaded": True}).keep_engines_loaded is True
    assert "fit" in PipelineConfig.model_fields["keep_engines_loaded"].description
