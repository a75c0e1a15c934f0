"""Throughput of factory's generate stage with executor: ray at 1 and 2 engine replicas, side by side.

Each configuration runs the real `factory.stages.generate.generate` into a fresh DuckDB store through
`RayReplicas` (factory/engines/ray_replicas.py): the driver encodes and writes, the replicas (Ray actors, one
vLLM engine each, `--cpus-per-replica` CPUs reserved each) generate. Replica start-up (model load) is timed
apart and left out of the throughput; a warm-up pass on other prompts runs first, untimed. Same prompts, model
(the shipped Gemma 3 270M unless --model), greedy decoding and max_tokens for both, and the outputs of the two
configurations are compared (they must be equal). Prints output tokens/s per configuration and the 2/1 ratio.

Expected: each replica runs vLLM's CPU backend on the threads Ray reserved for it (ray_replicas.py turns off
vLLM's pinning of every replica to all cores, which made 2 replicas slower than 1: ratio 0.82). On this 2-core
machine the ratio is then below 2 because the driver (encoding, parsing, DuckDB writes) shares the two cores with
the replicas and both replicas share one memory bus; measured 1.63 (64 prompts, 64 tokens). On GPUs, one replica
per GPU shares nothing but the driver, and generation is bound by each GPU's own memory bandwidth, so throughput
scales close to linearly with replicas until the driver (a few percent of the stage, see generate_overhead.py)
or too few prompts per replica per batch (write_batch_size / replicas) becomes the limit.

Run from the repository root:  .venv/bin/python benchmarks/ray_replicas.py [--prompts 64 --max-tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from generate_overhead import build_prompts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="default", help="local model folder (default: the shipped Gemma 3 270M)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts per timed pass (default 64)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max new tokens per prompt (default 64)")
    ap.add_argument("--cpus-per-replica", type=float, default=1.0, help="CPUs Ray reserves per replica (default 1)")
    args = ap.parse_args()
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import ray

    from factory.config import PipelineConfig, PromptsConfig, RayConfig, VLLMModelConfig
    from factory.engines.ray_replicas import RayReplicas
    from factory.prompts import stage_prompts
    from factory.stages.common import Context
    from factory.pipeline import add_prompts
    from factory.stages.generate import generate
    from factory.store import Store

    tmp = Path(tempfile.mkdtemp(prefix="factory-bench-ray-"))
    texts = build_prompts(args.prompts + 8)
    warm_file, timed_file = tmp / "warm.jsonl", tmp / "timed.jsonl"
    warm_file.write_text("".join(json.dumps({"prompt": p + " (warm-up)"}) + "\n" for p in texts[:8]))
    timed_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in texts[8:]))
    mcfg = VLLMModelConfig(path=args.model, max_model_len=1024)
    cfg = PipelineConfig(name="bench-ray", models={"policy": mcfg},
                         generate={"sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}})
    ray.init(num_cpus=max(2, int(2 * args.cpus_per_replica)), include_dashboard=False, log_to_driver=False)

    results = {}
    for replicas in (1, 2):
        t0 = time.perf_counter()
        engine = RayReplicas(mcfg, RayConfig(replicas=replicas, num_cpus=args.cpus_per_replica), seed=cfg.seed)
        startup = time.perf_counter() - t0
        tokens, seconds, texts_out = 0, 0.0, None
        for name, path in (("warm", warm_file), ("timed", timed_file)):
            prompts = tmp / f"r{replicas}-{name}.parquet"
            stage_prompts(PromptsConfig(path=str(path)), prompts)
            with Store.open(str(tmp / f"r{replicas}-{name}.duckdb")) as store:
                ctx = Context(store=store, run_id="bench", seed=cfg.seed)
                add_prompts(store, "bench", prompts)
                t1 = time.perf_counter()
                generate(ctx, cfg, lambda: engine)
                elapsed = time.perf_counter() - t1
                if name == "timed":
                    seconds = elapsed
                    rows = store.query("SELECT * FROM responses")
                    tokens = sum(r["output_tokens"] for r in rows)
                    texts_out = sorted((r["prompt_id"], r["text"]) for r in rows)
        engine.close()
        results[replicas] = {"startup_s": startup, "seconds": seconds, "tokens": tokens, "texts": texts_out}
        print(f"{replicas} replica(s): start-up {startup:.1f} s, {tokens} output tokens in {seconds:.1f} s = "
              f"{tokens / seconds:.1f} tokens/s", flush=True)

    one, two = (results[r]["tokens"] / results[r]["seconds"] for r in (1, 2))
    print(f"\nthroughput 2 replicas / 1 replica = {two / one:.2f}  (ideal 2.00; {args.prompts} prompts, "
          f"{args.max_tokens} max tokens, {args.cpus_per_replica:g} CPU per replica, {os.cpu_count()} cores)")
    print(f"outputs equal across the two configurations: {results[1]['texts'] == results[2]['texts']}")
    ray.shutdown()


if __name__ == "__main__":
    main()
