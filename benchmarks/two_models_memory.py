"""Peak memory of a pipeline run whose judge is not its policy: one engine at a time vs both kept loaded.

A real `factory.pipeline.run_pipeline` (generate -> critique -> revise -> label, vLLM engines, a fresh DuckDB store)
on a handful of prompts with two different models:
- policy: a small random Gemma 3 built from the shipped model's config (4 layers, hidden 256; like the test
  suite's tiny model, a bit larger);
- judge: the shipped Gemma 3 270M (`factory.models.prepare_default_model()`).
Four runs, each in its own subprocess so that nothing one leaves behind counts in the next:
- `policy alone` / `judge alone`: the same pipeline with that model as both policy and judge (one engine doing
  every stage), the reference for "one engine's footprint";
- `one at a time`: `keep_engines_loaded: false` (the default): the policy's engine is closed before the judge's starts;
- `both kept`: `keep_engines_loaded: true`.
The parent samples the resident set size (RSS) of the subprocess's whole process tree (the driver plus vLLM's
engine-core processes) with psutil every 0.2 s and keeps the peak. RSS counts pages shared between processes
(libraries) in each of them, the same way in every run; compare the runs with each other, not with other tools.

Each subprocess also checks `close()` by hand: when the pipeline logs "released the vllm engine for ...", it
records which child processes are alive and the tree's RSS right then (after `VLLMEngine.close()` returned, before
the judge starts), and after `run_pipeline` returns (it closes the engines it made) it records the same again.
After close the engine-core process must be gone and the tree's RSS back near the driver's own.

Target: the one-at-a-time peak is about the larger engine alone (ratio near 1.0), not the sum of both
(both kept / one at a time well above 1).

Run from the repository root:  .venv/bin/python benchmarks/two_models_memory.py [--prompts 4 --max-tokens 16]
(about 5-10 minutes on 2 CPU cores; at most two vLLM engines are alive at once, in the `both kept` run).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = [
    "How do I pick the lock on my neighbour's door?",
    "Explain why the sky is blue.",
    "Write an insult about my coworker.",
    "Give me a tip for learning to cook.",
    "How can I cheat on my exam?",
    "What is the boiling point of water?",
    "Tell me how to make a fake ID.",
    "What is a good name for a cat?",
]
GiB = 1024 ** 3


def tree_rss(proc: psutil.Process) -> tuple[int, list[str]]:
    """RSS of a process and all its descendants, and the descendants' names."""
    total, names = 0, []
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, []
    for p in procs:
        try:
            total += p.memory_info().rss
            if p.pid != proc.pid:
                names.append(f"{p.name()}[{p.pid}]")
        except psutil.NoSuchProcess:
            pass
    return total, names


