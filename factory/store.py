"""The DuckDB store: batched idempotent writes, reads by id and by page, and the single-writer rule.

Tables: runs, prompts, responses, critiques, revisions, preference_pairs and the judge's, defined in
factory/store_schema.py (re-exported here); run records and `factory status` are in factory/store_runs.py. Row ids
are content hashes of a row's inputs (see `row_id`), so inserting a row that exists is a no-op and re-running a stage
skips finished work. Every model-written row carries the same lineage columns (`GEN_COLUMNS`).
Writes go in one transaction per batch from an Arrow table, never row by row.

One writer, many readers, while a run goes on. A writer holds `<store>.lock` (an flock, with its pid and host in
the file) for as long as its `Store` is open: that is the one-writer rule. It keeps the DuckDB file open between
commits, but lets go of it when a reader asks: a reader (`factory status`, `judge-report`, `export`) that finds the
file held touches `<store>.lock.read` and retries for up to `READ_WAIT_S`; the writer notices at its next safe point
(a commit, or the start of a model call: `Store.release`), or, while it waits on a model, a watcher thread does,
closes the file (DuckDB checkpoints on close, so the reader sees every committed batch) and opens it again a
moment later (`READER_GRACE_S`). Nobody watching costs one `stat` per commit.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from factory.store_lock import (  # noqa: F401 - StoreLockedError and the waits are re-exported
    READER_GRACE_S, READ_WAIT_S, REOPEN_WAIT_S, WATCH_INTERVAL_S, StoreLockedError, _connect, _read_request_path,
    _WriterLock)
from factory.store_runs import RunRecords
from factory.store_schema import (  # noqa: F401 - the schema's names are re-exported
    ADDED_COLUMNS, DDL, GEN_COLUMNS, ID_COLUMN, SCHEMA_VERSION, TABLES)



# One encoder for every id: json.dumps with these options builds a new JSONEncoder per call (~40% of an id's cost).
_ID_ENCODER = json.JSONEncoder(sort_keys=True, default=str, ensure_ascii=False)


def row_id(*parts) -> str:
    """Content hash of a row's inputs: the same inputs always give the same id."""
    payload = _ID_ENCODER.encode(parts)  # = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored as naive UTC


def within(table: str, prompts: tuple[str, str] | None) -> str:
    """SQL for `table`, or only its rows of prompts between the two prompt ids given. Every stage writes its rows
    page by page in prompt-id order, so each table is laid out by prompt id and DuckDB skips the row groups outside
    the range (min/max statistics): a page's lookups cost what the page holds, not what the table holds (a
    million-prompt run would otherwise scan every table once per page). The bounds are SQL literals, quoted."""
    if prompts is None:
        return table
    lo, hi = (p.replace("'", "''") for p in prompts)
    return f"(SELECT * FROM {table} WHERE prompt_id BETWEEN '{lo}' AND '{hi}')"


