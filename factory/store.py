"""The DuckDB store: schema, batched idempotent writes, run records, and the single-writer rule.

Tables: runs, prompts, responses, critiques, revisions, preference_pairs. Row ids are content hashes
of a row's inputs (see `row_id`), so inserting a row that exists is a no-op and re-running a stage skips
finished work. Every model-written row carries the same lineage columns (`GEN_COLUMNS`).
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
import uuid
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

from factory.store_lock import (  # noqa: F401 - StoreLockedError and the waits are re-exported
    READER_GRACE_S, READ_WAIT_S, REOPEN_WAIT_S, WATCH_INTERVAL_S, StoreLockedError, _connect, _read_request_path,
    _WriterLock)

SCHEMA_VERSION = 1

GEN_COLUMNS = """
    run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, model_id VARCHAR, engine VARCHAR, sampling JSON,
    seed BIGINT, template_hash VARCHAR, constitution_id VARCHAR, constitution_version VARCHAR,
    principle_id VARCHAR, prompt_tokens INTEGER, output_tokens INTEGER, finish_reason VARCHAR,
    raw_output VARCHAR, text VARCHAR, status VARCHAR NOT NULL, reason VARCHAR, created_at TIMESTAMP,
    model_fingerprint VARCHAR, reasoning VARCHAR, max_model_len INTEGER