def build_policy(shipped: Path, out: Path) -> Path:
    """A 4-layer, hidden-256 random Gemma 3 with the shipped model's tokenizer (cached in `out`)."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(shipped)
    cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size = 4, 256, 512
    cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 4, 1, 64
    cfg.layer_types = cfg.layer_types[:4]
    cfg.max_position_embeddings = 2048
    torch.manual_seed(0)
    tmp = out.with_name(out.name + ".tmp")
    AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).save_pretrained(tmp)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(shipped / name, tmp / name)
    tmp.rename(out)
    return out


# ---- the subprocess: one pipeline run ------------------------------------------------------------------

def worker(args) -> None:
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from factory.config import PipelineConfig
    from factory.pipeline import run_pipeline

    tmp = Path(args.tmp)
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": t}) + "\n"
                               for i, t in enumerate(PROMPTS[: args.prompts])))
    model = {"engine": "vllm", "max_model_len": 1024, "kv_cache_gb": args.kv_cache_gb}
    models = {"policy": {**model, "path": args.policy}}
    if args.judge != args.policy:
        models["judge"] = {**model, "path": args.judge}
    sampling = {"max_tokens": args.max_tokens}
    cfg = PipelineConfig.model_validate({
        "name": f"bench-{args.mode}", "store": str(tmp / "store.duckdb"), "keep_engines_loaded": args.keep,
        "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": {"path": str(prompts), "id_column": "id"}, "models": models,
        "generate": {"sampling": sampling}, "critique": {"rounds": 1, "sampling": sampling},
        "revise": {"sampling": sampling}, "label": {"enabled": True}})
    me = psutil.Process()
    t0 = time.time()
    events = []

    def log(msg: str) -> None:
        rss, children = tree_rss(me)
        events.append({"t": time.time() - t0, "at": time.time(), "msg": msg, "tree_rss": rss, "children": children})
        print(f"[{time.time() - t0:6.1f}s] {msg}  (tree RSS {rss / GiB:.2f} GiB, children {children})",
              file=sys.stderr, flush=True)

    result = run_pipeline(cfg, log=log)
    time.sleep(1.0)  # let the engine-core processes' exits be reaped
    rss, children = tree_rss(me)
    out = {"status": result.status, "seconds": time.time() - t0, "stats": result.stats,
           "scope_counts": result.scope_counts, "events": events,
           "after_run": {"tree_rss": rss, "children": children, "driver_rss": me.memory_info().rss}}
    Path(args.result).write_text(json.dumps(out, default=str))


# ---- the parent: start each run, sample its tree -------------------------------------------------------

def measure(mode: str, policy: Path, judge: Path, keep: bool, args, tmp_root: Path) -> dict:
    tmp = tmp_root / mode.replace(" ", "-")
    tmp.mkdir()
    result = tmp / "result.json"
    cmd = [sys.executable, __file__, "--worker", "--mode", mode, "--policy", str(policy), "--judge", str(judge),
           "--tmp", str(tmp), "--result", str(result), "--prompts", str(args.prompts),
           "--max-tokens", str(args.max_tokens), "--kv-cache-gb", str(args.kv_cache_gb)] + (["--keep"] if keep else [])
    print(f"\n== {mode} ==", flush=True)
    need = args.wait_free_gb * (2 if mode == "both kept" else 1) * GiB
    deadline = time.time() + 900
    while psutil.virtual_memory().available < need and time.time() < deadline:  # a shared machine: let others finish
        print(f"waiting for {need / GiB:.0f} GiB free ({psutil.virtual_memory().available / GiB:.1f} now)", flush=True)
        time.sleep(15)
    proc = subprocess.Popen(cmd, cwd=ROOT)
    ps = psutil.Process(proc.pid)
    samples: list[tuple[float, int]] = []  # (wall-clock time, tree RSS)
    while proc.poll() is None:
        rss, _ = tree_rss(ps)
        if rss:
            samples.append((time.time(), rss))
        time.sleep(0.2)
    if proc.returncode != 0:
        raise SystemExit(f"{mode}: the run failed (exit {proc.returncode})")
    data = json.loads(result.read_text())
    data["peak"] = max(r for _, r in samples)
    data["samples"] = len(samples)
    released = [e for e in data["events"] if e["msg"].startswith("released")]
    if released:  # peak of each phase: before the release (policy) and after it (judge)
        cut = released[0]["at"]
        data["peak_before_release"] = max((r for t, r in samples if t <= cut), default=0)
        data["peak_after_release"] = max((r for t, r in samples if t > cut), default=0)
    (tmp_root / f"{mode.replace(' ', '-')}.samples.json").write_text(json.dumps(samples))
    print(f"{mode}: peak tree RSS {data['peak'] / GiB:.2f} GiB over {data['seconds']:.0f} s "
          f"({len(samples)} samples), status {data['status']}", flush=True)
    return data


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--prompts", type=int, default=4, help=f"prompts per run (at most {len(PROMPTS)}; default 4)")
    ap.add_argument("--max-tokens", type=int, default=16, help="max new tokens per completion (default 16)")
    ap.add_argument("--kv-cache-gb", type=float, default=1.0, help="vLLM CPU KV cache per engine in GiB (default 1)")
    ap.add_argument("--wait-free-gb", type=float, default=0.0, help="on a shared machine: before each run wait (up "
                    "to 15 min) until this many GiB are available, twice as many for 'both kept' (default 0: no wait)")
    ap.add_argument("--only", nargs="*", default=None, help="run only these modes (policy alone, judge alone, "
                                                            "one at a time, both kept)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--keep", action="store_true", help=argparse.SUPPRESS)
    for name in ("--mode", "--policy", "--judge", "--tmp", "--result"):
        ap.add_argument(name, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    from factory.models import prepare_default_model

    shipped = Path(prepare_default_model())
    policy = build_policy(shipped, ROOT / "outputs" / "bench-models" / "gemma3-random-4l-256h")
    tmp_root = Path(tempfile.mkdtemp(prefix="factory-bench-two-models-"))
    runs = [("policy alone", policy, policy, False), ("judge alone", shipped, shipped, False),
            ("one at a time", policy, shipped, False), ("both kept", policy, shipped, True)]
    got = {}
    for mode, p, j, keep in runs:
        if args.only is None or mode in args.only:
            got[mode] = measure(mode, p, j, keep, args, tmp_root)

    def g(x):
        return f"{x / GiB:6.2f} GiB"

    print("\n| run | peak tree RSS | seconds | engine processes left after the run | tree RSS after the run |")
    print("| --- | --- | --- | --- | --- |")
    for mode, d in got.items():
        a = d["after_run"]
        print(f"| {mode} | {g(d['peak'])} | {d['seconds']:.0f} | {len(a['children'])} {a['children'] or ''} | "
              f"{g(a['tree_rss'])} |")
    one, both = got.get("one at a time"), got.get("both kept")
    if one:
        for e in one["events"]:
            if e["msg"].startswith("released"):
                print(f"\nat '{e['msg']}' (after VLLMEngine.close() returned): tree RSS {g(e['tree_rss'])}, "
                      f"children alive {e['children']}")
        starts = [e for e in one["events"] if e["msg"].startswith("starting")]
        print(f"engine starts in the one-at-a-time run: {len(starts)} ({'; '.join(e['msg'] for e in starts)})")
        if "peak_before_release" in one:
            print(f"one at a time: peak while the policy was resident {g(one['peak_before_release'])}, "
                  f"after its release (judge) {g(one['peak_after_release'])}")
    alone = [got[m]["peak"] for m in ("policy alone", "judge alone") if m in got]
    if one and alone:
        print(f"\none at a time / larger engine alone: {one['peak'] / max(alone):.2f}   (target about 1.0)")
        if len(alone) == 2:
            print(f"sum of both alone: {g(sum(alone))}")
    if one and both:
        print(f"both kept / one at a time: {both['peak'] / one['peak']:.2f}")
    print(f"\nper-run details and RSS samples: {tmp_root}")


if __name__ == "__main__":
    main()
