"""Overhead of factory's generate stage over raw vLLM, and the transformers engine for comparison.

On the same prompts, model and sampling this times
  * raw vLLM:          `LLM.generate` on the token ids, nothing else;
  * factory generate:  `factory.stages.generate.generate` with a fresh DuckDB store (encode, anti-join, per-request
                       sampling params, parsing and the store writes are all inside the timed call);
  * transformers:      factory's TransformersEngine.generate on the same token ids (skip with --skip-transformers);
and prints output tokens/s of each and the ratios. Target: factory / raw vLLM >= 0.97 (issue 11).

Fairness: one vLLM `LLM` serves both vLLM paths (factory's VLLMEngine; the raw path calls `engine.llm` directly);
every path gets the same rendered prompts (templates.plain_generate, as the stage renders them), the same token ids
(the engine's encode, which adds BOS), greedy decoding, the same max_tokens and the same stop list
(templates.PLAIN_STOPS + sampling.stop, what the stage passes), and output tokens are counted the same way
(len(token_ids) of each vLLM output; the transformers engine's own count of generated tokens).

Run from the repository root:  .venv/bin/python benchmarks/generate_overhead.py [--prompts 32 --max-tokens 64 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

QUESTIONS = [
    "What causes the seasons on Earth?",
    "How do I keep basil alive on a windowsill?",
    "Why is the sky blue?",
    "What is a good way to start learning to cook?",
    "How does a bicycle stay upright?",
    "What should I pack for a weekend hike?",
    "Why do cats purr?",
    "How can I sleep better at night?",
    "What is the difference between weather and climate?",
    "How do vaccines train the immune system?",
    "Give me a tip for writing a clear email.",
    "Why does bread rise?",
    "How do I politely decline an invitation?",
    "What makes a password strong?",
    "How do plants drink water?",
    "What is a simple way to save money each month?",
]


def build_prompts(n: int) -> list[str]:
    """n distinct prompts, deterministic: the questions above in turn, each with its index."""
    return [f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})" for i in range(n)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local model folder (default: the shipped Gemma 3 270M)")
    ap.add_argument("--prompts", type=int, default=32, help="number of prompts (default 32)")
    ap.add_argument("--max-tokens", type=int, default=64, help="max new tokens per prompt (default 64)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per path (default 1)")
    ap.add_argument("--skip-transformers", action="store_true", help="do not time the transformers engine")
    ap.add_argument("--no-prefix-caching", action="store_true",
                    help="start vLLM with prefix caching off (factory's default is on)")
    args = ap.parse_args()
    if args.prompts < 1 or args.max_tokens < 1 or args.repeats < 1:
        ap.error("--prompts, --max-tokens and --repeats must be >= 1")

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # VLLM_CPU_KVCACHE_SPACE is set by VLLMEngine from the vLLM section's kv_cache_gb.

    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from factory import templates
    from factory.config import (ModelBase, PipelineConfig, PromptsConfig, SamplingConfig, TransformersModelConfig,
                                VLLMModelConfig)
    from factory.engines.vllm_engine import VLLMEngine
    from factory.models import prepare_default_model, resolve_model
    from factory.prompts import load_prompts, stage_prompts
    from factory.stages.common import Context
    from factory.pipeline import add_prompts
    from factory.stages.generate import generate
    from factory.store import Store

    if args.model is None:
        model_dir, cfg_path = prepare_default_model(), "default"
    else:
        model_dir, cfg_path = resolve_model(args.model), args.model

    # Prefix caching: we keep factory's default (on), since that is what users run, and empty vLLM's prefix cache
    # (LLM.reset_prefix_cache, untimed) before every timed vLLM pass. Each pass of either path then starts from the
    # same cold cache, as a fresh `factory run` would: the shared few-shot preamble is reused within the pass but
    # nothing is carried over from an earlier pass, so the order of the passes does not matter and the transformers
    # engine (which has no cache) is not compared with a vLLM that skips prefill. The passes still alternate
    # (raw, factory, raw, factory ...) so slow drift in machine load hits both vLLM paths alike.
    # --no-prefix-caching starts vLLM with caching off instead.
    mcfg = VLLMModelConfig(path=cfg_path, max_model_len=1024,
                           enable_prefix_caching=not args.no_prefix_caching)
    cfg = PipelineConfig(name="bench-generate", seed=0, models={"policy": mcfg},
                         generate={"sampling": {"temperature": 0.0, "max_tokens": args.max_tokens}})
    # chunk_size and write_batch_size stay at factory's defaults: the stage keeps a whole page (chunk_size rows) in
    # flight and commits finished rows every write_batch_size, while the raw path makes one call for all.
    sampling: SamplingConfig = cfg.generate.sampling
    stop = templates.PLAIN_STOPS + sampling.stop  # exactly what the stage passes for prompt_format "plain"

    tmp = tempfile.TemporaryDirectory(prefix="factory-bench-")
    prompts_file = Path(tmp.name) / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in build_prompts(args.prompts)))
    prompt_rows = load_prompts(PromptsConfig(path=str(prompts_file)))
    assert len(prompt_rows) == args.prompts, "prompts must be distinct"
    staged = Path(tmp.name) / "prompts.parquet"
    stage_prompts(PromptsConfig(path=str(prompts_file)), staged)

    print(f"starting vLLM on {model_dir} ...", flush=True)
    t0 = time.perf_counter()
    engine = VLLMEngine(mcfg, str(model_dir), seed=cfg.seed)
    print(f"vLLM started in {time.perf_counter() - t0:.1f} s", flush=True)

    # The same rendering the stage does (plain format, common special-token strings broken).
    rendered = [templates.plain_generate(p["text"], templates.COMMON_SPECIAL_TOKENS) for p in prompt_rows]
    ids = [engine.encode(r) for r in rendered]
    too_long = sum(len(x) + sampling.max_tokens > engine.max_model_len for x in ids)
    if too_long:
        raise SystemExit(f"{too_long} prompts do not fit max_model_len {engine.max_model_len}; the stage would "
                         "skip them and the comparison would be unequal. Lower --max-tokens.")
    raw_params = SamplingParams(temperature=0.0, max_tokens=sampling.max_tokens, stop=stop)

    def cold_cache():
        if not args.no_prefix_caching and not engine.llm.reset_prefix_cache():
            raise SystemExit("vLLM could not reset its prefix cache; rerun with --no-prefix-caching")

    def run_raw():
        cold_cache()
        t = time.perf_counter()
        outs = engine.llm.generate([TokensPrompt(prompt_token_ids=x) for x in ids], raw_params, use_tqdm=False)
        secs = time.perf_counter() - t
        return secs, [o.outputs[0].text for o in outs], [len(o.outputs[0].token_ids) for o in outs]

    def run_factory(rep: int):
        store = Store.open(Path(tmp.name) / f"factory-{rep}.duckdb")  # fresh: every row is pending
        try:
            run_id = store.start_run(cfg.name, "benchmark", cfg.model_dump(mode="json"), None)
            ctx = Context(store=store, run_id=run_id, seed=cfg.seed, write_batch_size=cfg.write_batch_size)
            add_prompts(store, run_id, staged)  # as run_pipeline does before the stage; not timed
            cold_cache()
            t = time.perf_counter()
            generate(ctx, cfg, lambda: engine)
            secs = time.perf_counter() - t
            order = {p["prompt_id"]: i for i, p in enumerate(prompt_rows)}
            response_ids = [r[0] for r in sorted(store.run_sql("SELECT response_id, prompt_id FROM responses"),
                                                 key=lambda r: order[r[1]])]
            stored = {r["response_id"]: r for r in store.fetch_by_ids("responses", response_ids)}
            store_tokens = store.run_sql("SELECT coalesce(sum(output_tokens), 0) FROM responses")[0][0]
            statuses = dict(store.run_sql("SELECT status, count(*) FROM responses GROUP BY status"))
            stats_tokens = sum(s.output_tokens for s in ctx.stats.values())
            engine_secs = sum(s.seconds for s in ctx.stats.values())  # inside VLLMEngine.generate
            store.finish_run(run_id, "completed", "", {})
        finally:
            store.close()
        texts = [stored[rid]["raw_output"] for rid in response_ids]
        toks = [stored[rid]["output_tokens"] for rid in response_ids]
        return secs, engine_secs, texts, toks, store_tokens, stats_tokens, statuses

    print("warm pass (untimed): every prompt once through vLLM ...", flush=True)
    run_raw()

    raw_secs, fac_secs, fac_engine_secs = [], [], []
    raw_tok_total = fac_tok_total = 0
    ref_texts = ref_toks = None
    texts_equal = tokens_equal = True
    store_checks = []
    for rep in range(args.repeats):
        secs, texts, toks = run_raw()
        raw_secs.append(secs)
        raw_tok_total += sum(toks)
        if ref_texts is None:
            ref_texts, ref_toks = texts, toks
        print(f"  pass {rep + 1}: raw vLLM          {secs:8.2f} s  {sum(toks):6d} tokens", flush=True)

        secs, engine_secs, texts, toks, store_tokens, stats_tokens, statuses = run_factory(rep)
        fac_secs.append(secs)
        fac_engine_secs.append(engine_secs)
        fac_tok_total += sum(toks)
        texts_equal &= texts == ref_texts
        tokens_equal &= toks == ref_toks
        store_checks.append((store_tokens, stats_tokens, sum(toks), statuses))
        print(f"  pass {rep + 1}: factory generate  {secs:8.2f} s  {sum(toks):6d} tokens (stored rows: "
              f"{', '.join(f'{k} {v}' for k, v in sorted(statuses.items()))})", flush=True)

    hf_secs, hf_tok_total, hf_same = [], 0, None
    if not args.skip_transformers:
        from factory.engines.hf_engine import TransformersEngine

        print("loading the transformers engine ...", flush=True)
        hcfg = TransformersModelConfig(**mcfg.model_dump(include=set(ModelBase.model_fields)), batch_size=len(ids))  # one batch
        hf = TransformersEngine(hcfg, str(model_dir), seed=cfg.seed)
        assert [hf.encode(r) for r in rendered] == ids, "the two engines tokenize differently"
        seeds = [0] * len(ids)
        hf.generate(ids[:2], sampling.model_copy(update={"max_tokens": 4}), seeds[:2], stop)  # warm-up
        for rep in range(args.repeats):
            t = time.perf_counter()
            outs = hf.generate(ids, sampling, seeds, stop)
            secs = time.perf_counter() - t
            hf_secs.append(secs)
            hf_tok_total += sum(o.output_tokens for o in outs)
            if hf_same is None:
                hf_same = sum(o.text == r for o, r in zip(outs, ref_texts))
            print(f"  pass {rep + 1}: transformers      {secs:8.2f} s  "
                  f"{sum(o.output_tokens for o in outs):6d} tokens", flush=True)

    def rate(tokens, secs):
        return tokens / sum(secs) if sum(secs) > 0 else float("nan")

    raw_rate, fac_rate = rate(raw_tok_total, raw_secs), rate(fac_tok_total, fac_secs)
    print()
    print(f"model {model_dir} | {args.prompts} prompts | max_tokens {args.max_tokens} | greedy | "
          f"repeats {args.repeats} | prefix caching {'off' if args.no_prefix_caching else 'on'}")
    print(f"{'path':<18}{'seconds':>10}{'output tokens':>16}{'output tok/s':>15}")
    table = [("raw vLLM", raw_secs, raw_tok_total), ("factory generate", fac_secs, fac_tok_total)]
    if hf_secs:
        table.append(("transformers", hf_secs, hf_tok_total))
    for name, secs, tokens in table:
        print(f"{name:<18}{sum(secs):>10.2f}{tokens:>16d}{rate(tokens, secs):>15.1f}")
    if args.repeats > 1:
        print("median seconds per pass: " + ", ".join(f"{n} {statistics.median(s):.2f}" for n, s, _ in table))
    print()
    print(f"factory generate: {sum(fac_engine_secs):.2f} s inside VLLMEngine.generate, "
          f"{sum(fac_secs) - sum(fac_engine_secs):.2f} s in the stage around it (encode, anti-join, parse, store writes)")
    ratio = fac_rate / raw_rate
    print(f"factory / raw vLLM:      {ratio:.3f}  (target >= 0.97: {'PASS' if ratio >= 0.97 else 'BELOW'})")
    if hf_secs:
        print(f"transformers / raw vLLM: {rate(hf_tok_total, hf_secs) / raw_rate:.3f}")
    print(f"factory texts == raw vLLM texts: {'yes' if texts_equal else 'NO'} "
          f"(per-prompt output tokens equal: {'yes' if tokens_equal else 'NO'})")
    ok = all(st == stats == gen for st, stats, gen, _ in store_checks)
    print(f"store sum(output_tokens) == tokens generated by the stage: {'yes' if ok else 'NO'} "
          f"({', '.join(str(st) for st, _, _, _ in store_checks)})")
    if hf_same is not None:
        print(f"transformers texts == raw vLLM texts: {hf_same}/{len(ids)} (informational; CPU kernels differ)")
    tmp.cleanup()


if __name__ == "__main__":
    main()
