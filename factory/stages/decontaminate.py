"""decontaminate: the run's texts against benchmark files -> `contamination` rows. No model calls.

Reads: the benchmark files of `decontamination.benchmarks`, and this run's `prompts`, `responses` and `revisions`
(those named in `decontamination.check`), page by page. Writes: `contamination`, one row per (text, benchmark) that
share a word n-gram or where the text contains a short benchmark item whole (factory/decontam.py: normalisation, the
n-gram and short-item rules), with its kind ('ngram' or 'short_item'), one shared n-gram (or the short item) and how
many distinct ones, under this run's id; progress under the stage name `decontaminate` in `run_progress`; its record
in `stage_runs`.

Export and training leave out pairs whose prompt, chosen or rejected text has a row here (`decontam.clean_sql`);
the pair rows themselves are kept as they are. The benchmark's n-grams, hashed to 64 bits, sit in an in-memory
DuckDB table (a writer's store connection may be closed for a reader between pages, which would drop a temporary
table), its short items in a `decontam.ShortItems`; each page of texts is normalised in Python (NFKC and case-folding
are Python's), cut into n-grams and joined against the table in SQL, and searched for the short items in numpy. A
later run with the same settings, benchmark bytes, code and input rows copies the earlier run's rows instead (the
same rule as factory/stages/reuse.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import duckdb
import pyarrow as pa

from factory import decontam
from factory.config import DecontaminationConfig
from factory.stages import reuse
from factory.stages.common import Context, StageSpec, finish_progress, members
from factory.store import ID_COLUMN, now


def _spec(table: str) -> StageSpec:
    col = ID_COLUMN[table]
    keys = (f"SELECT DISTINCT id, id AS prompt_id FROM ({members('prompts')}) ORDER BY id" if table == "prompts" else
            f"""SELECT DISTINCT t.{col} AS id, t.prompt_id FROM {table} t SEMI JOIN ({members(table)}) m
                ON m.id = t.{col} ORDER BY t.prompt_id, id""")
    return StageSpec(name="decontaminate", reads=(table,), writes="contamination", keys=keys,
                     rows=f"""SELECT t.{col} AS id, t.text FROM {table} t SEMI JOIN _chunk c ON c.id = t.{col}
                              WHERE t.prompt_id BETWEEN $lo AND $hi AND t.text IS NOT NULL""")


# One declaration per table it may check; all write `contamination`, under the one stage name.
SPECS = {table: _spec(table) for table in ("prompts", "responses", "revisions")}

_HITS = f"""SELECT g.id, b.benchmark, min(g.gram) AS ngram, count(DISTINCT g.gram)::INTEGER AS hits
            FROM ({decontam.GRAMS_SQL.format(src='_page')}) g JOIN bench b ON b.h = hash(g.gram)
            GROUP BY ALL ORDER BY ALL"""


@dataclass
class BenchmarkIndex:
    """The benchmarks, ready to match pages against: `con` holds `bench(h, benchmark)`, the distinct hashed n-grams
    of the items of at least `ngram` words, in an in-memory DuckDB; `short` the shorter items of at least
    `min_words` words."""

    con: duckdb.DuckDBPyConnection
    short: decontam.ShortItems

    def close(self) -> None:
        self.con.close()


def benchmark_index(cfg: DecontaminationConfig) -> BenchmarkIndex:
    """Every benchmark's items, read and normalised once: their n-grams in SQL, their short items in numpy."""
    mem = duckdb.connect()
    mem.execute("SET memory_limit = '4GB'")
    names, norms = [], []
    for i, b in enumerate(cfg.benchmarks):
        for text in decontam.load_benchmark(b, i):
            names.append(b.name)
            norms.append(decontam.normalise(text))
    mem.register("_bench", pa.table({"id": names, "norm": norms}))
    mem.execute(f"CREATE TABLE bench AS SELECT DISTINCT hash(gram) AS h, id AS benchmark "
                f"FROM ({decontam.GRAMS_SQL.format(src='_bench')})", {"n": cfg.ngram})
    mem.unregister("_bench")
    return BenchmarkIndex(mem, decontam.ShortItems(list(zip(names, norms)), cfg.ngram, cfg.min_words))


def flag_page(index: BenchmarkIndex, cfg: DecontaminationConfig, ids: list[str], texts: list[str]) -> list[tuple]:
    """(id, benchmark, kind, one shared n-gram or the short item, how many distinct ones) for each (text of the page,
    benchmark) that match: kind 'ngram' when they share an n-gram (short items the text also holds are counted in
    `hits`), 'short_item' when the text only contains short items."""
    norms = [decontam.normalise(t) for t in texts]
    index.con.register("_page", pa.table({"id": ids, "norm": norms}))
    try:
        hits = {(i, b): [b, "ngram", g, h] for i, b, g, h in index.con.execute(_HITS, {"n": cfg.ngram}).fetchall()}
    finally:
        index.con.unregister("_page")
    for t, b, item in index.short.find(norms):  # sorted: the first item of a (text, benchmark) is its least
        row = hits.setdefault((ids[t], b), [b, "short_item", item, 0])
        row[3] += 1
    return [(i, *row) for (i, _), row in sorted(hits.items())]


def decontaminate(ctx: Context, cfg: DecontaminationConfig) -> dict[str, int]:
    """Flag the run's texts that overlap a benchmark; returns flagged texts per benchmark (this run's rows)."""
    if not cfg.benchmarks:
        return {}
    store, tables = ctx.store, tuple(cfg.check)
    definition, inputs = decontam.definition(cfg), reuse.fingerprint(store, ctx.run_id, tables)
    before = store.run_sql("SELECT run_id FROM stage_runs WHERE stage = 'decontaminate' AND definition = ? AND "
                           "inputs = ?", [definition, inputs])
    if before:
        store.run_sql("""INSERT INTO contamination (row_id, tbl, benchmark, kind, ngram, hits, run_id, created_at)
                         SELECT row_id, tbl, benchmark, kind, ngram, hits, ?, ? FROM contamination
                         WHERE run_id = ?""", [ctx.run_id, now(), before[0][0]])
        ctx.log(f"decontaminate: nothing to do (finished by run {before[0][0]} with the same benchmarks and inputs; "
                "its flags are this run's)")
    else:
        index = benchmark_index(cfg)
        try:
            prog = ctx.start_progress("decontaminate", None, 0, 0)
            for table in tables:
                n, pages = SPECS[table].pages(ctx)
                prog.wanted += n
                for page in pages:
                    hits = flag_page(index, cfg, [r["id"] for r in page], [r["text"] for r in page])
                    rows = [{"row_id": i, "tbl": table, "benchmark": b, "kind": k, "ngram": g, "hits": h,
                             "run_id": ctx.run_id, "created_at": now()} for i, b, k, g, h in hits]
                    store.insert("contamination", rows, progress=prog.advance(len(page)))
                    if rows:
                        ctx.log(f"decontaminate: {len(rows)} {table} flagged in a page of {len(page)}")
            finish_progress(ctx, prog)
        finally:
            index.close()
        reuse.record(ctx, SPECS["prompts"], definition, inputs, {})
    return dict(store.run_sql("SELECT benchmark, count(*) FROM contamination WHERE run_id = ? GROUP BY ALL ORDER BY ALL",
                              [ctx.run_id]))
