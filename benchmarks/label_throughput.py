"""Throughput of factory's label path (logprob judge) with vLLM prefix caching on and off, on short and on
multi-turn conversations.

Three workloads, each rendered through the label stage's own code path (factory.stages.label._render, mode
"logprob", prompt_format "plain", then _encode), every comparison in both orders, in the stage's order (per
comparison and principle, order xy then yx):
  * short, 1 principle: N comparisons (default 32) from data/judge_eval_pairs.jsonl (cycled), comparison i asking
    principle i mod P (the benchmark as it was before the multi-turn workloads);
  * multi-turn, 1 principle: M comparisons (default 16) whose conversation is a few hundred tokens: `--mt-turns`
    earlier exchanges (other eval pairs' requests with their good answers) before the pair's own request;
  * multi-turn, 2 principles: the same conversations, two principles each (principles_per_comparison: 2).
Each workload's prompts go to factory's VLLMEngine.score_next_token in one call, as the stage does for up to
write_batch_size rows. One label = both orders of one principle, so labels/s = judgments/s / 2.

Two engines are created one after the other in this process, prefix caching on first, then (after the first is
deleted, garbage-collected and its engine core shut down) off; same model, dtype, max_model_len, KV-cache size
and seed. Each workload is run once untimed on each engine; the "on" engine's prefix cache is then emptied
(LLM.reset_prefix_cache) before every timed pass, so a pass reuses only what it computes itself (the judge preamble,
each conversation shared by both orders and every principle, and in one order the responses shared by the
principles) and never the whole prompt from the warm-up. The "off" engine has nothing to reset.

It also prints, per workload, the share of prompt tokens that lie in whole KV blocks shared with an earlier prompt
of the batch (the prefill work prefix caching can skip), for the current template and for the layout with the question after the
responses (shared-first, rejected: see factory/judge.py), and the largest |P(A) on - P(A) off|. It also times the real label stage
(factory.stages.label.label on a fresh DuckDB store holding one response and one revision per short comparison;
principles drawn by the stage itself) on the caching-on engine, after its prefix cache is emptied; --skip-stage
skips that.

Run from the repository root:
    PYTHONPATH=. .venv/bin/python benchmarks/label_throughput.py [--comparisons 32 --mt-comparisons 16 --mt-turns 4
        --repeats 1 --kv-cache-gb 1 --skip-stage]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def block_size_of(engine) -> int | None:
    llm_engine = getattr(engine.llm, "llm_engine", None)
    for path in ("vllm_config.cache_config.block_size", "cache_config.block_size"):
        obj = llm_engine
        for part in path.split("."):
            obj = getattr(obj, part, None)
        if isinstance(obj, int):
            return obj
    return None


def multi_turn(pairs: list[dict], i: int, turns: int) -> list[dict]:
    """A realistic conversation of a few hundred tokens ending in pair i's prompt: `turns` earlier exchanges, each
    another eval pair's request and its good answer, then pair i's request. Distinct per i."""
    n = len(pairs)
    conv = []
    for t in range(turns):
        q = pairs[(i + 7 * (t + 1)) % n]
        conv += [{"role": "user", "content": f"{q['prompt']} (case {i}, turn {t + 1})"},
                 {"role": "assistant", "content": f"{q['good']} Is there anything else you would like to know "
                                                  f"about this, or shall we move on to something else?"}]
    return conv + [{"role": "user", "content": pairs[i % n]["prompt"]}]


def shared_first_layout(comparison: str, prompt, a: str, b: str, sp) -> str:
    """The judge template rearranged so that what a comparison's prompts share comes first: the conversation, then
    both responses, then the question and the cue (evals/judge_injection.py --ablations shared-first: the shipped
    judge drops to chance with it, so factory keeps the question before the options)."""
    from factory import judge

    return (f"{judge.HEAD}{judge.conversation_lines(prompt, sp)}\n\nOptions:\n"
            f"(A) {judge.OPEN}{judge.delimit(a, sp)}{judge.CLOSE}\n(B) {judge.OPEN}{judge.delimit(b, sp)}{judge.CLOSE}\n"
            f"\n{comparison}\n{judge.ANSWER_CUE}")


def reusable_share(ids: list[list[int]], blocks: int | None) -> tuple[float, list[int]]:
    """Per prompt: the longest token prefix shared with an earlier prompt, rounded down to whole KV blocks."""
    out = []
    for i, x in enumerate(ids):
        best = max((common_prefix(x, y) for y in ids[:i]), default=0)
        out.append(best // blocks * blocks if blocks else best)
    return sum(out) / sum(len(x) for x in ids), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="local model folder (default: the shipped Gemma 3 270M)")
    ap.add_argument("--comparisons", type=int, default=32,
                    help="comparisons N of the short workload, each judged in both orders (default 32)")
    ap.add_argument("--mt-comparisons", type=int, default=16,
                    help="comparisons of each multi-turn workload (default 16; 0 skips them)")
    ap.add_argument("--mt-turns", type=int, default=4, help="earlier exchanges per multi-turn conversation (default 4)")
    ap.add_argument("--repeats", type=int, default=1, help="timed passes per engine and workload (default 1)")
    ap.add_argument("--pairs", default=str(ROOT / "data/judge_eval_pairs.jsonl"))
    ap.add_argument("--constitution", default=str(ROOT / "constitutions/harmless.yaml"))
    ap.add_argument("--kv-cache-gb", type=float, default=1.0,
                    help="vLLM KV cache per engine on CPU (default 1.0 GiB, which holds every workload's prompts whole "
                         "at about 36 KiB per token; factory's default is 2.0)")
    ap.add_argument("--skip-stage", action="store_true",
                    help="do not time the real label stage (fresh store, caching on)")
    args = ap.parse_args()
    if args.comparisons < 1 or args.repeats < 1 or args.mt_comparisons < 0:
        ap.error("--comparisons and --repeats must be >= 1, --mt-comparisons >= 0")

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from factory import judge, templates
    from factory.config import VLLMModelConfig
    from factory.constitution import load_constitution
    from factory.model_info import answer_cue
    from factory.engines.vllm_engine import VLLMEngine
    from factory.models import prepare_default_model, resolve_model
    from factory.stages.label import _encode, _render

    constitution = load_constitution(args.constitution)
    pairs = [p for _, p in jsonl.records(args.pairs)]
    principles = constitution.principles
    comps = [(pairs[i % len(pairs)], principles[i % len(principles)]) for i in range(args.comparisons)]
    # Workloads: (conversation, [principles], good, bad) per comparison. "short": the eval pairs' one-line prompts,
    # one principle each (as before). "multi-turn": conversations of a few hundred tokens, one principle, then two
    # principles per comparison (the label stage's ensemble, principles_per_comparison: 2).
    workloads = {"short, 1 principle": [(p["prompt"], [pr], p["good"], p["bad"]) for p, pr in comps]}
    if args.mt_comparisons:
        mt = [(multi_turn(pairs, i, args.mt_turns), pairs[i % len(pairs)]) for i in range(args.mt_comparisons)]
        workloads["multi-turn, 1 principle"] = [(c, [principles[i % len(principles)]], p["good"], p["bad"])
                                                for i, (c, p) in enumerate(mt)]
        workloads["multi-turn, 2 principles"] = [
            (c, [principles[i % len(principles)], principles[(i + 1) % len(principles)]], p["good"], p["bad"])
            for i, (c, p) in enumerate(mt)]
    if args.model is None:
        model_dir, cfg_path = prepare_default_model(), "default"
    else:
        model_dir, cfg_path = resolve_model(args.model), args.model

    def build(engine, work, layout="current") -> list[list[int]]:
        """Every judge prompt of a workload in the label stage's order: per comparison and principle, both orders
        (x = the good response; order xy shows it as (A))."""
        cue_ids = answer_cue(engine.tokenizer, judge.ANSWER_CUE)[0]
        ids = []
        for conv, prs, good, bad in work:
            for pr in prs:
                for a, b in ((good, bad), (bad, good)):
                    if layout == "current":
                        rendered = _render("logprob", "plain", pr.comparison, conv, a, b,
                                           templates.COMMON_SPECIAL_TOKENS)
                        ids.append(_encode(engine, rendered, cue_ids))
                    else:
                        head = shared_first_layout(pr.comparison, conv, a, b, templates.COMMON_SPECIAL_TOKENS)
                        ids.append(engine.encode(head[:-len(judge.ANSWER_CUE)]) + cue_ids)
        return ids

    results: dict[str, dict[str, tuple[list[float], list[float]]]] = {w: {} for w in workloads}
    ids: dict[str, list[list[int]]] = {}
    old_ids: dict[str, list[list[int]]] = {}
    blocks = None
    stage_report = None
    for caching in (True, False):
        name = "on" if caching else "off"
        mcfg = VLLMModelConfig(path=cfg_path, max_model_len=2048, enable_prefix_caching=caching,
                               kv_cache_gb=args.kv_cache_gb)
        print(f"starting vLLM (prefix caching {name}) on {model_dir} ...", flush=True)
        t0 = time.perf_counter()
        engine = VLLMEngine(mcfg, str(model_dir), seed=0)
        print(f"vLLM started in {time.perf_counter() - t0:.1f} s", flush=True)
        if blocks is None:
            blocks = block_size_of(engine)
        answer_ids = answer_cue(engine.tokenizer, judge.ANSWER_CUE)[1]
        for wname, work in workloads.items():
            these = build(engine, work)
            assert wname not in ids or these == ids[wname], "the two engines tokenize differently"
            ids[wname] = these
            if wname not in old_ids:
                old_ids[wname] = build(engine, work, layout="shared-first")
            too_long = sum(len(x) + 1 > engine.max_model_len for x in these)
            if too_long:
                raise SystemExit(f"{too_long} prompts do not fit max_model_len {engine.max_model_len}")
            engine.score_next_token(these, answer_ids)  # warm-up, untimed
            secs, out = [], None
            for rep in range(args.repeats):
                if caching and not engine.llm.reset_prefix_cache():
                    raise SystemExit("vLLM could not reset its prefix cache")
                t = time.perf_counter()
                out = engine.score_next_token(these, answer_ids)
                secs.append(time.perf_counter() - t)
                print(f"  {wname}: pass {rep + 1}: prefix caching {name:<3} {secs[-1]:8.2f} s  {len(these)} judgments",
                      flush=True)
            results[wname][name] = (secs, [judge.normalise(a, b) for a, b in out])

        if caching and not args.skip_stage:
            bare = results["short, 1 principle"]["on"][0]
            stage_report = time_stage(engine, comps, mcfg, constitution, args, bare)

        # Free the first engine before the second starts: on CPU vLLM reserves its whole KV cache up front.
        core = getattr(getattr(engine.llm, "llm_engine", None), "engine_core", None)
        del engine
        gc.collect()
        if core is not None:
            core.shutdown()
            del core
            gc.collect()

    print()
    print(f"model {model_dir} | one score_next_token call per pass | repeats {args.repeats} | KV cache "
          f"{args.kv_cache_gb:g} GiB, {blocks}-token blocks | judge template: label stage, logprob, plain")
    print(f"{'workload':<27}{'judgments':>10}{'mean tok':>9}{'s on':>8}{'s off':>8}{'labels/s on':>13}"
          f"{'labels/s off':>14}{'on/off':>8}{'reusable':>10}{'shared-first':>14}{'max dP':>10}")
    for wname, work in workloads.items():
        n_j = len(ids[wname])
        lens = [len(x) for x in ids[wname]]
        on, off = (statistics.median(results[wname][k][0]) for k in ("on", "off"))
        share, _ = reusable_share(ids[wname], blocks)
        old_share, _ = reusable_share(old_ids[wname], blocks)
        diff = max(abs(a - b) for a, b in zip(results[wname]["on"][1], results[wname]["off"][1]))
        print(f"{wname:<27}{n_j:>10}{statistics.mean(lens):>9.0f}{on:>8.2f}{off:>8.2f}{n_j / 2 / on:>13.1f}"
              f"{n_j / 2 / off:>14.1f}{off / on:>7.2f}x{100 * share:>9.0f}%{100 * old_share:>13.0f}%{diff:>10.1e}")
    print("labels/s: one label = both orders of one principle; on/off: labels/s with prefix caching on / off;")
    print(f"reusable: share of all prompt tokens in whole {blocks}-token KV blocks shared with an earlier prompt of the "
          "batch (what caching can skip); shared-first: the same if the question came after the responses "
          "(rejected: the judge's accuracy drops to chance)")
    first = ids["short, 1 principle"]
    shared = min(common_prefix(first[0], x) for x in first)
    print(f"prefix shared by every short prompt (BOS + judge preamble): {shared} tokens")
    if stage_report:
        print(stage_report)


def time_stage(engine, comps, mcfg, constitution, args, bare_secs) -> str:
    """The real label stage on a fresh store: one response (the bad text) and one revision (the good) per comparison."""
    from factory.config import PipelineConfig
    from factory.stages.common import Context
    from factory.stages.label import label
    from factory.store import Store, now, row_id

    cfg = PipelineConfig(name="bench-label", seed=0, models={"policy": mcfg},
                         label={"enabled": True, "principles_per_comparison": 1})
    tmp = tempfile.TemporaryDirectory(prefix="factory-bench-")
    store = Store.open(Path(tmp.name) / "label.duckdb")
    try:
        run_id = store.start_run(cfg.name, "benchmark", cfg.model_dump(mode="json"), None)
        gen = {"run_id": run_id, "model_id": "bench", "status": "ok", "created_at": now()}
        prompts, responses, revisions = [], [], []
        for i, (p, _) in enumerate(comps):
            pid = row_id("prompt", p["id"], i)
            rid, vid = row_id("response", pid), row_id("revision", pid)
            prompts.append({"prompt_id": pid, "text": f"{p['prompt']} (case {i + 1})", "run_id": run_id})
            responses.append({**gen, "response_id": rid, "prompt_id": pid, "sample_index": 0, "stage": "generate",
                              "text": p["bad"]})
            revisions.append({**gen, "revision_id": vid, "prompt_id": pid, "response_id": rid, "parent_id": rid,
                              "critique_id": row_id("critique", pid), "round": 1, "stage": "revise",
                              "text": p["good"]})
        store.insert("prompts", prompts)
        store.insert("responses", responses)
        store.insert("revisions", revisions)
        for table, rows, col in (("prompts", prompts, "prompt_id"), ("responses", responses, "response_id"),
                                 ("revisions", revisions, "revision_id")):
            store.add_members(run_id, table, [r[col] for r in rows])  # the run's rows: the label stage's input
        ctx = Context(store=store, run_id=run_id, seed=cfg.seed, write_batch_size=cfg.write_batch_size)
        if not engine.llm.reset_prefix_cache():
            raise SystemExit("vLLM could not reset its prefix cache")
        t = time.perf_counter()
        counts = label(ctx, cfg, constitution, lambda: engine)
        secs = time.perf_counter() - t
        comparison_ids = [r[0] for r in store.run_sql(
            "SELECT DISTINCT id FROM run_rows WHERE run_id = ? AND tbl = 'comparisons'", [run_id])]
        n_j = store.run_sql("SELECT count(*) FROM judgments WHERE status = 'ok'")[0][0]
        inside = sum(s.seconds for s in ctx.stats.values())
        store.finish_run(run_id, "completed", "", {})
    finally:
        store.close()
        tmp.cleanup()
    bare = statistics.median(bare_secs)
    return (f"real label stage (fresh store, caching on, principles from sample_principles): {len(comparison_ids)} "
            f"comparisons, {n_j} judgments in {secs:.2f} s = {n_j / secs:.1f} judgments/s, "
            f"{len(comparison_ids) / secs:.1f} labels/s ({inside:.2f} s inside score_next_token, "
            f"{secs - inside:.2f} s around it); pairs {counts}; bare score_next_token on the benchmark prompts "
            f"took {bare:.2f} s")


if __name__ == "__main__":
    main()
