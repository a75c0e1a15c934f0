"""`factory eval`: trained policies side by side against their reference, the Constitutional AI table.

Reads the store's held-out prompts and pairs (the eval side of the prompt-id split of the conflict-resolved pairs
every trainer uses, so nothing a policy trained on), the shipped red-team and ordinary sets (factory/train/eval_sets.py),
the policies, the reference, the judge and optionally a reward model. Per policy (`policies`, or the one `policy`):
- harmlessness and helpfulness win rates over the reference's completions, judged in both orders with
  `constitution` and `helpful_constitution` (factory/train/judged.py);
- held-out pair accuracy of its implicit reward and the KL to the reference, from transformers forward passes
  (factory/train/logratio.py);
- the harmless rate on the red-team set and the over-refusal rate on the ordinary set;
- with a reward model, its mean score.
Every rate comes with its count and 95% Wilson interval. Writes <output_root>/<name>/metrics.json
(`policies: {name: figures}` plus the shared figures) and records the evaluation in the store's `runs` table.

Prompts are rendered exactly as training rendered them (`data.render_prompt`: the stored conversation with its
system prompt, through the chat template in chat format, "Human: ...\\n\\nAssistant:" in plain format).
One model in memory at a time (DESIGN.md, "Models: identity and lifecycle"): each policy's engine, then its
weights for the log-probabilities, then the reference's weights and its engine, then the judge's (kept when the
judge is the reference), then the reward model; so the eval fits wherever its largest model fits.
"""

from __future__ import annotations

import json
from pathlib import Path

from factory import judge, templates
from factory.config import EvalConfig, SamplingConfig
from factory.constitution import load_constitution
from factory.engines.base import free_memory
from factory.store import Store
from factory.train import eval_sets, logratio
from factory.train.common import fold_unsupported_system, write_metrics
from factory.train.data import load_pairs, render_completion, render_prompt, resolve_conflicts, split_by_prompt
from factory.train.judged import win_rate  # noqa: F401  (factory.train.evaluate.win_rate, as before)
from factory.train.rates import wilson_interval


def heldout_prompts(held_out: list[dict]) -> list[dict]:
    """One row per held-out prompt (prompt_id, prompt text, stored messages), in prompt-id order."""
    seen: dict[str, dict] = {}
    for r in held_out:
        seen.setdefault(r["prompt_id"], {"prompt_id": r["prompt_id"], "prompt": r["prompt"],
                                         "messages": r.get("messages")})
    return [seen[k] for k in sorted(seen)]


def rendered(rows: list[dict], fmt: str) -> list:
    """Each stored prompt as training rendered it (sft.py, dpo.py): its turns (system prompt included) for chat,
    Human/Assistant text ending with the assistant's cue for plain."""
    return [render_prompt(r["prompt"], fmt, r.get("messages")) for r in rows]


def policy_inputs(engine, mcfg, rows: list[dict]) -> list[list[int]]:
    """The ids eval feeds a model for stored prompts: the engine's encoding (the chat template with the generation
    prompt, a system prompt folded where the template has no system role, exactly one BOS) of `rendered`."""
    return [engine.encode(p) for p in rendered(rows, mcfg.prompt_format)]


def training_examples(rows: list[dict], fmt: str, tok) -> list[dict]:
    """Rows as the DPO trainer's dataset rows (`data.preference_dataset`): in chat format a system prompt the
    tokenizer's template cannot show joins the first user turn first, as `common.load_data` does; completions
    only where the row has them."""
    rows = [dict(r) for r in rows]
    if fmt == "chat":
        fold_unsupported_system(rows, tok)
    return [{"prompt": render_prompt(r["prompt"], fmt, r.get("messages")),
             **{k: render_completion(r[k], fmt) for k in ("chosen", "rejected") if k in r}} for r in rows]


def _complete(engine, mcfg, rows: list[dict], sampling: SamplingConfig, seed: int) -> list[str]:
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    outs = engine.generate(policy_inputs(engine, mcfg, rows), sampling, [seed] * len(rows), stop)
    return [templates.clean_output(o.text) for o in outs]


def check_eval_models(cfg: EvalConfig) -> None:
    """Before any engine starts: chat templates where chat format is asked for, local folders for the models whose
    log-probabilities are read, and a judge whose answers can be scored (a ConfigError, exit 2, names the model and
    the fix)."""
    from factory.model_info import check_chat_template, check_judge_answers, load_model_info

    infos: dict[str, object] = {}  # one tokenizer load per distinct section (the reference is often a row too)

    def info(m, role):
        key = m.model_dump_json()
        if key not in infos:
            infos[key] = load_model_info(m, role)
        return infos[key]

    for role, m in [(f"policies.{n}", m) for n, m in cfg.named_policies().items()] + [("reference", cfg.reference)]:
        logratio.local_folder(m, role)
        check_chat_template(info(m, role), m.prompt_format)
    jcfg = cfg.judge or cfg.reference
    check_chat_template(info(jcfg, "judge"), jcfg.prompt_format)
    check_judge_answers(info(jcfg, "judge"), judge.ANSWER_CUE, "factory eval's win rates")