class Store(RunRecords):
    """One DuckDB store. Open it with `Store.open(path)`; close it (or use `with`).

    A writer keeps the store's lock file for its whole life, and the DuckDB file too unless a reader asks for it
    (see the module docstring): `release()` marks a safe point, `con` opens the file again when needed."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection | None, read_only: bool,
                 lock: _WriterLock | None = None):
        self.path, self._con, self.read_only, self._lock = path, con, read_only, lock
        self._closed = False
        self.reopens = 0  # times a writer opened the file again after letting go of it for a reader
        self._mutex = threading.Lock()
        self._idle = False  # at a safe point (no transaction or registered table pending): may be closed
        self._request = _read_request_path(path)
        self._served = self._request_mtime()
        self._let_go_at = 0.0
        self._watcher = None
        if not read_only:
            self._watcher = threading.Thread(target=self._watch, name="factory-store-watcher", daemon=True)
            self._watcher.start()

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False) -> "Store":
        path = Path(path)
        if read_only:
            if not path.exists():
                raise FileNotFoundError(f"store {path} does not exist yet; run a pipeline first (factory run ...)")
            return cls(path, _connect(path, True, READ_WAIT_S), True)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = _WriterLock(path)
        lock.acquire()
        try:
            store = cls(path, _connect(path, False, READ_WAIT_S), False, lock)
        except BaseException:
            lock.release()
            raise
        try:
            store.migrate()
            store.release()
        except BaseException:
            store.close()
            raise
        return store

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        with self._mutex:
            self._idle = False
            if self._con is None:
                if self._closed:
                    raise RuntimeError(f"store {self.path} is closed")
                wait = READER_GRACE_S - (time.monotonic() - self._let_go_at)
                if wait > 0:  # let the reader that asked get in first
                    time.sleep(wait)
                self._con = _connect(self.path, self.read_only, REOPEN_WAIT_S)
                self.reopens += 1
                self._served = max(self._served, self._request_mtime())  # asks made while we let go are served
            return self._con

    def _request_mtime(self) -> int:
        try:
            return os.stat(self._request).st_mtime_ns
        except OSError:
            return 0

    def _let_go_if_asked(self) -> None:
        """With the mutex held, at a safe point: close the file if a reader asked since the last time."""
        asked = self._request_mtime()
        if asked > self._served:
            self._served = asked
            if self._con is not None:
                self._con.close()  # checkpoints: the reader sees every committed batch
                self._con = None
                self._let_go_at = time.monotonic()

    def release(self) -> None:
        """A safe point of a writer (after a commit, before a model call; never inside a transaction or while a
        registered table is in use): let go of the DuckDB file if a reader asked, and let the watcher thread do
        so later while this process is busy elsewhere (in a model call). Readers keep theirs (they are short)."""
        if self.read_only:
            return
        with self._mutex:
            self._idle = True
            self._let_go_if_asked()

    def _watch(self) -> None:
        while not self._closed:
            time.sleep(WATCH_INTERVAL_S)
            with self._mutex:
                if self._idle and self._con is not None and not self._closed:
                    self._let_go_if_asked()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        with self._mutex:
            if self._con is not None:
                self._con.close()
                self._con = None
            if not self._closed and self._lock is not None:
                self._lock.release()
            self._closed = True

    def run_sql(self, sql: str, params: list | None = None) -> list[tuple]:
        # DuckDB 2 refuses new work while a result is unfinished, so every statement is fetched to the end.
        return self.con.execute(sql, params or []).fetchall()

    def migrate(self):
        for ddl in DDL:
            self.run_sql(ddl)
        for tables, column in ADDED_COLUMNS:
            for table in tables:
                self.run_sql(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {column}")
        rows = self.run_sql("SELECT value FROM meta WHERE key='schema_version'")
        row = rows[0] if rows else None
        if row is None:
            self.run_sql("INSERT INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)])
        elif int(row[0]) > SCHEMA_VERSION:
            raise RuntimeError(f"store {self.path} has schema version {row[0]}, newer than this factory "
                               f"({SCHEMA_VERSION}); upgrade factory")
        self._rehash_scopes()

    def _rehash_scopes(self) -> None:
        """Recompute every run's scope hash from its stored config when the rule (SCOPE_RULE) changed, so a new run
        joins the family of runs recorded under the old rule. Once per store and rule; the runs table is small."""
        from factory.run_scope import SCOPE_RULE, scope_hash

        if self.run_sql("SELECT 1 FROM meta WHERE key = 'scope_rule' AND value = ?", [SCOPE_RULE]):
            return
        rows = self.run_sql("SELECT run_id, kind, config FROM runs")
        self.run_sql("BEGIN")
        try:
            for run_id, kind, cfg in rows:
                if cfg:
                    self.run_sql("UPDATE runs SET scope_hash = ? WHERE run_id = ?",
                                 [scope_hash(kind, json.loads(cfg)), run_id])
            self.run_sql("INSERT OR REPLACE INTO meta VALUES ('scope_rule', ?)", [SCOPE_RULE])
            self.run_sql("COMMIT")
        except Exception:
            self.run_sql("ROLLBACK")
            raise

    # ---- writes -------------------------------------------------------------------------------------
    def insert(self, table: str, rows: list[dict], replace: bool = False, progress: dict | None = None) -> int:
        """Insert rows in one transaction; rows whose id exists already are skipped (or replaced, for
        derived rows such as AI-feedback pairs). Returns rows added. `progress`: the stage's `run_progress` row,
        written in the same transaction. A writer releases the file after the commit."""
        if not rows:
            if progress:
                self.record_progress(progress)
            return 0
        # Arrow takes its columns from the first row; rows of one batch may carry different keys
        # (a skipped row has no output), so give every row the union of keys.
        keys = list(dict.fromkeys(k for r in rows for k in r))
        batch = pa.table({k: [r.get(k) for r in rows] for k in keys})  # by column: ~4x faster than from_pylist
        before = self.count(table) if replace else None  # INSERT OR REPLACE counts replaced rows as inserted
        self.run_sql("BEGIN")
        try:
            self.con.register("_batch", batch)
            inserted = self.run_sql(
                f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO {table} BY NAME SELECT * FROM _batch")[0][0]
            self.con.unregister("_batch")
            if progress:
                self._write_progress(progress)
            self.run_sql("COMMIT")
        except Exception:
            self.run_sql("ROLLBACK")
            raise
        added = self.count(table) - before if replace else inserted  # OR IGNORE reports the rows it inserted
        self.release()
        return added

    def _write_progress(self, p: dict) -> None:
        cols = ("run_id", "stage", "model_id", "wanted", "stored_before", "done", "seconds", "started_at",
                "updated_at")
        self.run_sql(f"INSERT OR REPLACE INTO run_progress ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
                     [p.get(c) for c in cols])

    def record_progress(self, progress: dict) -> None:
        """Write a stage's `run_progress` row alone (a stage starting, or a batch that wrote nothing)."""
        self._write_progress(progress)
        self.release()

    # ---- reads --------------------------------------------------------------------------------------
    def count(self, table: str) -> int:
        return self.run_sql(f"SELECT count(*) FROM {table}")[0][0]

    def missing_ids(self, table: str, ids: list[str]) -> set[str]:
        """Ids not yet in `table`: an anti-join in DuckDB."""
        if not ids:
            return set()
        self.con.register("_want", pa.table({"id": ids}))
        try:
            rows = self.run_sql(
                f"SELECT w.id FROM _want w ANTI JOIN {table} t ON t.{ID_COLUMN[table]} = w.id")
        finally:
            self.con.unregister("_want")
        return {r[0] for r in rows}

    def pending_ids(self, table: str, ids: list[str], max_model_len: int,
                    prompts: tuple[str, str] | None = None) -> tuple[set[str], set[str]]:
        """(missing, retry): ids not yet in `table`, and ids stored as 'skipped' (prompt too long for the
        context) under a smaller max_model_len than `max_model_len`, which may fit now. One anti-join.
        Rows skipped before the column existed carry their limit only in the reason text. `prompts`: the
        (lowest, highest) prompt id of the rows asked for (see `within`)."""
        if not ids:
            return set(), set()
        self.con.register("_want", pa.table({"id": ids}))
        try:
            rows = self.run_sql(
                f"""SELECT w.id, t.{ID_COLUMN[table]} IS NOT NULL FROM _want w
                    LEFT JOIN {within(table, prompts)} t ON t.{ID_COLUMN[table]} = w.id
                    WHERE t.{ID_COLUMN[table]} IS NULL
                       OR (t.status = 'skipped' AND coalesce(t.max_model_len, TRY_CAST(regexp_extract(
                           t.reason, 'max_model_len (\\d+)', 1) AS INTEGER)) < ?)""", [max_model_len])
        finally:
            self.con.unregister("_want")
        return {i for i, stored in rows if not stored}, {i for i, stored in rows if stored}

    def input_keys(self, keys_sql: str, params: dict) -> pa.Table:
        """The keys of a stage's input rows (`id`, `prompt_id`, sorted by prompt id), read once as Arrow columns
        (~56 MB per million rows, not Python objects): the pages of its keyset pagination (`read_chunk`)."""
        used = {k: v for k, v in params.items() if f"${k}" in keys_sql}
        return self.con.sql(keys_sql, params=used or None).to_arrow_table().select(["id", "prompt_id"])

    def read_chunk(self, rows_sql: str, keys: pa.Table, params: dict) -> list[dict]:
        """One page of a stage's input: `rows_sql` with the page's keys registered as `_chunk(id, prompt_id)` and
        its lowest and highest prompt id as $lo and $hi (one semi-join, whatever the page holds)."""
        prompt_ids = keys.column("prompt_id")
        params = {**params, "lo": prompt_ids[0].as_py(), "hi": prompt_ids[-1].as_py()}
        self.con.register("_chunk", keys)
        try:
            return self.query(rows_sql, {k: v for k, v in params.items() if f"${k}" in rows_sql})
        finally:
            self.con.unregister("_chunk")

    def fetch_by_ids(self, table: str, ids: list[str], where: str = "TRUE",
                     prompts: tuple[str, str] | None = None) -> list[dict]:
        """Rows of `table` with these ids (and `where`); `prompts`: their (lowest, highest) prompt id (`within`)."""
        if not ids:
            return []
        self.con.register("_want", pa.table({"id": ids}))
        try:
            return self.query(f"SELECT t.* FROM {within(table, prompts)} t SEMI JOIN _want w "
                              f"ON t.{ID_COLUMN[table]} = w.id WHERE {where}")
        finally:
            self.con.unregister("_want")

    def query(self, sql: str, params: list | None = None) -> list[dict]:
        cur = self.con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def _has(self, table: str, column: str | None = None) -> bool:
        """Whether the table (and column) exists: a reader cannot migrate a store written by an older factory."""
        sql = "SELECT count(*) FROM information_schema.columns WHERE table_name = ?"
        params = [table]
        if column:
            sql += " AND column_name = ?"
            params.append(column)
        return self.run_sql(sql, params)[0][0] > 0
