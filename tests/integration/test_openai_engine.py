"""The OpenAI-compatible engine against a real `vllm serve` on 127.0.0.1 (tiny model): a pipeline whose
judge is the server, and a server that dies mid-stage (the stage fails clearly after its retries; a
re-run against a restarted server completes with nothing lost or duplicated)."""

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

from conftest import tiny_model_cfg, tiny_pipeline_cfg
from factory.engines.openai_engine import EndpointError
from factory.pipeline import Engines, run_pipeline
from factory.store import Store

pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model_dir, port):
        self.model_dir, self.port, self.proc = model_dir, port, None

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self):
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
             "--host", "127.0.0.1", "--port", str(self.port), "--dtype", "float32", "--max-model-len", "1024",
             "--enforce-eager", "--seed", "0"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)  # its own process group: stop() must also end the engine-core child
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("vllm serve exited during start-up")
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(1)
        raise RuntimeError("vllm serve did not become ready in 300 s")

    def stop(self):
        """Kill the server and its engine processes (a killed server alone leaves its EngineCore orphaned)."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    srv = Server(tiny_model_dir, _free_port()).start()
    yield srv
    srv.stop()


def _served_cfg(tmp_path, tiny_model_dir, url, **kw):
    cfg = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "vllm", label={"enabled": True}, **kw)
    cfg.models.judge = tiny_model_cfg(tiny_model_dir, "openai", base_url=url, max_retries=1, timeout_s=20)
    return cfg


def test_pipeline_with_the_server_as_judge(tmp_path, tiny_model_dir, engines, server, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-local-test-key-never-stored")
    cfg = _served_cfg(tmp_path, tiny_model_dir, server.url)
    result = run_pipeline(cfg, engines=engines)
    assert result.status == "completed"
    with Store.open(cfg.store, read_only=True) as s:
        assert {r["engine"] for r in s.query("SELECT DISTINCT engine FROM critiques")} == {"openai"}
        assert {r["engine"] for r in s.query("SELECT DISTINCT engine FROM responses")} == {"vllm"}
        judgments = s.query("SELECT * FROM judgments")
        assert judgments and all(j["status"] == "ok" and 0.0 <= j["p_a"] <= 1.0 for j in judgments)
        assert s.count("revisions") > 0
    assert b"sk-local-test-key-never-stored" not in open(cfg.store, "rb").read()


def test_server_dying_mid_stage_fails_clearly_and_rerun_completes(tmp_path, tiny_model_dir, engines):
    srv = Server(tiny_model_dir, _free_port()).start()
    cfg = _served_cfg(tmp_path, tiny_model_dir, srv.url, write_batch_size=2)
    judge_engines = Engines(seed=0, log=lambda m: None)
    judge_engines._made.update(engines._made)  # reuse the offline policy engine; the judge client is new

    def log(msg):
        if msg.startswith("critique r1: wrote"):
            srv.stop()  # the server dies after the first critique batch

    try:
        with pytest.raises(EndpointError, match="run the same command again"):
            run_pipeline(cfg, engines=judge_engines, log=log)
        with Store.open(cfg.store, read_only=True) as s:
            partial = s.count("critiques")
            assert s.query("SELECT status FROM runs")[0]["status"] == "failed"
        assert partial >= 2
        srv.start()
        done = run_pipeline(cfg, engines=judge_engines)
        assert done.status == "completed"
    finally:
        srv.stop()
    with Store.open(cfg.store, read_only=True) as s:
        got = {t: s.query(f"SELECT {t[:-1]}_id AS id FROM {t} ORDER BY 1") for t in ("responses", "critiques", "revisions")}
        assert got["critiques"] and len(got["critiques"]) == len({r["id"] for r in got["critiques"]})
        n_ok_responses = s.query("SELECT count(*) AS n FROM responses WHERE status = 'ok' "
                                 "AND length(trim(text)) > 0")[0]["n"]
        assert s.count("judgments") > 0 and s.query("SELECT status FROM runs ORDER BY started_at DESC")[0]["status"] == "completed"
    assert len(got["critiques"]) == n_ok_responses  # one principle per round: one critique per response


def test_stream_from_the_server_yields_every_row_once_as_generate_makes_it(tiny_model_dir, server):
    from factory.config import SamplingConfig
    from factory.engines.openai_engine import OpenAIEngine

    eng = OpenAIEngine(tiny_model_cfg(tiny_model_dir, "openai", base_url=server.url, concurrency=4), str(tiny_model_dir))
    ids = [eng.encode(f"Question number {i}?") for i in range(10)]
    sampling, seeds = SamplingConfig(max_tokens=6, temperature=1.0), list(range(10))
    pairs = list(eng.generate_stream(ids, sampling, seeds, []))
    assert sorted(i for i, _ in pairs) == list(range(10))
    assert [c for _, c in sorted(pairs, key=lambda p: p[0])] == eng.generate(ids, sampling, seeds, [])
    eng.close()
