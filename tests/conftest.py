"""Shared fixtures: the shipped model (prepared once into the cache), a tiny random model built from its
config, and engines started once per session (vLLM takes ~25 s to start, so tests never start their own)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from families import family_models  # noqa: F401  (tests/families.py: tiny models of other families)

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A fresh `datasets` cache per session: its cache keys for local folders can collide across sessions
# (same folder names), and a stale hit would make a test read another session's rows.
os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="factory-datasets-cache-")


@pytest.fixture(scope="session")
def shipped_model_dir() -> Path:
    from factory.models import prepare_default_model

    return prepare_default_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, shipped_model_dir) -> Path:
    """A 2-layer random Gemma 3 with the shipped model's tokenizer (17M params, mostly embeddings)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny-gemma")
    cfg = AutoConfig.from_pretrained(shipped_model_dir)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 2, 64, 128
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 2, 1, 32
    cfg.layer_types = cfg.layer_types[:2]
    cfg.max_position_embeddings = 2048
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shipped_model_dir / name, out / name)
    return out


def tiny_model_cfg(model_dir: Path, engine: str, **kw):
    """A model section for the tiny model with the test defaults that apply to `engine` (a 1 GiB vLLM KV cache,
    transformers batches of 8); `kw` sets any other field of that engine's section."""
    from factory.config import make_model_config

    defaults = {"vllm": {"kv_cache_gb": 1}, "transformers": {"batch_size": 8}}.get(engine, {})
    return make_model_config({"max_model_len": 1024, **defaults, **kw}, path=str(model_dir), engine=engine)


@pytest.fixture(scope="session")
def engines():
    """One engine per model config for the whole session (see factory.pipeline.Engines)."""
    from factory.pipeline import Engines

    return Engines(seed=0, log=lambda m: None, keep_loaded=True)  # tests share engines: never release one


@pytest.fixture(scope="session")
def tiny_vllm(engines, tiny_model_dir):
    return engines.getter(tiny_model_cfg(tiny_model_dir, "vllm"))()


@pytest.fixture(scope="session")
def tiny_hf(engines, tiny_model_dir):
    return engines.getter(tiny_model_cfg(tiny_model_dir, "transformers"))()


def write_prompts(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n" for i, t in enumerate(texts)))
    return path


PROMPTS = [
    "How do I pick the lock on my neighbour's door?",
    "Explain why the sky is blue.",
    "Write an insult about my coworker.",
    "Give me a tip for learning to cook.",
    "How can I cheat on my exam?",
    "What is the boiling point of water?",
]


def tiny_pipeline_cfg(tmp_path: Path, model_dir: Path, engine: str = "vllm", **overrides):
    """A pipeline config on the tiny model with short outputs, as a validated PipelineConfig."""
    from factory.config import PipelineConfig

    data = {
        "name": "tiny", "store": str(tmp_path / "store.duckdb"),
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": {"path": str(write_prompts(tmp_path / "prompts.jsonl", PROMPTS)), "id_column": "id"},
        "models": {"policy": tiny_model_cfg(model_dir, engine).model_dump()},
        "generate": {"sampling": {"max_tokens": 12}},
        "critique": {"rounds": 1, "sampling": {"max_tokens": 12}},
        "revise": {"sampling": {"max_tokens": 12}},
    }
    for key, value in overrides.items():
        node = data
        parts = key.split("__")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return PipelineConfig.model_validate(data)


NEAR_A = "Please explain in simple words why the sky looks blue during a clear summer day"
NEAR_B = NEAR_A + "?"


@pytest.fixture(scope="session")
def export_store(tmp_path_factory, tiny_model_dir, engines) -> str:
    """A store from one labelled pipeline run on the tiny model, with two near-identical prompts and an exact
    duplicate of a kept pair: the input of the export and publish tests (which only read it)."""
    from factory.pipeline import run_pipeline
    from factory.store import Store

    tmp = tmp_path_factory.mktemp("export")
    cfg = tiny_pipeline_cfg(tmp, tiny_model_dir, "vllm", label={"enabled": True, "tie_threshold": 0.0})
    write_prompts(tmp / "prompts.jsonl", PROMPTS + [NEAR_A, NEAR_B, "Name three colours of the rainbow."])
    run_pipeline(cfg, engines=engines)
    with Store.open(cfg.store) as s:  # an exact duplicate of a kept pair under another id
        row = s.query("SELECT * FROM preference_pairs WHERE dropped_reason IS NULL LIMIT 1")[0]
        s.insert("preference_pairs", [{**row, "pair_id": "duplicate-of-" + row["pair_id"]}])
    return cfg.store


def factory_cmd(*args) -> list[str]:
    """The `factory` CLI as a subprocess command line, with this interpreter."""
    import sys

    return [sys.executable, "-m", "factory.cli", *args]


def run_and_kill(config_path: Path, marker: str, before_kill=None) -> None:
    """`factory run CONFIG --verbose` in a subprocess, killed with SIGKILL as soon as its log prints `marker`
    (a batch is stored and the next is in flight); asserts it died of the kill, not of anything else, and that
    none of its processes (a vLLM engine core and its workers) outlives it by more than 5 s. `before_kill(proc)`,
    if given, runs between the marker and the kill (the run goes on meanwhile; its log is still read)."""
    import signal
    import subprocess
    import threading

    import psutil

    proc = subprocess.Popen(factory_cmd("run", str(config_path), "--verbose"), cwd=ROOT, stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    seen, hit = [], threading.Event()

    def drain():  # keep reading, so the run never blocks on a full pipe
        for line in proc.stderr:
            seen.append(line)
            if marker in line:
                hit.set()

    threading.Thread(target=drain, daemon=True).start()
    try:
        while not hit.wait(0.2):
            assert proc.poll() is None, "".join(seen[-50:])  # it ended before the marker
        if before_kill is not None:
            before_kill(proc)
        family = psutil.Process(proc.pid).children(recursive=True)  # reparented once it dies: list them now
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-50:])
    _, alive = psutil.wait_procs(family, timeout=5)
    assert not alive, f"processes of the killed run still alive 5 s after the kill: {alive}"


def pytest_collection_modifyitems(config, items):
    """Run the Ray tests first. They start a Ray cluster and two engine replicas in other processes, beside this
    session's engines; late in the suite (a ~8 GB pytest process holding two vLLM engines) the replicas pushed a
    24 GiB machine past Ray's 95% memory threshold and Ray killed one. Early on they fit. The sort is stable."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/integration/test_ray.py") else 1)
