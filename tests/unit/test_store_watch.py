"""Watching a store while another process writes it: readers get in (the writer lets go of the DuckDB file when
asked, in a commit loop or while it waits on a model), nothing committed is lost, the one-writer rule holds;
per-stage progress (rows/s, ETA); a `running` run whose process is gone reads as `interrupted`."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from factory.lifetime import process_identity
from factory.store import Store, StoreLockedError, now

REPO = Path(__file__).parents[2]

WRITER = """
import sys, time
from factory.store import Store, now
path, mode = sys.argv[1], sys.argv[2]
s = Store.open(path)
run = s.start_run("w", "pipeline", {}, None)
n = 0
def batch():
    global n
    rows = [{"response_id": f"r{n}-{i}", "prompt_id": "p", "run_id": run, "stage": "generate", "status": "ok",
             "text": "t" * 200, "created_at": now()} for i in range(50)]
    n += 1
    s.insert("responses", rows, progress={"run_id": run, "stage": "generate", "model_id": "m", "wanted": 10000,
                                          "stored_before": 0, "done": 50 * n, "seconds": 0.1 * n,
                                          "started_at": now(), "updated_at": now()})
batch()
print("READY", flush=True)
if mode == "model":  # a long model call after a commit: the watcher thread lets go when a reader asks
    s.release()
    time.sleep(4)
    batch()
else:  # commits back to back (an instant engine): the writer lets go at its next commit
    t0 = time.monotonic()
    while time.monotonic() - t0 < 4:
        batch()
s.finish_run(run, "completed", "", {})
print("DONE", n, s.count("responses"), flush=True)
s.close()
"""


@pytest.mark.parametrize("mode", ["model", "commits"])
def test_a_reader_gets_in_while_another_process_writes(tmp_path, mode):
    path = tmp_path / "s.duckdb"
    w = subprocess.Popen([sys.executable, "-c", WRITER, str(path), mode], cwd=REPO, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    try:
        assert w.stdout.readline().strip() == "READY", w.stderr.read()
        t0 = time.monotonic()
        with Store.open(path, read_only=True) as s:
            waited = time.monotonic() - t0
            st = s.status()
            seen = s.count("responses")
        assert waited < 3, waited
        (run,) = st["runs"]
        assert run["status"] == "running" and run["pid"] == w.pid
        (gen,) = st["progress"][run["run_id"]]
        assert gen["done"] == seen >= 50 and gen["pending"] == 10000 - seen  # progress commits with its rows
        assert gen["rows_per_s"] == pytest.approx(500) and gen["eta_s"] == pytest.approx(gen["pending"] / 500)
        with pytest.raises(StoreLockedError, match=f"process {w.pid}"):  # still one writer
            Store.open(path)
        out, err = w.communicate(timeout=60)
    finally:
        if w.poll() is None:
            w.kill()
    assert w.returncode == 0, err
    _, n, count = out.split()
    assert int(count) == 50 * int(n)  # every batch the writer committed is there, none twice
    with Store.open(path, read_only=True) as s:
        assert s.count("responses") == int(count)
        assert s.status()["runs"][0]["status"] == "completed"


def test_a_running_run_whose_process_is_gone_reads_as_interrupted(tmp_path):
    path = tmp_path / "s.duckdb"
    me = process_identity()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Store.open(path) as s:
        alive = s.start_run("alive", "pipeline", {}, None)  # this process: alive
        gone = s.start_run("gone", "pipeline", {}, None)
        reused = s.start_run("reused", "pipeline", {}, None)
        s.run_sql("UPDATE runs SET pid = ? WHERE run_id = ?", [dead.pid, gone])
        # our pid, but another process start time: the pid was reused by a newer process
        s.run_sql("UPDATE runs SET process_started = ? WHERE run_id = ?", [me["process_started"] - 3600, reused])
        s.record_progress({"run_id": gone, "stage": "generate", "model_id": "m", "wanted": 10, "stored_before": 0,
                           "done": 4, "seconds": 2.0, "started_at": now(), "updated_at": now()})
        st = {r["run_id"]: r for r in s.status()["runs"]}
        assert st[alive]["status"] == "running"
        assert st[gone]["status"] == "interrupted" and str(dead.pid) in st[gone]["message"]
        assert st[reused]["status"] == "interrupted"
        (g,) = s.run_progress(gone)
        assert (g["done"], g["pending"], g["rows_per_s"], g["eta_s"]) == (4, 6, 2.0, None)  # no ETA when not running
        assert s.run_progress(gone, running=True)[0]["eta_s"] == 3.0
        assert os.getpid() == s.query("SELECT pid FROM runs WHERE run_id = ?", [alive])[0]["pid"]


def test_a_store_from_before_run_progress_reads(tmp_path):
    """A reader cannot migrate: a store written before runs had pids or run_progress existed still reads."""
    import duckdb

    path = tmp_path / "old.duckdb"
    with Store.open(path) as s:
        run = s.start_run("old", "pipeline", {}, None)
    con = duckdb.connect(str(path))
    con.execute("DROP TABLE run_progress")
    for col in ("pid", "hostname", "process_started"):
        con.execute(f"ALTER TABLE runs DROP COLUMN {col}")
    con.close()
    with Store.open(path, read_only=True) as s:
        st = s.status()
    assert st["runs"][0]["status"] == "running" and st["progress"] == {run: []}
