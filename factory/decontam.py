"""Decontamination: word n-gram overlap of the store's texts with benchmark files (MT-Bench, AlpacaEval, HarmBench,
whatever the user brings), and the SQL that keeps flagged pairs out of export and training.

Texts are normalised (`normalise`: Unicode NFKC, case-folded, apostrophes dropped, every other punctuation or symbol
character a space, whitespace collapsed) and cut into word n-grams (`ngrams`). A text of at least `n` words gives
its n-grams; a shorter one with at least `min_words` words gives one gram, its whole normalised text (so a short
benchmark question copied verbatim into the prompts is caught, and a two-word answer such as "Paris" flags nothing);
a shorter one still gives none. A text is flagged against a benchmark when one of its grams is one of the
benchmark's (the rule of GPT-3's contamination study, Brown et al. 2020, appendix C, with n = 13). A short benchmark
item is therefore matched only by a text that is, normalised, that item and nothing more.

The grams are computed and joined in DuckDB SQL (`GRAMS_SQL`): the benchmark's grams, hashed to 64 bits, in an
in-memory table, each page of store texts cut into grams and joined against it (factory/stages/decontaminate.py).
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from factory import jsonl
from factory.config import BenchmarkConfig, ConfigError, DecontaminationConfig

_APOSTROPHES = re.compile(r"['\u2019\u02bc]")  # dropped: "don't" and "dont" are the same word
_NOT_WORD = re.compile(r"[\W_]+")  # punctuation, symbols and underscores become spaces


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace collapsed: 'The Sky, is BLUE!' -> 'the sky is blue'."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NOT_WORD.sub(" ", _APOSTROPHES.sub("", folded)).split())


def ngrams(normalised: str, n: int, min_words: int) -> list[str]:
    """The word n-grams of a normalised text (the reference for `GRAMS_SQL`, which must give the same grams)."""
    words = normalised.split()
    if len(words) >= n:
        return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return [" ".join(words)] if len(words) >= min_words else []


# The grams of table `{src}(id, norm)`, one row each: SQL equal to `ngrams` (lists are 1-based, slices inclusive).
GRAMS_SQL = """
SELECT id, unnest(CASE WHEN len(w) >= $n THEN list_transform(range(1, len(w) - $n + 2),
                                                            lambda i: array_to_string(w[i:i + $n - 1], ' '))
                       WHEN len(w) >= $min_words THEN [array_to_string(w, ' ')]
                       ELSE []::VARCHAR[] END) AS gram
