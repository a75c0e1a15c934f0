"""executor: ray on a local Ray cluster started here (`ray start --head`, 2 CPUs): two vLLM replicas of the
tiny model run every model stage (generate, critique, revise, label); the `factory run` driver is the only
store writer. The rows equal those of the same pipeline run with executor: local, and a ray run killed with
SIGKILL mid-stage resumes with nothing lost or duplicated."""

import os
import secrets
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, factory_cmd, run_and_kill, tiny_pipeline_cfg

from factory.pipeline import run_pipeline
from factory.store import TABLES, Store

pytestmark = pytest.mark.integration
RAY = Path(sys.executable).parent / "ray"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """A one-node Ray cluster with 2 CPUs and token authentication, as `ray start` makes it on any machine;
    the token reaches this process and the `factory run` subprocesses through the environment, as it would
    reach a user's driver. Stopped afterwards."""
    port = _free_port()
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    saved = {k: os.environ.get(k) for k in auth}
    os.environ.update(auth)  # for the `factory run` and driver subprocesses the tests start
    env = dict(os.environ)
    subprocess.run([str(RAY), "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)


def _rows(path):
    with Store.open(path, read_only=True) as s:
        return {t: s.query(f"SELECT * EXCLUDE (run_id, created_at) FROM {t} ORDER BY ALL")
                for t in TABLES if t not in ("runs", "judge_reports")}


def _pipeline(tmp_path, model_dir, engine="vllm", **overrides):
    return tiny_pipeline_cfg(tmp_path, model_dir, engine, write_batch_size=4, label__enabled=True,
                             critique__rounds=2, **overrides)


def _write(cfg, path):
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return path



def test_ray_executor_makes_the_same_rows_as_local(tmp_path, tiny_model_dir, engines, ray_cluster):
    (tmp_path / "local").mkdir()
    (tmp_path / "ray").mkdir()
    local_cfg = _pipeline(tmp_path / "local", tiny_model_dir)
    run_pipeline(local_cfg, engines=engines)
    ray_cfg = _pipeline(tmp_path / "ray", tiny_model_dir, executor="ray",
                        ray={"address": ray_cluster, "replicas": 2, "num_cpus": 1})
    out = subprocess.run(factory_cmd("run", str(_write(ray_cfg, tmp_path / "ray.yaml")), "--verbose"), cwd=ROOT,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 Ray replicas ready" in out.stderr
    local, ray_rows = _rows(local_cfg.store), _rows(ray_cfg.store)
    for table in ("responses", "critiques", "revisions", "judgments", "comparisons", "preference_pairs"):
        assert ray_rows[table], f"no {table} rows"
        assert ray_rows[table] == local[table], table


def test_killed_ray_run_resumes_without_loss_or_duplicates(tmp_path, tiny_model_dir, ray_cluster):
    # transformers replicas start in seconds; what is tested is the driver's resume, the same for every engine
    cfg = _pipeline(tmp_path, tiny_model_dir, "transformers", executor="ray", ray={"address": ray_cluster, "replicas": 2, "num_cpus": 1})
    path = _write(cfg, tmp_path / "ray.yaml")
    run_and_kill(path, "critique r1: wrote")  # one critique batch stored, the next in flight on the replicas
    partial = _rows(cfg.store)
    assert 0 < len(partial["critiques"]) < 2 * len(partial["responses"]), "killed before or after the stage"
    out = subprocess.run(factory_cmd("run", str(path)), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    done = _rows(cfg.store)
    for table in ("responses", "critiques"):
        assert all(r in done[table] for r in partial[table]), f"{table}: stored rows changed on resume"
    ids = {t: [r[c] for r in done[t]] for t, c in (("critiques", "critique_id"), ("revisions", "revision_id"),
                                                   ("judgments", "judgment_id"))}
    for table, values in ids.items():
        assert values and len(values) == len(set(values)), f"{table}: duplicates or empty"
    assert len(done["critiques"]) == 2 * len(done["responses"])  # 2 rounds, one principle each


DEAD_REPLICA = """
import sys
import ray
from factory.config import RayConfig, SamplingConfig, TransformersModelConfig
from factory.engines.ray_replicas import ReplicaError, RayReplicas

engine = RayReplicas(TransformersModelConfig(path=sys.argv[1], max_model_len=256),
                     RayConfig(address=sys.argv[2], replicas=2, num_cpus=1))
ids = [engine.encode(f"Question {i}?") for i in range(4)]
assert len(engine.generate(ids, SamplingConfig(max_tokens=4), [0] * 4, [])) == 4
ray.kill(engine.actors[1])
try:
    engine.generate(ids, SamplingConfig(max_tokens=4), [0] * 4, [])
except ReplicaError as e:
    print("REPLICA_ERROR", e)
engine.close()
"""


def test_a_dead_replica_fails_the_batch_with_a_resume_message(tiny_model_dir, ray_cluster):
    # A driver process of its own, as `factory run` is: this pytest process has imported ray (through vLLM)
    # before the cluster's token reached its environment, and Ray reads that only once per process.
    out = subprocess.run([sys.executable, "-c", DEAD_REPLICA, str(tiny_model_dir), ray_cluster], cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "REPLICA_ERROR" in out.stdout and "run the same command again to resume" in out.stdout, out.stdout