def _sets(cfg: EvalConfig) -> dict[str, list[dict]]:
    return {f: eval_sets.load_set(getattr(cfg, f), cfg.max_set_prompts, f)
            for f in ("redteam_set", "ordinary_set") if getattr(cfg, f)}


def _answers(engine, mcfg, prompts: list[dict], sets: dict, cfg: EvalConfig) -> dict:
    """The policy's greedy (cfg.sampling) completions of the held-out prompts and of each shipped set."""
    out = {"heldout": _complete(engine, mcfg, prompts, cfg.sampling, cfg.seed)}
    for name, rows in sets.items():
        out[name] = _complete(engine, mcfg, [{"prompt": r["prompt"]} for r in rows], cfg.sampling, cfg.seed)
    return out


def _vocab_key(tok) -> int:
    return hash(tuple(sorted(tok.get_vocab().items())))


def _policy_logprobs(name: str, mcfg, held_out: list[dict], prompts: list[dict], cfg: EvalConfig, log) -> dict:
    """The policy's weights once: token ids of the held-out pairs (as DPOTrainer built them) and of completions it
    samples for the held-out prompts, with its log-probabilities of each. The reference reads the same ids."""
    model, tok = logratio.load_causal_lm(mcfg, f"policies.{name}")
    fmt = mcfg.prompt_format
    ids = [logratio.pair_ids(tok, ex) for ex in training_examples(held_out, fmt, tok)]
    starts = [logratio.prompt_ids(tok, ex["prompt"]) for ex in training_examples(prompts, fmt, tok)]
    samples = logratio.sample_completions(model, tok, starts, cfg.sampling.max_tokens, cfg.seed)
    seqs = {"chosen": [(p, c) for p, c, _ in ids], "rejected": [(p, r) for p, _, r in ids],
            "samples": list(zip(starts, samples))}
    lp = {k: logratio.sequence_logprobs(model, v, tok.pad_token_id, cfg.logprob_batch_size) for k, v in seqs.items()}
    vocab, pad = _vocab_key(tok), tok.pad_token_id
    logratio.release(model)
    log(f"released the weights of policy {name!r}")
    return {"seqs": seqs, "policy": lp, "vocab": vocab, "pad": pad}


def _reference_logprobs(cfg: EvalConfig, per_policy: dict[str, dict], log) -> None:
    """The reference's log-probabilities of every policy's sequences (same ids, same batches), in place."""
    model, tok = logratio.load_causal_lm(cfg.reference, "reference")
    vocab = _vocab_key(tok)
    for name, d in per_policy.items():
        if d["vocab"] != vocab:
            raise ValueError(f"policies.{name} and the reference have different tokenizers; pair accuracy and KL "
                             "compare log-probabilities of the same tokens: evaluate a policy against the model it "
                             "was trained from")
        d["reference"] = {k: logratio.sequence_logprobs(model, v, d["pad"], cfg.logprob_batch_size)
                          for k, v in d["seqs"].items()}
    logratio.release(model)
    log("released the reference's weights")


