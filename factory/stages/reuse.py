"""A stage already finished with the same definition and inputs is adopted, not re-read (issue 11: a no-op
re-run of a million prompts in under a minute).

Reads: `stage_runs` (one row per stage finished: its definition, its inputs' fingerprint, the run that finished
it), `run_rows`, and the stage's input and output tables. Writes: `stage_runs` when a stage finishes, and, when an
earlier run finished the same stage, that run's rows of the stage's output as this run's (`run_rows`).

Why it is exact. Without it, a re-run of a finished stage computes every job id of every page in Python, finds
them all stored by anti-join and records them as the run's (a few microseconds per id: minutes per million).
The job ids are a pure function of (the stage's definition, the ids and statuses of its input rows): the
definition (`definition`) hashes the whole run scope (the pipeline config without engine knobs, run_scope.py),
both models' identity, the constitution's content, factory's own source (templates, row-id rules) and the stage's
parameters (the round); the inputs' fingerprint (`fingerprint`) is the count and two 64-bit hash sums of
(id, status) over this run's rows of every table the stage reads, computed in SQL when the stage starts, so a
row stored later (a skipped prompt retried under a larger context by another run) or removed changes it. When
both match a finished stage's record, that run wanted exactly the ids this one would and stored every one of
them; the record is used only if every one is still stored (one anti-join), and is otherwise ignored.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

from factory.store import ID_COLUMN, now

@lru_cache(maxsize=1)
def code_hash() -> str:
    """factory's own source: a change to a template or a row-id rule may change which ids a stage wants."""
    root = Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:24]


def definition(cfg, infos: dict, constitution, stage: str, **params) -> str:
    """What a stage's job ids depend on besides its inputs: the run scope, the models, the constitution, factory's
    code and the stage's own parameters. Conservative: any change to the pipeline's scope re-reads every stage."""
    from factory.run_scope import scope_hash

    parts = {"stage": stage, "params": params, "scope": scope_hash("pipeline", cfg.model_dump(mode="json")),
             "models": {role: [i.key, i.fingerprint] for role, i in sorted(infos.items())},
             "constitution": hashlib.sha256(constitution.model_dump_json().encode()).hexdigest(),
             "code": code_hash()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def fingerprint(store, run_id: str, tables: tuple[str, ...]) -> str:
    """The count and two hash sums of (id, status) of this run's rows of `tables` (order-free; SQL)."""
    out = []
    for table in tables:
        status = "''" if table == "prompts" else "t.status"
        out.append(store.run_sql(
            f"""SELECT count(*), bit_xor(hash(t.{ID_COLUMN[table]}, {status})),
                       sum(hash(t.{ID_COLUMN[table]}, {status})::HUGEINT)::VARCHAR
                FROM {table} t SEMI JOIN (SELECT id FROM run_rows WHERE run_id = ? AND tbl = ?) m
                ON m.id = t.{ID_COLUMN[table]}""", [run_id, table])[0])
    return hashlib.sha256(json.dumps([[t, *map(str, r)] for t, r in zip(tables, out)]).encode()).hexdigest()[:32]


def _owned(spec, run: str, params: dict) -> list[tuple[str, str, dict]]:
    """(table, SQL of the ids of `run`'s rows this stage wrote or wanted in it, its parameters) per output table."""
    out = []
    for table, where in spec.owns or ((spec.writes, "TRUE"),):
        sql = (f"SELECT DISTINCT m.id FROM run_rows m JOIN {table} t ON t.{ID_COLUMN[table]} = m.id "
               f"WHERE m.run_id = $from AND m.tbl = '{table}' AND ({where})")
        out.append((table, sql, {"from": run, **{k: v for k, v in params.items() if f"${k}" in where}}))
    return out


def adopt(ctx, spec, definition_: str, inputs: str, params: dict) -> str | None:
    """If an earlier run finished this stage with the same definition and inputs, and every row it wanted is still
    stored, record those rows as this run's and return that run's id; else None (the stage runs as usual)."""
    store = ctx.store
    found = store.run_sql("SELECT run_id FROM stage_runs WHERE stage = ? AND definition = ? AND inputs = ?",
                          [spec_key(spec, params), definition_, inputs])
    if not found:
        return None
    before = found[0][0]
    owned = _owned(spec, before, params)
    for table, sql, p in owned:
        # Rows wanted by `before` that are gone (a store edited by hand) make the record useless.
        gone = store.con.execute(f"SELECT count(*) FROM (SELECT id FROM run_rows WHERE run_id = $from AND tbl = "
                                 f"'{table}') m ANTI JOIN {table} t ON t.{ID_COLUMN[table]} = m.id",
                                 {"from": before}).fetchall()[0][0]
        if gone:
            return None
    for table, sql, p in owned:
        store.con.execute(f"INSERT INTO run_rows SELECT $run, '{table}', id FROM ({sql})", {"run": ctx.run_id, **p})
    return before


def record(ctx, spec, definition_: str, inputs: str, params: dict) -> None:
    """The stage finished in this run: every row it wanted is stored."""
    ctx.store.run_sql("INSERT OR REPLACE INTO stage_runs VALUES (?, ?, ?, ?, ?)",
                      [spec_key(spec, params), definition_, inputs, ctx.run_id, now()])


def spec_key(spec, params: dict) -> str:
    """The stage's name in `stage_runs`: critique and revise once per round."""
    return spec.name + "".join(f" {k}={v}" for k, v in sorted(params.items()))


def run_stage(ctx, spec, definition_: str, params: dict, fn):
    """Run `fn()` (a stage over all its pages) unless an earlier run finished the same stage on the same inputs;
    returns fn's result, or None when the stage was adopted."""
    inputs = fingerprint(ctx.store, ctx.run_id, spec.reads)
    before = adopt(ctx, spec, definition_, inputs, params)
    if before is not None:
        ctx.log(f"{spec_key(spec, params)}: nothing to do (finished by run {before} with the same definition and "
                "inputs; its rows are this run's)")
        return None
    result = fn()
    record(ctx, spec, definition_, inputs, params)
    # The stage's rows go from the write-ahead log into the file: its index nodes and table blocks become clean,
    # so DuckDB can evict them under its memory limit (factory.store_lock.MEMORY_LIMIT) rather than run out.
    ctx.store.run_sql("CHECKPOINT")
    return result
