"""The DuckDB store: schema, batched idempotent writes, run records, and the single-writer rule.

Tables: runs, prompts, responses, critiques, revisions, preference_pairs. Row ids are content hashes
of a row's inputs (see `row_id`), so inserting a row that exists is a no-op and re-running a stage skips
finished work. Every model-written row carries the same lineage columns (`GEN_COLUMNS`).
Writes go in one transaction per batch from an Arrow table, never row by row.
"""

from __future__ import annotations

import hashlib
import json
import re
import uuid
from datetime import datetime, timezone
from pathlib import Path

import duckdb
import pyarrow as pa

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
                 (("responses", "critiques", "revisions", "judgments"), "max_model_len INTEGER")]

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
]

TABLES = ("prompts", "responses", "critiques", "revisions", "preference_pairs", "judgments", "comparisons")
ID_COLUMN = {"prompts": "prompt_id", "responses": "response_id", "critiques": "critique_id",
             "revisions": "revision_id", "preference_pairs": "pair_id", "runs": "run_id",
             "judgments": "judgment_id", "comparisons": "comparison_id", "judge_reports": "run_id"}


class StoreLockedError(RuntimeError):
    """Another process holds the store for writing."""


def row_id(*parts) -> str:
    """Content hash of a row's inputs: the same inputs always give the same id."""
    payload = json.dumps(parts, sort_keys=True, default=str, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def now() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)  # stored as naive UTC


class Store:
    """One open DuckDB file. Open it with `Store.open(path)`; close it (or use `with`)."""

    def __init__(self, path: Path, con: duckdb.DuckDBPyConnection, read_only: bool):
        self.path, self.con, self.read_only = path, con, read_only

    @classmethod
    def open(cls, path: str | Path, read_only: bool = False) -> "Store":
        path = Path(path)
        if read_only and not path.exists():
            raise FileNotFoundError(f"store {path} does not exist yet; run a pipeline first (factory run ...)")
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            con = duckdb.connect(str(path), read_only=read_only)
        except duckdb.IOException as e:
            msg = str(e)
            if "lock" in msg.lower():
                holder = re.search(r"\(PID (\d+)\)", msg)
                who = f"process {holder.group(1)}" if holder else "another process"
                raise StoreLockedError(
                    f"store {path} is in use by {who}. factory allows one writer per store: wait for that "
                    f"run to finish or stop it, or point this command at another store (--set store=...).") from e
            raise
        store = cls(path, con, read_only)
        if not read_only:
            store.migrate()
        return store

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        self.con.close()

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

    # ---- writes -------------------------------------------------------------------------------------
    def insert(self, table: str, rows: list[dict], replace: bool = False) -> int:
        """Insert rows in one transaction; rows whose id exists already are skipped (or replaced, for
        derived rows such as AI-feedback pairs). Returns rows added."""
        if not rows:
            return 0
        # Arrow takes its columns from the first row; rows of one batch may carry different keys
        # (a skipped row has no output), so give every row the union of keys.
        keys = list(dict.fromkeys(k for r in rows for k in r))
        batch = pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
        before = self.count(table)
        self.run_sql("BEGIN")
        try:
            self.con.register("_batch", batch)
            self.run_sql(f"INSERT OR {'REPLACE' if replace else 'IGNORE'} INTO {table} BY NAME SELECT * FROM _batch")
            self.con.unregister("_batch")
            self.run_sql("COMMIT")
        except Exception:
            self.run_sql("ROLLBACK")
            raise
        return self.count(table) - before

    def start_run(self, name: str, kind: str, config: dict, config_path: str | None) -> str:
        """Record a run. Its scope hash ignores settings that do not change what rows it makes (budget,
        batch size), so a resumed run belongs to the same family as the run it resumes."""
        from factory import __version__

        run_id = f"{now():%Y%m%d-%H%M%S}-{uuid.uuid4().hex[:6]}"
        cfg_json = json.dumps(config, sort_keys=True)
        scope = {k: v for k, v in config.items() if k not in ("budget", "write_batch_size", "executor", "ray", "name")}
        self.run_sql(
            "INSERT INTO runs (run_id, name, kind, config_path, config, config_hash, scope_hash, status, "
            "factory_version, started_at) VALUES (?, ?, ?, ?, ?, ?, ?, 'running', ?, ?)",
            [run_id, name, kind, config_path, cfg_json, row_id(cfg_json), row_id(kind, scope), __version__, now()])
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

    def pending_ids(self, table: str, ids: list[str], max_model_len: int) -> tuple[set[str], set[str]]:
        """(missing, retry): ids not yet in `table`, and ids stored as 'skipped' (prompt too long for the
        context) under a smaller max_model_len than `max_model_len`, which may fit now. One anti-join.
        Rows skipped before the column existed carry their limit only in the reason text."""
        if not ids:
            return set(), set()
        self.con.register("_want", pa.table({"id": ids}))
        try:
            rows = self.run_sql(
                f"""SELECT w.id, t.{ID_COLUMN[table]} IS NOT NULL FROM _want w
                    LEFT JOIN {table} t ON t.{ID_COLUMN[table]} = w.id
                    WHERE t.{ID_COLUMN[table]} IS NULL
                       OR (t.status = 'skipped' AND coalesce(t.max_model_len, TRY_CAST(regexp_extract(
                           t.reason, 'max_model_len (\\d+)', 1) AS INTEGER)) < ?)""", [max_model_len])
        finally:
            self.con.unregister("_want")
        return {i for i, stored in rows if not stored}, {i for i, stored in rows if stored}

    def fetch_by_ids(self, table: str, ids: list[str], where: str = "TRUE") -> list[dict]:
        if not ids:
            return []
        self.con.register("_want", pa.table({"id": ids}))
        try:
            return self.query(
                f"SELECT t.* FROM {table} t SEMI JOIN _want w ON t.{ID_COLUMN[table]} = w.id WHERE {where}")
        finally:
            self.con.unregister("_want")

    def query(self, sql: str, params: list | None = None) -> list[dict]:
        cur = self.con.execute(sql, params or [])
        cols = [d[0] for d in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    def resolve_run(self, run: str) -> str:
        if run == "latest":
            rows = self.run_sql("SELECT run_id FROM runs ORDER BY started_at DESC LIMIT 1")
            if not rows:
                raise ValueError(f"store {self.path} has no runs yet")
            return rows[0][0]
        if not self.run_sql("SELECT 1 FROM runs WHERE run_id=?", [run]):
            raise ValueError(f"run {run!r} not found in {self.path}; `factory status` lists the runs")
        return run

    def status(self) -> dict:
        """Counts per table and per run (rows written by that run), plus the runs themselves."""
        counts = {t: self.count(t) for t in TABLES}
        per_run = {}
        for t in TABLES:
            status_col = "NULL" if t in ("prompts", "preference_pairs", "comparisons") else "status"
            for run_id, status, n in self.run_sql(f"SELECT run_id, {status_col}, count(*) FROM {t} GROUP BY ALL"):
                per_run.setdefault(run_id, {}).setdefault(t, {})[status or "ok"] = n
        runs = self.query("SELECT run_id, name, kind, status, message, started_at, finished_at FROM runs "
                          "ORDER BY started_at")
        return {"path": str(self.path), "counts": counts, "per_run": per_run, "runs": runs}
