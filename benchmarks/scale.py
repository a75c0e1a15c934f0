"""factory's own cost at scale: the REAL `run_pipeline` over N synthetic prompts with an engine that answers
instantly (tests/instant_engine.py: the real Gemma 3 tokenizer, deterministic outputs, no model), so what is
measured is everything except the model: reading prompts, pending-work queries, rendering, tokenization,
parsing, the echo check, batching and DuckDB writes (issue 11, item 7).

The config has the quickstart's shape (pipelines/quickstart.yaml: generate, 1 round of critique + revision with
few-shot plain prompts, pairs, logprob labels with 2 principles x both orders); only the store, the prompts file
and (with --write-batch-size) the batch size are changed. The prompts are synthetic: 10-60 words each, one in five
a multi-turn conversation (a `messages` list in the prompt column).

Each size runs in its own subprocess (so the peak RSS is per size), on a fresh store; then a second subprocess
re-runs the same config on that store: nothing is pending, so it must make zero engine calls (it fails loudly
otherwise). Printed per size: rows written per table, wall seconds, rows/s (all rows written across the data
tables / wall), per-stage seconds (each stage function's wall time, and the `run_progress` table's figure),
peak RSS, and the no-op re-run's wall time and peak RSS; then the time ratio between consecutive sizes (linear:
2x prompts should take <= 2.1x the time) and the targets beside the figures.

    .venv/bin/python benchmarks/scale.py --prompts 2000 8000          # sizes, each in its own process
    .venv/bin/python benchmarks/scale.py --prompts 2000 --profile     # cProfile of one size: top 25 in factory/
    .venv/bin/python benchmarks/scale.py --prompts 2000 --keep        # keep the stores (path printed)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
# Tokenizers run as in a real run: batched encodes use every core unless TOKENIZERS_PARALLELISM=false is set.

QUICKSTART = ROOT / "pipelines" / "quickstart.yaml"
TARGET_ROWS_PER_S = 10_000
TARGET_1M_MINUTES = 20
TARGET_RSS_GB = 3.0
TARGET_NOOP_1M_S = 60
LINEAR_RATIO = 2.1  # 2x prompts -> at most 2.1x the time

# Words of the prompts (none of them is a word of the instant engine's answers, see tests/instant_engine.py).
VOCAB = ("how", "do", "I", "the", "a", "my", "to", "and", "of", "is", "what", "why", "can", "you", "please",
         "explain", "help", "me", "write", "about", "neighbour", "friend", "boss", "school", "garden", "recipe",
         "bread", "travel", "money", "bank", "password", "computer", "phone", "car", "bicycle", "lock", "door",
         "house", "dog", "cat", "weather", "rain", "sun", "history", "war", "music", "song", "poem", "story",
         "joke", "insult", "cheat", "exam", "steal", "borrow", "build", "fix", "clean", "cook", "learn", "teach",
         "quickly", "safely", "cheaply", "without", "anyone", "noticing", "for", "with", "in", "on", "at",
         "tomorrow", "today", "week", "year", "best", "worst", "way", "tips", "advice", "plan", "list", "three",
         "five", "reasons", "should", "would", "could", "they", "we", "it", "that", "this", "some", "every",
         "office", "city", "train", "ticket", "doctor", "medicine", "sleep", "coffee", "tea", "water", "fire")


def synthetic_prompts(n: int, seed: int = 0) -> Iterator[dict]:
    """n distinct prompt records, one at a time (the input file is the user's; building it must not count in the
    run's peak RSS): 10-60 words; every fifth a conversation (user, assistant, user)."""
    rng = random.Random(seed)

    def sentence(lo: int, hi: int) -> str:
        words = [rng.choice(VOCAB) for _ in range(rng.randint(lo, hi))]
        return " ".join(words).capitalize() + "?"

    for i in range(n):
        if i % 5 == 4:
            prompt = [{"role": "user", "content": sentence(5, 25)},
                      {"role": "assistant", "content": sentence(5, 20).rstrip("?") + "."},
                      {"role": "user", "content": sentence(5, 20)}]
        else:
            prompt = sentence(10, 60)
        yield {"id": f"s{i}", "prompt": prompt}


def write_prompts(path: Path, n: int) -> Path:
    with path.open("w") as f:
        for rec in synthetic_prompts(n):
            f.write(json.dumps(rec) + "\n")
    return path


def pipeline_config(store: Path, prompts: Path, write_batch_size: int | None = None):
    from factory.config import load_pipeline_config

    overrides = [f"store={store}", f"prompts.path={prompts}", "prompts.column=prompt", "prompts.id_column=id",
                 "name=scale", "label.gate=null"]  # the gate's one-off calibration is not per-prompt work
    if write_batch_size:
        overrides.append(f"write_batch_size={write_batch_size}")
    cfg = load_pipeline_config(QUICKSTART, overrides)
    cfg.constitution = str(ROOT / cfg.constitution) if not Path(cfg.constitution).is_absolute() else cfg.constitution
    return cfg


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


# Functions run_pipeline calls, as "module:name" under factory/ (a name no longer there is skipped). `run_stage`
# is every stage with its adoption check (factory/stages/reuse.py); the stage functions are inside it.
STAGES = ("pipeline:check_models", "pipeline:stage_prompts", "pipeline:add_prompts", "stages.generate:generate", "stages.critique:critique",
          "stages.revise:revise", "stages.pairs:build_pairs", "stages.label:label", "stages.reuse:run_stage",
          "pipeline:build_report", "pipeline:save_report", "pipeline:_scope_counts", "pipeline:_example_pair")


def time_stages(timings: dict[str, float]) -> None:
    """Wrap the stage functions run_pipeline calls to time each one whole: job building, pending queries and writes
    included (`run_progress` counts from the stage's engine start)."""
    import importlib

    for qual in STAGES:
        mod_name, name = qual.split(":")
        mod = importlib.import_module(f"factory.{mod_name}")
        fn = getattr(mod, name, None)
        if fn is None:
            continue
        fp = mod

        def timed(*a, _fn=fn, _name=name, **kw):
            t0, hwm = time.perf_counter(), vm_kb()["VmHWM"]
            try:
                return _fn(*a, **kw)
            finally:
                timings[_name] = timings.get(_name, 0.0) + time.perf_counter() - t0
                if vm_kb()["VmHWM"] > hwm:  # the peak RSS rose during this call (nested calls count for both)
                    PEAK_RISES[_name] = vm_kb()["VmHWM"] // 1024
                if _name == "run_stage":
                    MEMORY.append(memory_after(a[0], a[1], a[3]))
        setattr(fp, name, timed)


MEMORY: list[dict] = []  # after each stage: the process's RSS and DuckDB's own accounting


PEAK_RISES: dict[str, int] = {}  # function -> the peak RSS (MB) when a call of it last raised the peak


def vm_kb() -> dict[str, int]:
    """Current (VmRSS) and peak (VmHWM) resident memory of this process, in KiB (Linux /proc)."""
    status = Path("/proc/self/status").read_text()
    return {k: int(v) for k, v in re.findall(r"^(VmRSS|VmHWM):\s+(\d+) kB", status, re.M)}


def memory_after(ctx, spec, params) -> dict:
    """After a stage: current and peak RSS and DuckDB's memory by tag (`duckdb_memory()`), in MB."""
    from factory.stages.reuse import spec_key

    kb = vm_kb()
    duck = {r[0]: round(r[1] / 2**20) for r in ctx.store.con.execute(
        "SELECT tag, memory_usage_bytes FROM duckdb_memory() WHERE memory_usage_bytes > 0").fetchall()}
    return {"stage": spec_key(spec, params), "rss_mb": kb["VmRSS"] // 1024, "peak_mb": kb["VmHWM"] // 1024,
            "duckdb_mb": duck}


def child(n: int, workdir: Path, noop: bool, write_batch_size: int | None, profile: bool) -> dict:
    """One run in this process; returns its figures (printed as JSON by main)."""
    from instant_engine import InstantEngines, shipped_tokenizer

    from factory.pipeline import run_pipeline
    from factory.store import TABLES, Store

    shipped_tokenizer()  # the engine's start (loading its tokenizer) is not factory's cost
    prompts = workdir / "prompts.jsonl"
    if not noop:
        write_prompts(prompts, n)
    cfg = pipeline_config(workdir / "scale.duckdb", prompts, write_batch_size)
    timings: dict[str, float] = {}
    time_stages(timings)
    engines = InstantEngines()
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    result = run_pipeline(cfg, engines=engines)
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
        if os.environ.get("SCALE_PROFILE_OUT"):  # the raw stats, for pstats callers/callees
            prof.dump_stats(os.environ["SCALE_PROFILE_OUT"])
    rss = peak_rss_gb()
    assert result.status == "completed", (result.status, result.message)
    with Store.open(cfg.store, read_only=True) as s:
        counts = {t: s.count(t) for t in TABLES}
        progress = {p["stage"]: p["seconds"] for p in s.query(
            "SELECT stage, seconds FROM run_progress WHERE run_id = ?", [result.run_id])}
    out = {"n": n, "noop": noop, "wall_s": wall, "peak_rss_gb": rss, "counts": counts, "stages_s": timings,
           "progress_s": progress, "engine_gets": engines.gets, "model_calls": engines.model_calls,
           "engine_calls": dict(engines.calls), "engine_output_s": engines.output_seconds,
           "write_batch_size": cfg.write_batch_size, "memory": MEMORY,
           "peak_rises": PEAK_RISES}
    if prof is not None:
        import io
        import pstats

        buf = io.StringIO()
        st = pstats.Stats(prof, stream=buf)
        st.sort_stats("cumulative").print_stats(r"factory/", 25)
        buf.write("\n---- top 15 by own time (anywhere) ----\n")
        st.sort_stats("tottime").print_stats(15)
        out["profile"] = buf.getvalue()
    return out


def run_child(n: int, workdir: Path, noop: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--_child", str(n), "--_dir", str(workdir)]
    if noop:
        cmd.append("--_noop")
    if args.write_batch_size:
        cmd += ["--write-batch-size", str(args.write_batch_size)]
    if args.profile and not noop:
        cmd.append("--profile")
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"the run of {n} prompts failed (exit {proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])


FIXED = ("check_models",)  # a fixed start per run (tokenizers loaded, models fingerprinted), whatever N


def scaling_s(r: dict) -> float:
    """Wall seconds without the fixed start: the part that grows with N."""
    return r["wall_s"] - sum(r["stages_s"].get(k, 0.0) for k in FIXED)


def report(full: dict, noop: dict) -> None:
    n, c = full["n"], full["counts"]
    rows = sum(c.values())
    rate = rows / full["wall_s"]
    print(f"\n=== {n:,} prompts (write_batch_size {full['write_batch_size']}) ===")
    print("rows written: " + ", ".join(f"{t} {v:,}" for t, v in c.items()) + f"; total {rows:,}")
    print(f"wall {full['wall_s']:.1f} s; {rate:,.0f} rows/s (target >= {TARGET_ROWS_PER_S:,}); "
          f"{n / full['wall_s']:,.0f} prompts/s; peak RSS {full['peak_rss_gb']:.2f} GB (target <= {TARGET_RSS_GB} GB "
          f"at 1M)")
    print(f"without the fixed start ({', '.join(FIXED)}: {full['wall_s'] - scaling_s(full):.1f} s): "
          f"{scaling_s(full):.1f} s, {rows / scaling_s(full):,.0f} rows/s")
    print("stage seconds (whole function): " + ", ".join(f"{k} {v:.1f}" for k, v in full["stages_s"].items()))
    print("stage seconds (run_progress, from the stage's engine start): "
          + ", ".join(f"{k} {v:.1f}" for k, v in full["progress_s"].items()))
    print(f"engine: {full['engine_gets']} engine requests, {full['model_calls']} model calls, "
          f"calls {full['engine_calls']}; the stand-in's own time making outputs (inside the wall time, what a "
          f"model would replace) {full['engine_output_s']:.1f} s")
    proj = (full["wall_s"] - scaling_s(full) + 1_000_000 / n * scaling_s(full)) / 60
    print(f"1M prompts at this rate (fixed start + linear): {proj:,.0f} min (target <= {TARGET_1M_MINUTES} min)")
    print(f"no-op re-run: wall {noop['wall_s']:.1f} s ({scaling_s(noop):.1f} s without the fixed start), peak RSS "
          f"{noop['peak_rss_gb']:.2f} GB, model calls {noop['model_calls']}, engine requests {noop['engine_gets']}; "
          f"at 1M (fixed start + linear) {noop['wall_s'] - scaling_s(noop) + 1_000_000 / n * scaling_s(noop):,.0f} s "
          f"(target <= {TARGET_NOOP_1M_S} s)")
    print("no-op stage seconds (whole function): "
          + ", ".join(f"{k} {v:.1f}" for k, v in noop["stages_s"].items()))
    print("memory after each stage (MB: RSS now / peak so far; DuckDB by tag):")
    for m in full["memory"]:
        print(f"  {m['stage']:<12} {m['rss_mb']:>6,} / {m['peak_mb']:>6,}  "
              + ", ".join(f"{k.lower()} {v:,}" for k, v in m["duckdb_mb"].items()))
    print("the peak RSS last rose during (MB): " + ", ".join(f"{k} {v:,}" for k, v in full["peak_rises"].items()))
    print(f"no-op: the peak RSS last rose during (MB): "
          + ", ".join(f"{k} {v:,}" for k, v in noop["peak_rises"].items()))
    if noop["counts"] != c:
        print(f"!! the no-op re-run changed the row counts: {noop['counts']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, nargs="+", default=[2000, 20000], help="sizes, each in its own process")
    ap.add_argument("--keep", action="store_true", help="keep the stores and prompt files (paths printed)")
    ap.add_argument("--profile", action="store_true", help="cProfile the first size; print the top 25 in factory/")
    ap.add_argument("--write-batch-size", type=int, default=None, help="override the config's write_batch_size")
    ap.add_argument("--_child", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--_dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--_noop", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child is not None:
        sys.path.insert(0, str(ROOT / "tests"))
        out = child(args._child, args._dir, args._noop, args.write_batch_size, args.profile)
        if out.get("profile"):
            sys.stderr.write(out.pop("profile"))
        if args._noop and out["model_calls"]:
            raise SystemExit(f"the no-op re-run made {out['model_calls']} engine calls; it must make none")
        print(json.dumps(out))
        return

    sizes = args.prompts[:1] if args.profile else args.prompts
    print(f"factory scale benchmark: sizes {sizes}, config {QUICKSTART.relative_to(ROOT)}, instant engine; "
          f"{os.cpu_count()} CPUs")
    results = []
    for n in sizes:
        workdir = Path(tempfile.mkdtemp(prefix=f"factory-scale-{n}-"))
        try:
            if args.profile:
                cmd = [sys.executable, __file__, "--_child", str(n), "--_dir", str(workdir), "--profile"]
                if args.write_batch_size:
                    cmd += ["--write-batch-size", str(args.write_batch_size)]
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
                print(proc.stderr)
                if proc.returncode:
                    raise SystemExit(proc.returncode)
                full = json.loads(proc.stdout.strip().splitlines()[-1])
                print(f"{n:,} prompts under cProfile: wall {full['wall_s']:.1f} s (profiling slows it down)")
                return
            full = run_child(n, workdir, False, args)
            noop = run_child(n, workdir, True, args)
            report(full, noop)
            results.append((full, noop))
        finally:
            if args.keep:
                print(f"kept {workdir}")
            else:
                shutil.rmtree(workdir, ignore_errors=True)
    if len(results) > 1:
        print("\n=== linearity (time ratio between consecutive sizes; linear means ratio ~ size ratio) ===")
        for (a, an), (b, bn) in zip(results, results[1:]):
            k = b["n"] / a["n"]
            r = b["wall_s"] / a["wall_s"]
            rs = scaling_s(b) / scaling_s(a)
            rn = bn["wall_s"] / an["wall_s"]
            bound = LINEAR_RATIO / 2 * k
            print(f"{a['n']:,} -> {b['n']:,} prompts ({k:g}x): run {r:.2f}x (target <= {bound:.2f}x: "
                  f"{'ok' if r <= bound else 'MISSED'}), without the fixed start {rs:.2f}x "
                  f"({'ok' if rs <= bound else 'MISSED'}), no-op re-run {rn:.2f}x, peak RSS "
                  f"{a['peak_rss_gb']:.2f} -> {b['peak_rss_gb']:.2f} GB")


if __name__ == "__main__":
    main()
