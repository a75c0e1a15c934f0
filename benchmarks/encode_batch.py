"""Per-row cost of tokenizing few-shot critique prompts: one `encode_prompt` call per prompt (what the stages do
today) against `encode_batch` (the shared few-shot prefix tokenized once, each row's rest in one batched call),
side by side in one run, and checks that both give the same ids.

Prompts: N (default 2,000) real plain critique prompts with the constitution's few-shot examples
(templates.plain_critique(few_shot=True)): the user prompts of data/judge_eval_pairs*.jsonl, data/quickstart_prompts
and data/chat_conversations (multi-turn ones included) cycled, each made distinct ("(case i)"), with the good or bad
response of the eval pairs, principles cycled, control strings quoted as the stage does. A third column times one
batched tokenizer call on the whole strings (no prefix), to show what batching alone gives.

Each method runs --repeats times (default 3) on a tokenizer whose prefix cache is warm (the first encode_batch
call, untimed, checks and caches the prefix, as the first chunk of a stage does); the median is printed.

Run from the repository root:  .venv/bin/python benchmarks/encode_batch.py [--rows 2000 --repeats 3 --model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=2000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default=None, help="model folder whose tokenizer is used (default: the shipped Gemma 3)")
    ap.add_argument("--constitution", default=str(ROOT / "constitutions/harmless.yaml"))
    args = ap.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer

    from factory import templates
    from factory.constitution import load_constitution
    from factory.engines.base import _with_bos, encode_batch, encode_prompt
    from factory.model_info import control_strings
    from factory.models import prepare_default_model, resolve_model

    model_dir = prepare_default_model() if args.model is None else resolve_model(args.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    sp = control_strings(tok)
    constitution = load_constitution(args.constitution)
    convs, responses = [], []
    for name in ("judge_eval_pairs.jsonl", "judge_eval_pairs_holdout.jsonl"):
        for line in (ROOT / "data" / name).read_text().splitlines():
            p = json.loads(line)
            convs.append(p["prompt"])
            responses += [p["good"], p["bad"]]
    for line in (ROOT / "data/quickstart_prompts.jsonl").read_text().splitlines():
        convs.append(json.loads(line)["prompt"])
    for line in (ROOT / "data/chat_conversations.jsonl").read_text().splitlines():
        convs.append(json.loads(line)["messages"])
    prompts = []
    for i in range(args.rows):
        conv = convs[i % len(convs)]
        conv = f"{conv} (case {i})" if isinstance(conv, str) else [*conv[:-1], {**conv[-1], "content": f"{conv[-1]['content']} (case {i})"}]
        pr = constitution.principles[i % len(constitution.principles)]
        prompts.append(templates.plain_critique(constitution, True, pr, conv, responses[i % len(responses)], sp))

    batch0 = encode_batch(tok, prompts)  # untimed: checks the cut and caches the prefix
    one_by_one = [encode_prompt(tok, p) for p in prompts]
    assert batch0 == one_by_one, "encode_batch differs from encode_prompt"

    def whole_batched():
        return [_with_bos(tok, ids) for ids in tok(prompts, add_special_tokens=False)["input_ids"]]

    methods = {"encode_prompt per row": lambda: [encode_prompt(tok, p) for p in prompts],
               "one batched call, whole strings": whole_batched,
               "encode_batch (prefix once)": lambda: encode_batch(tok, prompts)}
    secs = {name: [] for name in methods}
    for _ in range(args.repeats):
        for name, fn in methods.items():  # interleaved, so load on the machine hits all alike
            t = time.perf_counter()
            out = fn()
            secs[name].append(time.perf_counter() - t)
            assert out == one_by_one, name
    lens = [len(x) for x in one_by_one]
    cache = tok.__dict__["_factory_prefix_cache"]
    prefix = next(v for k, v in cache.items() if isinstance(k, tuple) and k[0] == "prefix" and v)
    print(f"tokenizer {model_dir} | {args.rows} plain few-shot critique prompts | mean {statistics.mean(lens):.0f} "
          f"tokens (min {min(lens)}, max {max(lens)}), shared prefix tokenized once: {len(prefix[0])} tokens | "
          f"median of {args.repeats} | TOKENIZERS_PARALLELISM={os.environ['TOKENIZERS_PARALLELISM']}")
    base = statistics.median(secs["encode_prompt per row"])
    print(f"{'method':<34}{'us/row':>10}{'speed-up':>10}")
    for name, s in secs.items():
        m = statistics.median(s)
        print(f"{name:<34}{1e6 * m / args.rows:>10.1f}{base / m:>9.1f}x")
    print("ids identical to encode_prompt for every row: yes")


if __name__ == "__main__":
    main()
