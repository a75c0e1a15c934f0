"""Unit tests for factory.store: row ids, idempotent inserts, anti-join reads, runs, the writer lock."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from factory.store import Store, now, row_id

REPO = Path(__file__).parents[2]


def _prompt(text: str, **extra) -> dict:
    return {"prompt_id": row_id("prompt", text), "text": text, "source": "test", "source_id": None,
            "meta": "{}", "run_id": "r", "created_at": now(), **extra}


def _response(rid: str, status: str = "ok", text: str = "t") -> dict:
    return {"response_id": rid, "prompt_id": "p", "sample_index": 0, "run_id": "r", "stage": "generate",
            "status": status, "text": text, "created_at": now()}


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "s.duckdb")
    yield s
    s.close()


# ---- row_id ------------------------------------------------------------------------------------------

def test_row_id_is_deterministic():
    assert row_id("response", "p1", 0, "model", '{"t": 0}', 7) == row_id("response", "p1", 0, "model", '{"t": 0}', 7)


def test_row_id_changes_with_any_part():
    base = ["response", "p1", 0, "model", '{"t": 0}', 7]
    ref = row_id(*base)
    variants = [
        ["critique", "p1", 0, "model", '{"t": 0}', 7],
        ["response", "p2", 0, "model", '{"t": 0}', 7],
        ["response", "p1", 1, "model", '{"t": 0}', 7],
        ["response", "p1", 0, "model2", '{"t": 0}', 7],
        ["response", "p1", 0, "model", '{"t": 1}', 7],
        ["response", "p1", 0, "model", '{"t": 0}', 8],
        ["response", "p1", 0, "model", '{"t": 0}'],  # a part fewer
        ["response", "p1", 0, "model", '{"t": 0}', 7, None],  # a part more
        ["p1", "response", 0, "model", '{"t": 0}', 7],  # order matters
        ["response", "p1", "0", "model", '{"t": 0}', 7],  # 0 vs "0"
    ]
    ids = [row_id(*v) for v in variants]
    assert ref not in ids
    assert len(set(ids)) == len(ids)


def test_row_id_parts_do_not_run_together():
    # Joining by a plain separator would make these collide.
    assert row_id("ab", "c") != row_id("a", "bc")
    assert row_id("a:b") != row_id("a", "b")


# ---- insert --------------------------------------------------------------------------------------------

def test_insert_returns_number_added(store):
    rows = [_prompt(f"prompt {i}") for i in range(5)]
    assert store.insert("prompts", rows) == 5
    assert store.count("prompts") == 5


def test_insert_is_idempotent(store):
    rows = [_prompt(f"prompt {i}") for i in range(5)]
    store.insert("prompts", rows)
    assert store.insert("prompts", rows) == 0
    assert store.count("prompts") == 5


def test_insert_adds_only_new_rows_and_keeps_existing(store):
    store.insert("prompts", [_prompt("a"), _prompt("b")])
    changed = _prompt("b")
    changed["source"] = "changed"  # same id: ignored, not overwritten
    assert store.insert("prompts", [changed, _prompt("c")]) == 1
    assert store.count("prompts") == 3
    src = store.query("SELECT source FROM prompts WHERE prompt_id = ?", [row_id("prompt", "b")])
    assert src == [{"source": "test"}]


def test_insert_empty_list_adds_nothing(store):
    assert store.insert("prompts", []) == 0
    assert store.count("prompts") == 0


def test_insert_with_duplicate_ids_in_one_batch(store):
    assert store.insert("prompts", [_prompt("same"), _prompt("same"), _prompt("other")]) == 2
    assert store.count("prompts") == 2


def test_insert_rolls_back_a_failing_batch(store):
    good = _prompt("good")
    bad = _prompt("bad")
    bad["text"] = None  # violates NOT NULL
    with pytest.raises(Exception):
        store.insert("prompts", [good, bad])
    assert store.count("prompts") == 0
    # The store is still usable afterwards.
    assert store.insert("prompts", [good]) == 1


def test_insert_keeps_columns_that_only_later_rows_have(store):
    # Rows of one batch need not carry the same keys (e.g. a 'skipped' row has no text); a column missing
    # from the first row must not be dropped for the others.
    first = _response("r1", status="skipped")
    del first["text"]
    second = _response("r2", status="ok", text="kept text")
    assert store.insert("responses", [first, second]) == 2
    rows = {r["response_id"]: r for r in store.query("SELECT response_id, text FROM responses")}
    assert rows["r1"]["text"] is None
    assert rows["r2"]["text"] == "kept text"


# ---- reads -----------------------------------------------------------------------------------------------

def test_missing_ids_returns_exactly_absent_ids(store):
    present = [_prompt(t) for t in ("a", "b", "c")]
    store.insert("prompts", present)
    ids = [r["prompt_id"] for r in present]
    absent = [row_id("prompt", "x"), row_id("prompt", "y")]
    assert store.missing_ids("prompts", ids + absent) == set(absent)
    assert store.missing_ids("prompts", ids) == set()
    assert store.missing_ids("prompts", []) == set()


def test_missing_ids_on_empty_table(store):
    assert store.missing_ids("responses", ["a", "b"]) == {"a", "b"}


def test_pending_ids_are_missing_ids_plus_rows_skipped_under_a_smaller_context(store):
    skipped = lambda rid, limit: {**_response(rid, status="skipped"), "max_model_len": limit,
                                  "reason": f"prompt_too_long: 900 prompt tokens + 64 new tokens > max_model_len {limit}"}
    store.insert("responses", [_response("ok"), _response("failed", status="failed"), skipped("s512", 512),
                               skipped("s1024", 1024), {**skipped("old", 512), "max_model_len": None}])
    ids = ["ok", "failed", "s512", "s1024", "old", "new"]
    assert store.pending_ids("responses", ids, 1024) == ({"new"}, {"s512", "old"})
    assert store.pending_ids("responses", ids, 512) == ({"new"}, set())
    assert store.pending_ids("responses", ids, 4096) == ({"new"}, {"s512", "s1024", "old"})
    assert store.pending_ids("responses", [], 4096) == (set(), set())


def test_fetch_by_ids_with_where_clause(store):
    store.insert("responses", [_response("r1", "ok"), _response("r2", "failed"), _response("r3", "ok"),
                               _response("r4", "ok")])
    got = store.fetch_by_ids("responses", ["r1", "r2", "r3", "nope"], where="t.status = 'ok'")
    assert sorted(r["response_id"] for r in got) == ["r1", "r3"]
    everything = store.fetch_by_ids("responses", ["r1", "r2", "r3", "nope"])
    assert sorted(r["response_id"] for r in everything) == ["r1", "r2", "r3"]
    assert store.fetch_by_ids("responses", []) == []


def test_lookups_bounded_by_prompt_ids_see_only_those_prompts_rows(store):
    """`prompts=(lo, hi)`: the page's rows are looked up among its prompts' rows only (the range is what lets DuckDB
    skip the rest of the table); a row of a prompt outside the range counts as not stored."""
    store.insert("responses", [{**_response("ra"), "prompt_id": "pa"}, {**_response("rc"), "prompt_id": "pc"},
                               {**_response("rq"), "prompt_id": "p'q"}])
    assert store.pending_ids("responses", ["ra", "rc", "rx"], 2048, prompts=("pa", "pc")) == ({"rx"}, set())
    assert store.pending_ids("responses", ["ra", "rc"], 2048, prompts=("pb", "pc")) == ({"ra"}, set())
    assert [r["response_id"] for r in store.fetch_by_ids("responses", ["ra", "rc"], prompts=("pa", "pb"))] == ["ra"]
    assert [r["response_id"] for r in store.fetch_by_ids("responses", ["rq"], prompts=("p'q", "p'q"))] == ["rq"]


def test_fetch_by_ids_returns_full_rows(store):
    store.insert("responses", [_response("r1", text="hello")])
    (row,) = store.fetch_by_ids("responses", ["r1"])
    assert row["text"] == "hello" and row["stage"] == "generate" and row["status"] == "ok"


# ---- runs -------------------------------------------------------------------------------------------------

def test_start_and_finish_run(store):
    run = store.start_run("pipe", "run", {"a": 1}, "pipelines/x.yaml")
    (row,) = store.query("SELECT * FROM runs WHERE run_id = ?", [run])
    assert row["status"] == "running" and row["name"] == "pipe" and row["finished_at"] is None
    store.finish_run(run, "done", "all good", {"rows": 3})
    (row,) = store.query("SELECT * FROM runs WHERE run_id = ?", [run])
    assert row["status"] == "done"
    assert row["message"] == "all good"
    assert row["finished_at"] is not None and row["finished_at"] >= row["started_at"]


def test_resolve_run_latest_and_by_id(store):
    first = store.start_run("a", "run", {}, None)
    second = store.start_run("b", "run", {}, None)
    assert first != second
    assert store.resolve_run("latest") == second
    assert store.resolve_run(first) == first
    with pytest.raises(ValueError, match="not found"):
        store.resolve_run("no-such-run")


def test_resolve_run_latest_on_empty_store(store):
    with pytest.raises(ValueError, match="no runs"):
        store.resolve_run("latest")


def test_config_hash_follows_config(store):
    a = store.start_run("x", "run", {"k": 1}, None)
    b = store.start_run("x", "run", {"k": 1}, None)
    c = store.start_run("x", "run", {"k": 2}, None)
    h = {r["run_id"]: r["config_hash"] for r in store.query("SELECT run_id, config_hash FROM runs")}
    assert h[a] == h[b] != h[c]


# ---- files and locking -----------------------------------------------------------------------------------

def test_reopening_keeps_rows(tmp_path):
    path = tmp_path / "sub" / "persist.duckdb"
    with Store.open(path) as s:
        s.insert("prompts", [_prompt("kept 1"), _prompt("kept 2")])
        run = s.start_run("p", "run", {}, None)
    with Store.open(path) as s:
        assert s.count("prompts") == 2
        assert s.resolve_run("latest") == run
        assert s.insert("prompts", [_prompt("kept 1")]) == 0
    with Store.open(path, read_only=True) as s:
        assert s.count("prompts") == 2


def test_open_read_only_missing_file_is_clear(tmp_path):
    path = tmp_path / "missing.duckdb"
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Store.open(path, read_only=True)
    assert not path.exists()


def test_second_process_gets_store_locked_error(tmp_path):
    path = tmp_path / "locked.duckdb"
    holder = Store.open(path)
    try:
        snippet = (
            "import sys\n"
            "from factory.store import Store, StoreLockedError\n"
            "try:\n"
            "    Store.open(sys.argv[1])\n"
            "except StoreLockedError as e:\n"
            "    print('LOCKED', e)\n"
            "else:\n"
            "    print('OPENED')\n"
        )
        res = subprocess.run([sys.executable, "-c", snippet, str(path)], capture_output=True, text=True,
                             timeout=30, cwd=REPO)
    finally:
        holder.close()
    out = res.stdout.strip()
    assert res.returncode == 0, res.stderr
    assert out.startswith("LOCKED"), out + res.stderr
    assert str(path) in out
    assert "process" in out
    assert f"process {os.getpid()}" in out  # names the holder: this test process


def test_a_store_from_before_fingerprints_and_conversations_is_migrated(tmp_path):
    """Stores written before model fingerprints, reasoning traces and conversations open and take new rows:
    the missing columns are added on open, the old rows are kept."""
    path = tmp_path / "old.duckdb"
    with Store.open(path) as s:
        s.insert("prompts", [{"prompt_id": "p", "text": "old prompt"}])
        for table in ("responses", "critiques", "revisions", "judgments"):
            s.run_sql(f"ALTER TABLE {table} DROP COLUMN model_fingerprint")
            s.run_sql(f"ALTER TABLE {table} DROP COLUMN reasoning")
            s.run_sql(f"ALTER TABLE {table} DROP COLUMN max_model_len")
        s.run_sql("ALTER TABLE prompts DROP COLUMN messages")
    with Store.open(path) as s:
        cols = {r[0] for r in s.run_sql("SELECT column_name FROM duckdb_columns() WHERE table_name = 'responses'")}
        assert {"model_fingerprint", "reasoning", "max_model_len"} <= cols
        s.insert("prompts", [{"prompt_id": "q", "text": "new", "messages": '[{"role":"user","content":"new"}]'}])
        assert {r["prompt_id"] for r in s.query("SELECT prompt_id FROM prompts")} == {"p", "q"}


def test_row_id_is_the_sha256_of_the_parts_as_sorted_json():
    """Ids of existing stores must never change: the id is sha256(json.dumps(parts, sort_keys, default=str,
    ensure_ascii=False))[:24], whatever encoder computes it."""
    import datetime
    import hashlib
    import json

    from factory.store import row_id

    for parts in [("response", "abc", 0, "fp:x", '{"a": 1}', 3, "th"), ("x", {"b": [1, 2], "a": "é"}, None, 1.5),
                  (datetime.datetime(2020, 1, 1), "ü\u2028\"quoted\"")]:
        want = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False).encode()).hexdigest()
        assert row_id(*parts) == want[:24]
