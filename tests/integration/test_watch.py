"""Watch a run (issue 11, item 4): `factory status`, `judge-report` and `export` answer while a real `factory run`
holds the store; `status` shows per-stage progress; after SIGKILL the run shows as interrupted and none of its
processes (the vLLM engine core included) survives. One real run on the tiny model serves every assertion."""

import subprocess

import psutil
import pytest
import yaml
from conftest import ROOT, factory_cmd, run_and_kill, write_prompts

from factory.store import Store, StoreLockedError

pytestmark = pytest.mark.integration


def _config(tmp_path, model_dir, n_prompts=600):
    prompts = [f"Question {i}: what is a good way to spend a free afternoon number {i}?" for i in range(n_prompts)]
    data = {
        "name": "watch", "store": str(tmp_path / "store.duckdb"), "write_batch_size": 2,  # frequent commits
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": {"path": str(write_prompts(tmp_path / "prompts.jsonl", prompts))},
        "models": {"policy": {"path": str(model_dir), "engine": "vllm", "max_model_len": 1024, "kv_cache_gb": 1}},
        "generate": {"sampling": {"max_tokens": 8}},
        "critique": {"rounds": 1, "sampling": {"max_tokens": 8}},
        "revise": {"sampling": {"max_tokens": 8}},
    }
    path = tmp_path / "watch.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(*args, timeout=120):
    return subprocess.run(factory_cmd(*args), cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_status_export_and_judge_report_answer_during_a_run_and_a_killed_run_leaves_nothing(tmp_path, tiny_model_dir):
    cfg = _config(tmp_path, tiny_model_dir)
    store = str(tmp_path / "store.duckdb")

    def watch(proc):  # a generate batch is stored, more are in flight
        # readers get in while the run holds the store (its lock file), in other processes
        st = _cli("status", "--store", store)
        assert st.returncode == 0, st.stderr
        assert "running" in st.stdout and "stages" in st.stdout and "generate" in st.stdout, st.stdout
        rep = _cli("judge-report", "--store", store)  # the running run has no report yet: read, not refused
        assert rep.returncode == 2 and "has no judge report" in rep.stderr, rep.stderr
        exp = _cli("export", "--store", store, "--out", str(tmp_path / "export"))
        assert exp.returncode == 2 and "nothing to export" in exp.stderr, exp.stderr
        with Store.open(store, read_only=True) as s:  # and in this process
            status = s.status()
        (run,) = status["runs"]
        assert run["status"] == "running" and run["pid"] == proc.pid
        gen = {g["stage"]: g for g in status["progress"][run["run_id"]]}["generate"]
        assert gen["done"] > 0 and gen["done"] + gen["pending"] == gen["wanted"] == 600
        assert gen["rows_per_s"] > 0 and gen["seconds"] > 0
        # the one-writer rule holds while the writer lets readers in
        with pytest.raises(StoreLockedError, match=f"process {proc.pid}"):
            Store.open(store)
        assert proc.poll() is None
        assert psutil.Process(proc.pid).children(recursive=True), "the vLLM engine core runs in a child process"

    # SIGKILL, then no process of the run (engine core, its worker, multiprocessing's tracker) lives 5 s later
    run_and_kill(cfg, "generate: wrote", before_kill=watch)

    st = _cli("status", "--store", store)
    assert st.returncode == 0, st.stderr
    assert "interrupted" in st.stdout and "running" not in st.stdout, st.stdout
    with Store.open(store, read_only=True) as s:  # nothing lost: every row the progress counted is stored
        status = s.status()
        (run,) = status["runs"]
        gen = {g["stage"]: g for g in status["progress"][run["run_id"]]}["generate"]
        assert run["status"] == "interrupted" and gen["eta_s"] is None
        assert s.count("responses") >= gen["done"] > 0
    with Store.open(store) as s:  # the killed writer's lock is gone with it
        assert s.count("prompts") == 600