"""
# Columns added after the first stores were written: (table(s), column definition), added on open.
ADDED_COLUMNS = [(("responses", "critiques", "revisions", "judgments"), "model_fingerprint VARCHAR"),
                 (("responses", "critiques", "revisions", "judgments"), "reasoning VARCHAR"),
                 (("prompts",), "messages JSON"),
                 (("runs",), "scope_hash VARCHAR"),
                 # The context length a row was written under: a 'skipped' row (prompt too long) is pending
                 # again once a run's max_model_len is larger (see `pending_ids`).
                 (("responses", "critiques", "revisions", "judgments"), "max_model_len INTEGER"),
                 # the run's process, so `status` can tell a live run from a killed one (factory/lifetime.py)
                 (("runs",), "pid INTEGER"), (("runs",), "hostname VARCHAR"), (("runs",), "process_started DOUBLE"),
                 # why a text was flagged: 'ngram' or 'short_item' (factory/decontam.py)
                 (("contamination",), "kind VARCHAR")]

DDL = [
    "CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
    """CREATE TABLE IF NOT EXISTS runs (
        run_id VARCHAR PRIMARY KEY, name VARCHAR, kind VARCHAR, config_path VARCHAR, config JSON,
        config_hash VARCHAR, scope_hash VARCHAR, status VARCHAR, message VARCHAR, factory_version VARCHAR,
        stats JSON, started_at TIMESTAMP, finished_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS prompts (
        prompt_id VARCHAR PRIMARY KEY, text VARCHAR NOT NULL, source VARCHAR, source_id VARCHAR,
        meta JSON, run_id VARCHAR, created_at TIMESTAMP, messages JSON)""",
    f"""CREATE TABLE IF NOT EXISTS responses (
        response_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, sample_index INTEGER, {GEN_COLUMNS})""",
    f"""CREATE TABLE IF NOT EXISTS critiques (
        critique_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, response_id VARCHAR NOT NULL,
        parent_id VARCHAR NOT NULL, round INTEGER NOT NULL, {GEN_COLUMNS})""",
    f"""CREATE TABLE IF NOT EXISTS revisions (
        revision_id VARCHAR PRIMARY KEY, prompt_id VARCHAR NOT NULL, response_id VARCHAR NOT NULL,
        parent_id VARCHAR NOT NULL, critique_id VARCHAR NOT NULL, round INTEGER NOT NULL, {GEN_COLUMNS})""",
    """CREATE TABLE IF NOT EXISTS preference_pairs (
        pair_id VARCHAR PRIMARY KEY, run_id VARCHAR NOT NULL, prompt_id VARCHAR NOT NULL, source VARCHAR,
        chosen_id VARCHAR, chosen_stage VARCHAR, chosen_text VARCHAR,
        rejected_id VARCHAR, rejected_stage VARCHAR, rejected_text VARCHAR,
        round INTEGER, principle_id VARCHAR, constitution_id VARCHAR, constitution_version VARCHAR,
        label DOUBLE, margin DOUBLE, dropped_reason VARCHAR, created_at TIMESTAMP)""",
    # One judge call: a comparison of candidates x and y under one principle, in one order ("xy": x is (A)).
    f"""CREATE TABLE IF NOT EXISTS judgments (
        judgment_id VARCHAR PRIMARY KEY, comparison_id VARCHAR NOT NULL, prompt_id VARCHAR NOT NULL,
        candidate_x VARCHAR NOT NULL, candidate_y VARCHAR NOT NULL, answer_order VARCHAR NOT NULL,
        mode VARCHAR NOT NULL, attempt INTEGER NOT NULL, logprob_a DOUBLE, logprob_b DOUBLE, p_a DOUBLE,
        p_x DOUBLE, {GEN_COLUMNS})""",
    # Both orders of one comparison, averaged: p_x is P(x is better); the label of the comparison.
    """CREATE TABLE IF NOT EXISTS comparisons (
        comparison_id VARCHAR PRIMARY KEY, run_id VARCHAR, prompt_id VARCHAR, candidate_x VARCHAR,
        candidate_y VARCHAR, source VARCHAR, principle_id VARCHAR, constitution_id VARCHAR,
        constitution_version VARCHAR, mode VARCHAR, model_id VARCHAR, p_x_xy DOUBLE, p_x_yx DOUBLE,
        p_x DOUBLE, disagreement DOUBLE, consistent BOOLEAN, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS judge_reports (
        run_id VARCHAR PRIMARY KEY, report JSON, created_at TIMESTAMP)""",
    # Per-stage progress of a run, written with each batch it commits: rows wanted (pending when the stage
    # started), rows done since, wall seconds since the stage started. `factory status` derives rows/s and an ETA.
    """CREATE TABLE IF NOT EXISTS run_progress (
        run_id VARCHAR NOT NULL, stage VARCHAR NOT NULL, model_id VARCHAR, wanted BIGINT, stored_before BIGINT,
        done BIGINT, seconds DOUBLE, started_at TIMESTAMP, updated_at TIMESTAMP, PRIMARY KEY (run_id, stage))""",
    # Run membership: every row a run wanted, whether it wrote it or found it stored (written by an earlier run,
    # perhaps with another config). Stages hand off through it (a stage's input is the run's rows of the table
    # before it), and `export --run X` / `publish --run X` contain exactly run X's rows. No primary key: written
    # once per chunk a stage reads, in id order; duplicates (a stage read twice) are harmless to semi-joins.
    "CREATE TABLE IF NOT EXISTS run_rows (run_id VARCHAR NOT NULL, tbl VARCHAR NOT NULL, id VARCHAR NOT NULL)",
    # Stages finished, by definition and inputs' fingerprint: a re-run adopts their rows (factory/stages/reuse.py).
    """CREATE TABLE IF NOT EXISTS stage_runs (stage VARCHAR NOT NULL, definition VARCHAR NOT NULL,
        inputs VARCHAR NOT NULL, run_id VARCHAR NOT NULL, created_at TIMESTAMP, PRIMARY KEY (stage, definition, inputs))""",
    # The guard's flags (factory/guard.py): a response or revision that addresses the judge, the pattern group that
    # matched and the matched text. One row per text (its first match); written by the label and pairs stages.
    """CREATE TABLE IF NOT EXISTS guard_flags (row_id VARCHAR NOT NULL, tbl VARCHAR NOT NULL, pattern VARCHAR,
        span VARCHAR, run_id VARCHAR, created_at TIMESTAMP, PRIMARY KEY (row_id, tbl))""",
    # Judge calibrations on a gold set (factory/calibration.py): model_id is the judge as comparisons.model_id shows
    # it, settings_hash what else the labels depend on (fingerprint, mode, template, sampling, constitution, ensemble).
    """CREATE TABLE IF NOT EXISTS judge_calibrations (calibration_id VARCHAR PRIMARY KEY, model_id VARCHAR,
        gold_path VARCHAR, gold_sha256 VARCHAR, settings_hash VARCHAR, report JSON, created_at TIMESTAMP)""",
    # Benchmark overlap (factory/stages/decontaminate.py): one row per (text, benchmark) flagged by a run; `kind` is
    # 'ngram' (they share a word n-gram) or 'short_item' (the text contains a benchmark item shorter than an n-gram
    # whole; NULL in rows written before short items were checked), `ngram` one shared n-gram or that item (the
    # reason), `hits` how many distinct ones. A pair whose prompt, chosen or rejected text has a row here is left out
    # of export and training (the pair row itself is kept as it is).
    """CREATE TABLE IF NOT EXISTS contamination (row_id VARCHAR NOT NULL, tbl VARCHAR NOT NULL, benchmark VARCHAR NOT NULL,
        ngram VARCHAR, hits INTEGER, run_id VARCHAR NOT NULL, created_at TIMESTAMP, kind VARCHAR,
        PRIMARY KEY (run_id, tbl, row_id, benchmark))""",
]

TABLES = ("prompts", "responses", "critiques", "revisions", "preference_pairs", "judgments", "comparisons")
ID_COLUMN = {"prompts": "prompt_id", "responses": "response_id", "critiques": "critique_id",
             "revisions": "revision_id", "preference_pairs": "pair_id", "runs": "run_id",
             "judgments": "judgment_id", "comparisons": "comparison_id", "judge_reports": "run_id",
             "judge_calibrations": "calibration_id",
             "contamination": "row_id"}


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


class Store:
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

    def start_run(self, name: str, kind: str, config: dict, config_path: str | None) -> str:
        """Record a run. Its scope hash (`scope_hash`) ignores settings that do not change what rows it makes
        (SCOPE_IGNORED and the engine knobs beside it), so a resumed run belongs to the same family as the run it
        resumes."""
        from factory import __version__
        from factory.lifetime import process_identity
        from factory.run_scope import scope_hash

        run_id = f"{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        cfg_json = json.dumps(config, sort_keys=True)
        me = process_identity()
        self.run_sql(
            "INSERT INTO runs (run_id, name, kind, config_path, config, config_hash, scope_hash, status, "
            "factory_version, started_at, pid, hostname, process_started) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?)",
            [run_id, name, kind, config_path, cfg_json, row_id(cfg_json), scope_hash(kind, config), __version__, now(),
             me["pid"], me["hostname"], me["process_started"]])
        self.release()
        return run_id

    def run_family(self, run_id: str) -> list[str]:
        """This run and the earlier runs of the same pipeline it resumed or repeated: together they wrote
        every row of its pipeline (a resumed run writes only what was missing)."""
        return [r[0] for r in self.run_sql(
            """SELECT r.run_id FROM runs r, runs me WHERE me.run_id = ? AND r.scope_hash = me.scope_hash
               AND r.started_at <= me.started_at ORDER BY r.started_at""", [run_id])]

    def finish_run(self, run_id: str, status: str, message: str = "", stats: dict | None = None):
        self.run_sql("UPDATE runs SET status=?, message=?, stats=?, finished_at=? WHERE run_id=?",
                         [status, message, json.dumps(stats or {}), now(), run_id])
        self.release()

    def add_members(self, run_id: str, table: str, ids) -> None:
        """Record that run `run_id` wants these rows of `table` (a list or an Arrow array of ids)."""
        if len(ids) == 0:
            return
        self.con.register("_members", pa.table({"id": ids}))
        try:
            self.run_sql("INSERT INTO run_rows SELECT ?, ?, id FROM _members", [run_id, table])
        finally:
            self.con.unregister("_members")

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

    def resolve_run(self, run: str, kind: str | None = None) -> str:
        """A run id from a run id or 'latest': the latest run of `kind` (e.g. 'pipeline': export, publish and
        training data want the latest pipeline run, not a later train or eval run), or of any kind."""
        if run == "latest":
            rows = self.run_sql("SELECT run_id FROM runs WHERE ? IS NULL OR kind = ? ORDER BY started_at DESC LIMIT 1",
                                [kind, kind])
            if not rows:
                if kind == "pipeline":
                    raise ValueError(f"store {self.path} has no pipeline runs yet: run a pipeline first (factory run "
                                     "pipelines/quickstart.yaml), or name a run with --run (factory status lists them)")
                raise ValueError(f"store {self.path} has no {kind + ' ' if kind else ''}runs yet")
            return rows[0][0]
        if not self.run_sql("SELECT 1 FROM runs WHERE run_id=?", [run]):
            raise ValueError(f"run {run!r} not found in {self.path}; `factory status` lists the runs")
        return run

    def has_members(self, run_id: str) -> bool:
        """Whether the run's membership is recorded in run_rows (stores written before run_rows have none)."""
        return self._has("run_rows") and bool(self.run_sql("SELECT 1 FROM run_rows WHERE run_id = ? LIMIT 1", [run_id]))

    def run_scope(self, runs: list[str], kind: str | None = "pipeline"):
        """The rows of `runs` (run ids or 'latest', the latest run of `kind`); see factory.run_scope.RunScope. No
        runs: every row."""
        from factory.run_scope import RunScope

        resolved = list(dict.fromkeys(self.resolve_run(r, kind) for r in runs))
        members = [r for r in resolved if self.has_members(r)]
        families = list(dict.fromkeys(f for r in resolved if r not in members for f in self.run_family(r)))
        return RunScope(resolved, members, families)

    def _has(self, table: str, column: str | None = None) -> bool:
        """Whether the table (and column) exists: a reader cannot migrate a store written by an older factory."""
        sql = "SELECT count(*) FROM information_schema.columns WHERE table_name = ?"
        params = [table]
        if column:
            sql += " AND column_name = ?"
            params.append(column)
        return self.run_sql(sql, params)[0][0] > 0

    def status(self) -> dict:
        """Counts per table and per run (rows written by that run), the runs themselves (a `running` run whose
        process is gone shows as `interrupted`), and per-stage progress of the latest run (or the running ones)."""
        from factory.lifetime import process_alive

        counts = {t: self.count(t) for t in TABLES}
        per_run = {}
        for t in TABLES:
            status_col = "NULL" if t in ("prompts", "preference_pairs", "comparisons") else "status"
            for run_id, status, n in self.run_sql(f"SELECT run_id, {status_col}, count(*) FROM {t} GROUP BY ALL"):
                per_run.setdefault(run_id, {}).setdefault(t, {})[status or "ok"] = n
        who = "pid, hostname, process_started" if self._has("runs", "pid") else \
            "NULL AS pid, NULL AS hostname, NULL AS process_started"
        runs = self.query(f"SELECT run_id, name, kind, status, message, started_at, finished_at, {who} FROM runs "
                          "ORDER BY started_at")
        for r in runs:
            if r["status"] == "running":
                alive = process_alive(r["pid"], r["hostname"], r["process_started"])
                if alive is False:
                    r["status"] = "interrupted"
                    r["message"] = f"its process ({r['pid']} on {r['hostname']}) is gone; run again to resume"
        watched = [r for r in runs if r["status"] == "running"] or runs[-1:]
        progress = {r["run_id"]: self.run_progress(r["run_id"], r["status"] == "running") for r in watched}
        return {"path": str(self.path), "counts": counts, "per_run": per_run, "runs": runs, "progress": progress}

    def run_progress(self, run_id: str, running: bool = False) -> list[dict]:
        """Per stage of a run, in the order they started: done, pending, rows/s (rows done over the stage's wall
        seconds so far) and, for a running run, an ETA in seconds at that rate."""
        if not self._has("run_progress"):
            return []
        out = []
        for p in self.query("SELECT * FROM run_progress WHERE run_id = ? ORDER BY started_at, stage", [run_id]):
            pending = max(0, (p["wanted"] or 0) - (p["done"] or 0))
            rate = p["done"] / p["seconds"] if p["seconds"] and p["done"] else None
            eta = (pending / rate if rate else None) if running else None
            out.append({"stage": p["stage"], "model": p["model_id"], "done": p["done"], "pending": pending,
                        "wanted": p["wanted"], "stored_before": p["stored_before"], "seconds": p["seconds"],
                        "rows_per_s": rate, "eta_s": 0.0 if running and pending == 0 else eta,
                        "updated_at": p["updated_at"]})
        return out
