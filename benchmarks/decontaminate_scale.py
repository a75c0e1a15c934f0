"""The decontaminate stage at a realistic size: N stored texts (prompts, responses, revisions of one run) against a
benchmark of M items, with K benchmark items planted in the texts (other case and punctuation) to check recall.

    PYTHONPATH=. python benchmarks/decontaminate_scale.py [--texts 100000] [--items 10000] [--planted 100]
                                                          [--item-words 8 120]

Texts are Zipf-distributed words of a 30,000-word vocabulary: prompts of 10-60 words, responses and revisions of
60-180 (about what 96-256 tokens of output hold); benchmark items of 8-120 words (--item-words). Prints the seconds
of the stage (benchmark n-grams and short items, then every page of texts: normalise, cut, join, search the short
items, write) and how many texts were flagged, per kind, next to the planted items: every one is caught inside its
longer text (13 words or more by a shared 13-gram, a shorter one as a short item, factory/decontam.py). With items of
8 words or more the random texts share no 13-gram and hold no whole item by chance, so any other flag would be a
false positive; with shorter items (--item-words 3 120) a random text does hold some 3- or 4-word items of common
words, and those flags are right.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from factory.config import BenchmarkConfig, DecontaminationConfig  # noqa: E402
from factory.stages.common import Context  # noqa: E402
from factory.stages.decontaminate import decontaminate  # noqa: E402
from factory.store import Store, now, row_id  # noqa: E402


def words(rng, vocab, lo, hi, n):
    lengths = rng.integers(lo, hi + 1, n)
    ranks = np.minimum(rng.zipf(1.2, lengths.sum()), len(vocab)) - 1
    flat, out, i = [vocab[r] for r in ranks], [], 0
    for k in lengths:
        out.append(" ".join(flat[i:i + k]).capitalize() + ".")
        i += k
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--texts", type=int, default=100_000)
    ap.add_argument("--items", type=int, default=10_000)
    ap.add_argument("--planted", type=int, default=100)
    ap.add_argument("--chunk-size", type=int, default=4096)
    ap.add_argument("--item-words", type=int, nargs=2, default=[8, 120], metavar=("LO", "HI"))
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    syll = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "shi", "pa", "de", "gu", "zo", "fe", "bi", "ho"]
    vocab = list(dict.fromkeys("".join(rng.choice(syll, rng.integers(1, 5))) for _ in range(60_000)))[:30_000]
    items = words(rng, vocab, *a.item_words, a.items)
    n_prompts = a.texts * 2 // 5
    n_resp = (a.texts - n_prompts) // 2
    prompts = words(rng, vocab, 10, 60, n_prompts)
    responses = words(rng, vocab, 60, 180, n_resp)
    revisions = words(rng, vocab, 60, 180, a.texts - n_prompts - n_resp)
    planted = rng.choice(a.items, a.planted, replace=False)
    for j, k in enumerate(planted):  # a third each into prompts, responses and revisions
        target = (prompts, responses, revisions)[j % 3]
        target[j] = "So, " + items[k].upper().replace(" ", " , ") + " ... thanks!"
    with tempfile.TemporaryDirectory() as tmp:
        bench = Path(tmp) / "bench.jsonl"
        bench.write_text("".join(json.dumps({"id": i, "prompt": t}) + "\n" for i, t in enumerate(items)))
        with Store.open(Path(tmp) / "s.duckdb") as store:
            run = store.start_run("bench", "pipeline", {}, None)
            pids = [row_id("prompt", i) for i in range(n_prompts)]
            store.insert("prompts", [{"prompt_id": p, "text": t, "created_at": now()} for p, t in zip(pids, prompts)])
            store.add_members(run, "prompts", pids)
            for table, key, texts in (("responses", "response_id", responses), ("revisions", "revision_id", revisions)):
                ids = [row_id(table, i) for i in range(len(texts))]
                extra = {"sample_index": 0} if table == "responses" else {"response_id": "r", "parent_id": "r",
                                                                           "critique_id": "c", "round": 1}
                store.insert(table, [{key: i, "prompt_id": pids[j % n_prompts], "text": t, "run_id": run,
                                      "stage": table, "status": "ok", **extra} for j, (i, t) in enumerate(zip(ids, texts))])
                store.add_members(run, table, ids)
            store.run_sql("CHECKPOINT")
            cfg = DecontaminationConfig(benchmarks=[BenchmarkConfig(name="bench", path=str(bench))])
            ctx = Context(store=store, run_id=run, seed=0, chunk_size=a.chunk_size)
            t0 = time.perf_counter()
            flagged = decontaminate(ctx, cfg)
            seconds = time.perf_counter() - t0
            per_table = dict(store.run_sql("SELECT tbl, count(*) FROM contamination GROUP BY ALL"))
            per_kind = dict(store.run_sql("SELECT kind, count(*) FROM contamination GROUP BY ALL"))
            planted_ids = [(("prompts", "responses", "revisions")[j % 3], j) for j in range(a.planted)]
            caught = sum(bool(store.run_sql("SELECT 1 FROM contamination WHERE tbl = ? AND row_id = ?",
                                            [tbl, pids[j] if tbl == "prompts" else row_id(tbl, j)]))
                         for tbl, j in planted_ids)
    short = int(sum(len(items[k].split()) < cfg.ngram for k in planted))
    print(json.dumps({"texts": a.texts, "benchmark_items": a.items, "item_words": a.item_words,
                      "short_items": int(sum(len(t.split()) < cfg.ngram for t in items)), "planted": a.planted,
                      "planted_short": short, "planted_caught": caught, "chunk_size": a.chunk_size,
                      "seconds": round(seconds, 2), "texts_per_s": round(a.texts / seconds), "flagged": flagged,
                      "flagged_per_table": per_table, "flagged_per_kind": per_kind}))


if __name__ == "__main__":
    main()