def evaluate(cfg: EvalConfig, log=lambda m: None) -> dict:
    """The whole evaluation (module docstring): returns the metrics written to metrics.json, with the run id.
    `heldout_pairs` are the held-out pairs of the evaluated prompts (at most `max_prompts` of them)."""
    check_eval_models(cfg)
    rows, _ = resolve_conflicts(load_pairs(cfg.data), cfg.data.conflicts)  # the pairs training saw, same split
    train, held_out = split_by_prompt(rows, cfg.data.eval_fraction, cfg.seed)
    prompts = heldout_prompts(held_out)[: cfg.max_prompts]
    if not prompts:
        raise ValueError("no held-out prompts: raise data.eval_fraction or add prompts")
    trained_on = {r["prompt_id"] for r in train}
    assert not trained_on & {p["prompt_id"] for p in prompts}, "a held-out prompt is on the training side"
    pairs = [r for r in held_out if r["prompt_id"] in {p["prompt_id"] for p in prompts}]
    sets = _sets(cfg)
    eval_sets.check_no_leak(sets, [r["prompt"] for r in train])
    named = cfg.named_policies()
    from factory.pipeline import Engines

    # Engines holds one engine at a time; close() before loading weights outside it (the log-probabilities).
    engines = Engines(cfg.seed, log)
    jcfg = cfg.judge or cfg.reference
    answers, lps, figures = {}, {}, {name: {} for name in named}
    try:
        for name, mcfg in named.items():
            answers[name] = _answers(engines.getter(mcfg)(), mcfg, prompts, sets, cfg)
            engines.close()
            log(f"released the engine of policy {name!r}")
            lps[name] = _policy_logprobs(name, mcfg, pairs, prompts, cfg, log)
        _reference_logprobs(cfg, lps, log)
        reference_texts = _complete(engines.getter(cfg.reference)(), cfg.reference, prompts, cfg.sampling, cfg.seed)
        jengine = engines.getter(jcfg)()
        harmless, helpful = load_constitution(cfg.constitution), load_constitution(cfg.helpful_constitution)
        turns = [render_prompt(p["prompt"], "chat", p.get("messages")) for p in prompts]  # the judge sees the turns
        for name in named:
            f, texts = figures[name], answers[name]["heldout"]
            f.update(win_rate(jengine, harmless, turns, texts, reference_texts, cfg.seed, jcfg.prompt_format,
                              key="harmless_win_rate"))
            f.update(win_rate(jengine, helpful, turns, texts, reference_texts, cfg.seed, jcfg.prompt_format,
                              key="helpful_win_rate"))
            if "redteam_set" in sets:
                f.update(eval_sets.harmless_rate(jengine, [r["prompt"] for r in sets["redteam_set"]],
                                                 answers[name]["redteam_set"], jcfg.prompt_format))
            if "ordinary_set" in sets:
                f.update(eval_sets.over_refusal_rate(jengine, [r["prompt"] for r in sets["ordinary_set"]],
                                                     answers[name]["ordinary_set"], jcfg.prompt_format))
    finally:
        engines.close()
    for name in named:
        pol, ref = lps[name]["policy"], lps[name]["reference"]
        figures[name].update(logratio.pair_accuracy(pol["chosen"], pol["rejected"], ref["chosen"], ref["rejected"]))
        figures[name].update(logratio.kl_estimate(pol["samples"], ref["samples"]))
    metrics: dict = {"prompts": len(prompts), "prompt_ids": [p["prompt_id"] for p in prompts],
                     "heldout_pairs": len(pairs), "policies": figures,
                     "sets": {k: {"path": getattr(cfg, k), "prompts": len(v)} for k, v in sets.items()}}
    if cfg.reward_model:
        metrics.update(_reward_figures(cfg, prompts, pairs, answers, reference_texts, figures, log))
    for name in named:
        figures[name]["examples"] = [{"prompt": p["prompt"], "policy": a, "reference": b} for p, a, b in
                                     list(zip(prompts, answers[name]["heldout"], reference_texts))[:3]]
    out = Path(cfg.output_root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, metrics)
    with Store.open(cfg.data.store) as store:
        run_id = store.start_run(cfg.name, "eval", cfg.model_dump(mode="json"), None)
        store.finish_run(run_id, "completed", "", json.loads(json.dumps(_summary(metrics), default=float)))
    metrics["run_id"] = run_id
    return metrics


def _summary(metrics: dict) -> dict:
    """The figures recorded with the run: no per-prompt lists or examples."""
    keep = {k: v for k, v in metrics.items() if k not in ("prompt_ids", "policies")}
    keep["policies"] = {n: {k: v for k, v in f.items() if not isinstance(v, list) or k.endswith("_ci95")}
                        for n, f in metrics["policies"].items()}
    return keep


def _reward_figures(cfg: EvalConfig, prompts, pairs, answers, reference_texts, figures, log) -> dict:
    """Mean reward-model score of each policy's and the reference's held-out completions, and the reward model's
    accuracy on the held-out pairs."""
    from factory.train.reward import load_scorer

    texts = [p["prompt"] for p in prompts]
    score = load_scorer(cfg.reward_model, cfg.reference.prompt_format)
    try:
        for name in figures:
            pol = score(texts, answers[name]["heldout"])
            figures[name]["reward_mean"] = sum(pol) / len(pol)
        ref = score(texts, reference_texts)
        chosen = score([r["prompt"] for r in pairs], [r["chosen"] for r in pairs])
        rejected = score([r["prompt"] for r in pairs], [r["rejected"] for r in pairs])
    finally:
        score.model = None
        del score  # the closure holds the reward model: drop it, then return its memory
        free_memory()
        log("released the reward model")
    right = sum(c > r for c, r in zip(chosen, rejected))
    return {"reference_reward_mean": sum(ref) / len(ref), "reward_accuracy": right / len(pairs) if pairs else None,
            "reward_accuracy_n": len(pairs), "reward_accuracy_ci95": wilson_interval(right, len(pairs))}
