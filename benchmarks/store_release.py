"""The cost of letting readers in during a run (factory/store.py: the writer lets go of the DuckDB file when a
reader asks), side by side on fresh stores in one process:

- kept open: the file held for the whole run (the behaviour before; readers are refused);
- on demand, nobody watching: the mechanism as shipped, no reader (one `stat` per commit);
- on demand, status every 1 s: the same while another process runs `Store.status()` every second (what
  `factory status` does); prints that reader's wait to open the file;
- closed per commit: the simple alternative (close after every commit, open for the next): for comparison.

Each batch is what a stage commits: `--batch-size` response rows (~1 KB of text each, with lineage columns) and its
`run_progress` row in one transaction, after one read (a count), as the stages do; the rows are built untimed (the
model's part). Prints ms per batch (mean, first and last 10%: does it grow with the store?), reopens and sizes.
Run from the repository root: `PYTHONPATH=. .venv/bin/python benchmarks/store_release.py --batches 1000`.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from factory.store import Store, now

READER = """
import json, sys, time
from pathlib import Path
from factory.store import Store
path, stop = Path(sys.argv[1]), Path(sys.argv[2])
waits = []
while not stop.exists():
    t0 = time.perf_counter()
    try:
        with Store.open(path, read_only=True) as s:
            waits.append(time.perf_counter() - t0)
            s.status()
    except FileNotFoundError:
        pass
    time.sleep(1.0)
print(json.dumps(waits))
"""


def _rows(b: int, size: int, run_id: str, rng: random.Random) -> list[dict]:
    words = ["the", "model", "answer", "because", "water", "boils", "at", "sea", "level", "safely", "please", "help"]
    out = []
    for i in range(size):
        text = " ".join(rng.choice(words) for _ in range(150))
        out.append({"response_id": f"r{b}-{i}", "prompt_id": f"p{b}-{i}", "sample_index": 0, "run_id": run_id,
                    "stage": "generate", "model_id": "gemma-3-270m", "engine": "vllm",
                    "sampling": '{"max_tokens": 256, "temperature": 0.7}', "seed": b * size + i,
                    "template_hash": "abc123", "prompt_tokens": 120, "output_tokens": 200, "finish_reason": "stop",
                    "raw_output": text, "text": text, "status": "ok", "created_at": now()})
    return out


def run(path: Path, batches: int, size: int, mode: str) -> dict:
    rng = random.Random(0)
    reader = None
    if mode == "on demand, status every 1 s":
        stop = path.with_suffix(".stop")
        reader = subprocess.Popen([sys.executable, "-c", READER, str(path), str(stop)], stdout=subprocess.PIPE,
                                  text=True)
    store = Store.open(path)
    if mode == "kept open":
        store.release = lambda: None  # the behaviour before: the file stays open for the whole run
    elif mode == "closed per commit":
        def close_now():
            if store._con is not None:
                store._con.close()
                store._con = None
        store.release = close_now
    run_id = store.start_run("bench", "pipeline", {}, None)
    per_batch = []
    t_all = time.perf_counter()
    for b in range(batches):
        rows = _rows(b, size, run_id, rng)  # not timed: the model's part
        t0 = time.perf_counter()
        store.count("responses")  # the read a stage makes between commits (reopens a released file)
        store.insert("responses", rows, progress={"run_id": run_id, "stage": "generate", "model_id": "m",
                                                  "wanted": batches * size, "stored_before": 0,
                                                  "done": (b + 1) * size, "seconds": 1.0, "started_at": now(),
                                                  "updated_at": now()})
        per_batch.append(time.perf_counter() - t0)
    store.close()
    total = time.perf_counter() - t_all
    waits = []
    if reader is not None:
        stop.touch()
        waits = json.loads(reader.communicate(timeout=60)[0])
    k = max(1, batches // 10)
    return {"reader_waits": waits, "ms_per_batch": 1000 * sum(per_batch) / batches,
            "first_10pct_ms": 1000 * sum(per_batch[:k]) / k,
            "last_10pct_ms": 1000 * sum(per_batch[-k:]) / k, "total_s": total, "reopens": store.reopens,
            "mb": path.stat().st_size / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batches", type=int, default=2000)
    ap.add_argument("--batch-size", type=int, default=256)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = {}
        for i, mode in enumerate(("kept open", "on demand, nobody watching", "on demand, status every 1 s",
                                  "closed per commit")):
            res[mode] = run(Path(tmp) / f"mode{i}.duckdb", args.batches, args.batch_size, mode)
        t0 = time.perf_counter()
        with Store.open(Path(tmp) / "mode0.duckdb", read_only=True) as s:
            s.status()
        status_s = time.perf_counter() - t0
    print(f"{args.batches} batches x {args.batch_size} rows ({args.batches * args.batch_size:,} rows)")
    print(f"{'mode':<30}{'ms/batch':>10}{'first 10%':>11}{'last 10%':>10}{'total s':>9}{'reopens':>9}{'MB':>8}")
    for mode, r in res.items():
        print(f"{mode:<30}{r['ms_per_batch']:>10.1f}{r['first_10pct_ms']:>11.1f}{r['last_10pct_ms']:>10.1f}"
              f"{r['total_s']:>9.1f}{r['reopens']:>9}{r['mb']:>8.0f}")
    a = res["kept open"]["ms_per_batch"]
    for mode, r in list(res.items())[1:]:
        print(f"{mode}: {r['ms_per_batch'] - a:+.1f} ms per batch ({r['ms_per_batch'] / a:.2f}x kept open)")
    w = res["on demand, status every 1 s"]["reader_waits"]
    if w:
        print(f"reader during the run: {len(w)} opens, wait mean {1000 * sum(w) / len(w):.0f} ms, "
              f"max {1000 * max(w):.0f} ms")
    print(f"Store.status() on the finished store: {status_s * 1000:.0f} ms")


if __name__ == "__main__":
    main()
