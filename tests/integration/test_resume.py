"""A run killed with SIGKILL in the middle of a stage, started again, ends with exactly the rows of an
uninterrupted run: none lost, none duplicated. Real subprocesses of the `factory` CLI, tiny model."""

import subprocess

import pytest
import yaml
from conftest import PROMPTS, ROOT, factory_cmd, run_and_kill, write_prompts

from factory.store import TABLES, Store

pytestmark = pytest.mark.integration


def _config(tmp_path, model_dir, store_name):
    data = {
        "name": "resume", "store": str(tmp_path / store_name), "write_batch_size": 2,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": {"path": str(write_prompts(tmp_path / "prompts.jsonl", PROMPTS + [p + " Please." for p in PROMPTS]))},
        # batch_size 1: no padding, so outputs do not depend on which rows share a batch after a restart
        "models": {"policy": {"path": str(model_dir), "engine": "transformers", "max_model_len": 1024,
                              "batch_size": 1}},
        "generate": {"sampling": {"max_tokens": 16}},
        "critique": {"rounds": 2, "sampling": {"max_tokens": 16}},
        "revise": {"sampling": {"max_tokens": 16}},
    }
    path = tmp_path / f"{store_name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path



def _rows(path):
    with Store.open(path, read_only=True) as s:
        return {t: s.query(f"SELECT * EXCLUDE (run_id, created_at) FROM {t} ORDER BY ALL") for t in TABLES}


def test_sigkill_mid_stage_then_resume_matches_uninterrupted_run(tmp_path, tiny_model_dir):
    killed_cfg = _config(tmp_path, tiny_model_dir, "killed.duckdb")
    run_and_kill(killed_cfg, "critique r1: wrote")  # one critique batch is stored, more are in flight
    partial = _rows(tmp_path / "killed.duckdb")
    n_prompts = len(partial["prompts"])
    assert len(partial["responses"]) == n_prompts
    assert 0 < len(partial["critiques"]) < n_prompts  # killed in the middle of the critique stage
    assert not partial["revisions"]

    resumed = subprocess.run(factory_cmd("run", str(killed_cfg)), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    full = subprocess.run(factory_cmd("run", str(_config(tmp_path, tiny_model_dir, "full.duckdb"))), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-2000:]

    got, want = _rows(tmp_path / "killed.duckdb"), _rows(tmp_path / "full.duckdb")
    for table in TABLES:
        if table == "prompts":
            assert [r["prompt_id"] for r in got[table]] == [r["prompt_id"] for r in want[table]]
        else:
            assert got[table] == want[table], table
    assert len(got["revisions"]) > 0 and len(got["preference_pairs"]) > 0
    with Store.open(tmp_path / "killed.duckdb", read_only=True) as s:
        statuses = [r["status"] for r in s.query("SELECT status FROM runs ORDER BY started_at")]
    assert statuses == ["running", "completed"]  # the killed run never got to record an ending
