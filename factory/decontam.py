"""Decontamination: word n-gram overlap of the store's texts with benchmark files (MT-Bench, AlpacaEval, HarmBench,
whatever the user brings), and the SQL that keeps flagged pairs out of export and training.

Texts are normalised (`normalise`: Unicode NFKC, case-folded, apostrophes dropped, every other punctuation or symbol
character a space, whitespace collapsed) and cut into word n-grams (`ngrams`). A text is flagged against a benchmark
when one of its n-grams is one of the benchmark's (the rule of GPT-3's contamination study, Brown et al. 2020,
appendix C, with n = 13): kind 'ngram'.

A benchmark item shorter than `n` words has no n-gram. One with at least `min_words` words is a short item
(`contains_item`): a text is flagged when its normalised words contain the item's whole normalised word sequence,
anywhere, on word boundaries ("what is the capital of france" is in "so what is the capital of france i wonder", not
in "what is the capital of frances"): kind 'short_item'. An item of fewer than `min_words` words is ignored (a two-word
item such as "Paris" would flag every text that names the city).

The n-grams are computed and joined in DuckDB SQL (`GRAMS_SQL`): the benchmark's n-grams, hashed to 64 bits, in an
in-memory table, each page of store texts cut into n-grams and joined against it (factory/stages/decontaminate.py).
The short items are found in numpy (`ShortItems`): every window of a page's words as long as some short item is
hashed at once (a polynomial hash mod 2^64 from prefix sums) and looked up among the items' hashes; a hash hit is
then compared word by word.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factory import jsonl
from factory.config import BenchmarkConfig, ConfigError, DecontaminationConfig

_APOSTROPHES = re.compile(r"['\u2019\u02bc]")  # dropped: "don't" and "dont" are the same word
_NOT_WORD = re.compile(r"[\W_]+")  # punctuation, symbols and underscores become spaces


def normalise(text: str) -> str:
    """NFKC, case-folded, punctuation removed, whitespace collapsed: 'The Sky, is BLUE!' -> 'the sky is blue'."""
    folded = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_NOT_WORD.sub(" ", _APOSTROPHES.sub("", folded)).split())


def ngrams(normalised: str, n: int) -> list[str]:
    """The word n-grams of a normalised text, none if it is shorter than n words (the reference for `GRAMS_SQL`,
    which must give the same grams)."""
    words = normalised.split()
    return [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]


def contains_item(normalised: str, item: str) -> bool:
    """Whether a normalised text holds a normalised short item's whole word sequence (the reference for
    `ShortItems`, which must find the same)."""
    return bool(item) and f" {item} " in f" {normalised} "


# The n-grams of table `{src}(id, norm)`, one row each: SQL equal to `ngrams` (lists are 1-based, slices inclusive).
GRAMS_SQL = """
SELECT id, unnest(list_transform(range(1, len(w) - $n + 2), lambda i: array_to_string(w[i:i + $n - 1], ' '))) AS gram
FROM (SELECT id, string_split(norm, ' ') AS w FROM {src} WHERE norm <> '')
"""


class ShortItems:
    """The short items of the benchmarks (at least `min_words`, fewer than `n` words) and the search of a page of
    normalised texts for them (`find`).

    Words are numbered: each word of some short item gets an id from 1 (a pyarrow hash lookup, `pc.index_in`), every
    other word 0, and each id a random 64-bit value r. A window of k words w_i..w_i+k-1 hashes to
    sum_t r(w_i+t) * B^t mod 2^64; with S the prefix sums of r(w_j) * B^j over the page's words, that is
    (S[i+k] - S[i]) * B^-i (B odd, so invertible mod 2^64): one vector expression per item length k over a page's
    windows (uint64 arithmetic wraps, which is the mod). Only windows within one text and of item words only (no id 0)
    are hashed; a window whose hash is an item's is compared with the item word by word, so a hash collision never
    flags anything, and the items of one length have distinct hashes (else other r are drawn), so none is missed."""

    _B = 0x9E3779B97F4A7C15  # odd
    _BITS = 20

    def __init__(self, items: list[tuple[str, str]], n: int, min_words: int):
        """`items`: (benchmark, normalised item) pairs; those of min_words..n-1 words are kept."""
        short = list(dict.fromkeys((b, t) for b, t in items if min_words <= len(t.split()) < n))
        self.count = len(short)
        vocab: dict[str, int] = {}
        seqs: dict[tuple, list[tuple[str, str]]] = {}  # word ids -> the (benchmark, item) pairs that are those words
        for bench, t in short:
            seqs.setdefault(tuple(vocab.setdefault(w, len(vocab) + 1) for w in t.split()), []).append((bench, t))
        self._vocab = pa.array(list(vocab), pa.string())
        # per length k: the items' sorted hashes, their word ids (a row each, in that order), their (benchmark, item)s
        self._by_len: dict[int, tuple[np.ndarray, np.ndarray, list[list[tuple[str, str]]]]] = {}
        for seed in range(1000):
            rng = np.random.default_rng(seed)
            self._r = rng.integers(0, 2**63, len(vocab) + 1, dtype=np.uint64) * 2 + 1
            self._r[0] = 0
            by_len: dict[int, list[tuple[int, tuple]]] = {}
            for ids in seqs:
                up = self._powers(len(ids))[0]
                h = int(np.sum(self._r[list(ids)] * up, dtype=np.uint64))
                by_len.setdefault(len(ids), []).append((h, ids))
            if all(len({h for h, _ in hs}) == len(hs) for hs in by_len.values()):
                break
        self._seen = np.zeros(1 << self._BITS, dtype=bool)  # the top bits of every item's hash: a quick first test
        for k, hs in by_len.items():
            hs.sort()
            self._seen[np.array([h for h, _ in hs], dtype=np.uint64) >> np.uint64(64 - self._BITS)] = True
            self._by_len[k] = (np.array([h for h, _ in hs], dtype=np.uint64),
                               np.array([ids for _, ids in hs], dtype=np.int64).reshape(len(hs), k),
                               [seqs[ids] for _, ids in hs])

    @classmethod
    def _powers(cls, m: int) -> tuple[np.ndarray, np.ndarray]:
        """B^0..B^(m-1) and B^-0..B^-(m-1), mod 2^64."""
        up = np.full(m, cls._B, dtype=np.uint64)
        down = np.full(m, pow(cls._B, -1, 2**64), dtype=np.uint64)
        up[0] = down[0] = 1
        return np.cumprod(up, dtype=np.uint64), np.cumprod(down, dtype=np.uint64)

    def find(self, norms: list[str]) -> list[tuple[int, str, str]]:
        """(index of the text, benchmark, item) for each short item a normalised text of the page contains, sorted."""
        if not self._by_len or not norms:
            return []
        words = pc.split_pattern(pa.array(norms, pa.string()), " ")  # "" -> [""]: one word outside the items
        offsets = np.asarray(words.offsets, dtype=np.int64)
        flat = words.flatten()
        m = len(flat)
        ids = np.asarray(pc.fill_null(pc.add(pc.index_in(flat, value_set=self._vocab), 1), 0), dtype=np.int64)
        # room[i]: item words from i on, within i's text; the window [i, i + k) is searched where room[i] >= k
        pos = np.arange(m)
        stop = np.minimum.accumulate(np.where(ids > 0, m, pos)[::-1])[::-1]  # the next word outside the items
        room = np.minimum(stop, np.repeat(offsets[1:], np.diff(offsets))) - pos
        cand = np.flatnonzero(room >= min(self._by_len))
        if not len(cand):
            return []
        up, down = self._powers(m)
        s = np.zeros(m + 1, dtype=np.uint64)
        np.cumsum(self._r[ids] * up, dtype=np.uint64, out=s[1:])
        found = []
        for k, (hashes, item_ids, pairs) in self._by_len.items():
            i = cand[room[cand] >= k]
            h = (s[i + k] - s[i]) * down[i]
            maybe = self._seen[h >> np.uint64(64 - self._BITS)]
            i, h = i[maybe], h[maybe]
            at = np.minimum(np.searchsorted(hashes, h), len(hashes) - 1)
            hit = hashes[at] == h
            i, at = i[hit], at[hit]
            same = (ids[i[:, None] + np.arange(k)] == item_ids[at]).all(axis=1)
            text = np.searchsorted(offsets, i[same], side="right") - 1
            for t, a in set(zip(text.tolist(), at[same].tolist())):
                found += [(t, bench, item) for bench, item in pairs[a]]
        return sorted(found)


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