FROM (SELECT id, string_split(norm, ' ') AS w FROM {src} WHERE norm <> '')
"""


# ---- benchmark files -----------------------------------------------------------------------------------------

def _where(i: int, b: BenchmarkConfig) -> str:
    return f"decontamination.benchmarks[{i}] ({b.name})"


def _strings(value) -> Iterator[str]:
    """Every string inside a field: the string itself, or those in a list or mapping (MT-Bench's `turns`, a
    conversation's message contents)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _strings(v)


def _records(path: Path, where: str) -> tuple[list[str], Iterator[dict]]:
    """(the file's column names, its records)."""
    if path.is_dir():
        from datasets import DatasetDict, load_from_disk

        try:
            ds = load_from_disk(str(path))
        except Exception as e:  # noqa: BLE001 - any unreadable folder is bad input
            raise ConfigError(f"{where}: {path} is not a `datasets` folder saved with save_to_disk ({e})") from e
        parts = list(ds.values()) if isinstance(ds, DatasetDict) else [ds]
        columns = list(dict.fromkeys(c for p in parts for c in p.column_names))
        return columns, (r for p in parts for r in p)
    ext = path.suffix.lower()
    if ext in (".parquet", ".pq"):
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # noqa: BLE001
            raise ConfigError(f"{where}: {path} is not a readable Parquet file ({e})") from e
        return table.column_names, iter(table.to_pylist())
    if ext in (".jsonl", ".json", ".ndjson"):
        rows = [rec for _, rec in jsonl.records(path, f"{where}: ")]
        return list(dict.fromkeys(k for r in rows for k in r)), iter(rows)
    raise ConfigError(f"{where}: {path}: give a .jsonl or .parquet file or a `datasets` folder")


def load_benchmark(b: BenchmarkConfig, i: int = 0) -> list[str]:
    """The texts of one benchmark (each string of the chosen columns, in file order). Bad input (a missing file or
    column, no text at all) is a ConfigError naming the benchmark, the file and the column."""
    where = _where(i, b)
    path = Path(b.path).expanduser()
    if not path.exists():
        raise ConfigError(f"{where}: benchmark file {path} not found (decontamination.benchmarks[{i}].path)")
    columns, records = _records(path, where)
    missing = [c for c in b.columns or [] if c not in columns]
    if missing:
        raise ConfigError(f"{where}: no column {missing[0]!r} in {path}; its columns are {', '.join(columns)} "
                          f"(decontamination.benchmarks[{i}].columns)")
    texts = [s for r in records for c in (b.columns or columns) for s in _strings(r.get(c)) if s.strip()]
    if not texts:
        raise ConfigError(f"{where}: {path} has no text in {'columns ' + ', '.join(b.columns) if b.columns else 'any column'}")
    return texts


def check_benchmarks(cfg: DecontaminationConfig) -> None:
    """Read every benchmark once, before the store is touched or a model loads: bad input fails the run early."""
    for i, b in enumerate(cfg.benchmarks):
        load_benchmark(b, i)


def _file_digest(path: Path) -> str:
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.relative_to(path).as_posix().encode() if path.is_dir() else b"")
        with p.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def definition(cfg: DecontaminationConfig) -> str:
    """What the stage's flags depend on besides the texts: its settings, the benchmarks' bytes and this code."""
    from factory.stages.reuse import code_hash

    parts = {"config": cfg.model_dump(mode="json"), "code": code_hash(),
             "files": [_file_digest(Path(b.path).expanduser()) for b in cfg.benchmarks]}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


# ---- keeping flagged rows out ----------------------------------------------------------------------------------

def has_table(store) -> bool:
    """Stores written before decontamination have no `contamination` table (a reader cannot add it)."""
    return store.run_sql("SELECT count(*) FROM information_schema.tables WHERE table_name = 'contamination'")[0][0] > 0


def clean_sql(store, *id_columns: str) -> str:
    """SQL: TRUE when none of these id columns (e.g. 'pp.prompt_id', 'pp.chosen_id', 'pp.rejected_id') names a
    flagged text. One anti-join per column (DuckDB decorrelates each EXISTS into a hash anti-join)."""
    if not has_table(store):
        return "TRUE"
    return "(" + " AND ".join(f"NOT EXISTS (SELECT 1 FROM contamination c WHERE c.row_id = {col})"
                              for col in id_columns) + ")"


def counts(store, run_id: str) -> dict:
    """Per benchmark: the run's flagged texts per table, and the run's pairs (kept otherwise) that a flag keeps out of
    export and training. {} when the store has no flags."""
    if not has_table(store):
        return {}
    out: dict[str, dict] = {}
    for bench, tbl, n in store.run_sql("""SELECT benchmark, tbl, count(DISTINCT row_id) FROM contamination
                                          WHERE run_id = ? GROUP BY ALL ORDER BY ALL""", [run_id]):
        out.setdefault(bench, {"prompts": 0, "responses": 0, "revisions": 0, "pairs_excluded": 0})[tbl] = n
    # One equi-join per side (a join on `row_id IN (a, b, c)` would compare every pair with every flag).
    sides = " UNION ALL ".join(f"SELECT c.benchmark, pp.pair_id FROM pp JOIN contamination c ON c.row_id = pp.{col}"
                               for col in ("prompt_id", "chosen_id", "rejected_id"))
    for bench, n in store.run_sql(f"""
            WITH pp AS (SELECT pp.* FROM preference_pairs pp SEMI JOIN (SELECT id FROM run_rows WHERE run_id = ?
                        AND tbl = 'preference_pairs') m ON m.id = pp.pair_id WHERE pp.dropped_reason IS NULL)
            SELECT benchmark, count(DISTINCT pair_id) FROM ({sides}) GROUP BY ALL ORDER BY ALL""", [run_id]):
        out.setdefault(bench, {"prompts": 0, "responses": 0, "revisions": 0, "pairs_excluded": 0})["pairs_excluded"] = n
    return out
