"""`factory eval`: a trained policy against its reference on held-out prompts.

Reads held-out prompts and pairs from the store (the eval side of the prompt-id split, so nothing the
policy trained on), generates a completion per prompt with each model, and reports:
- win rate of the policy over the reference, judged by the AI-feedback judge in both orders
  (factory/judge.py: P(policy better) is the mean of the two orders; ties count half);
- with a reward model: mean score of each model's completions and the reward model's accuracy on the
  held-out pairs.
Writes <output_root>/<name>/metrics.json and records the evaluation in the store's `runs` table.

One model in memory at a time (DESIGN.md, "Models: identity and lifecycle"): the policy's engine is released
before the reference's starts, the reference's before the judge's (kept when the judge is the reference), and
the reward model is released after scoring, so the eval fits wherever its largest model fits.
"""

from __future__ import annotations

from factory import judge, templates
from factory.config import EvalConfig
from factory.constitution import load_constitution, sample_principles
from factory.engines.base import free_memory
from factory.store import Store
from factory.train.common import write_metrics
from factory.train.data import load_pairs, prompt_texts, render_prompt, resolve_conflicts, split_by_prompt


def _complete(engine, mcfg, prompts: list[str], cfg: EvalConfig) -> list[str]:
    rendered = [templates.plain_generate(p) if mcfg.prompt_format == "plain" else render_prompt(p, "chat")
                for p in prompts]
    stop = templates.PLAIN_STOPS + cfg.sampling.stop if mcfg.prompt_format == "plain" else cfg.sampling.stop
    outs = engine.generate([engine.encode(r) for r in rendered], cfg.sampling, [cfg.seed] * len(prompts), stop)
    return [templates.clean_output(o.text) for o in outs]


def win_rate(engine, constitution, prompts, policy_texts, reference_texts, seed: int, prompt_format: str = "plain",
             special_tokens: tuple[str, ...] | None = None) -> dict:
    """Both orders per prompt; x = the policy. Returns the win rate and per-prompt P(policy better). The judge
    prompt is the label stage's (same layout, same answer tokens derived from the judge's tokenizer), asked through
    factory.train.judged, as GRPO's judged reward is."""
    from factory.train.judged import Comparison, p_x_better

    comparisons = [Comparison(sample_principles(constitution, 1, seed, f"eval:{i}:{p}")[0].comparison, p, a, b)
                   for i, (p, a, b) in enumerate(zip(prompts, policy_texts, reference_texts))]
    probs = p_x_better(engine, comparisons, "logprob", prompt_format, special_tokens).p_x
    wins = sum(1.0 if p > 0.5 else 0.5 if p == 0.5 else 0.0 for p in probs)
    return {"win_rate": wins / len(probs) if probs else None, "win_rate_n": len(probs),
            "win_rate_ci95": wilson_interval(wins, len(probs)), "p_policy_better": probs}


def wilson_interval(successes: float, n: int, z: float = 1.959964) -> list[float] | None:
    """The 95% Wilson score interval of a rate (successes may count ties as halves): on 4 prompts a win rate of 1
    reads [0.51, 1.0], not a result. None without data."""
    if n == 0:
        return None
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * ((p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def check_eval_models(cfg: EvalConfig) -> None:
    """Before any engine starts: chat templates where chat format is asked for, and a judge whose answers
    can be scored (a ConfigError, exit 2, names the model and the fix)."""
    from factory.model_info import check_chat_template, check_judge_answers, load_model_info

    infos = {role: load_model_info(m, role) for role, m in (("policy", cfg.policy), ("reference", cfg.reference))}
    for role, m in (("policy", cfg.policy), ("reference", cfg.reference)):
        check_chat_template(infos[role], m.prompt_format)
    jcfg = cfg.judge or cfg.reference
    info = infos["reference"] if jcfg == cfg.reference else load_model_info(jcfg, "judge")
    check_chat_template(info, jcfg.prompt_format)
    check_judge_answers(info, judge.ANSWER_CUE, "factory eval's win rate")


def evaluate(cfg: EvalConfig, log=lambda m: None) -> dict:
    check_eval_models(cfg)
    rows, _ = resolve_conflicts(load_pairs(cfg.data), cfg.data.conflicts)  # the pairs training saw, same split
    _, held_out = split_by_prompt(rows, cfg.data.eval_fraction, cfg.seed)
    prompts = [text for _, text in prompt_texts(held_out)][: cfg.max_prompts]
    if not prompts:
        raise ValueError("no held-out prompts: raise data.eval_fraction or add prompts")
    from factory.pipeline import Engines

    # Engines holds one engine at a time: asking for the next model closes the previous one first.
    engines = Engines(cfg.seed, log)
    jcfg = cfg.judge or cfg.reference
    try:
        policy_texts = _complete(engines.getter(cfg.policy)(), cfg.policy, prompts, cfg)
        reference_texts = _complete(engines.getter(cfg.reference)(), cfg.reference, prompts, cfg)
        metrics: dict = {"prompts": len(prompts)}
        metrics.update(win_rate(engines.getter(jcfg)(), load_constitution(cfg.constitution), prompts, policy_texts,
                                reference_texts, cfg.seed, jcfg.prompt_format))
    finally:
        engines.close()
    if cfg.reward_model:
        from factory.train.reward import load_scorer

        score = load_scorer(cfg.reward_model, cfg.policy.prompt_format)
        try:
            pol, ref = score(prompts, policy_texts), score(prompts, reference_texts)
            chosen = score([r["prompt"] for r in held_out], [r["chosen"] for r in held_out])
            rejected = score([r["prompt"] for r in held_out], [r["rejected"] for r in held_out])
        finally:
            score.model = None
            del score  # the closure holds the reward model: drop it, then return its memory
            free_memory()
            log("released the reward model")
        right = sum(c > r for c, r in zip(chosen, rejected))
        metrics.update(policy_reward_mean=sum(pol) / len(pol), reference_reward_mean=sum(ref) / len(ref),
                       reward_accuracy=right / len(held_out), reward_accuracy_n=len(held_out),
                       reward_accuracy_ci95=wilson_interval(right, len(held_out)), heldout_pairs=len(held_out))
    metrics["examples"] = [{"prompt": p, "policy": a, "reference": b}
                           for p, a, b in list(zip(prompts, policy_texts, reference_texts))[:3]]
    from pathlib import Path

    out = Path(cfg.output_root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    write_metrics(out, metrics)
    with Store.open(cfg.data.store) as store:
        run_id = store.start_run(cfg.name, "eval", cfg.model_dump(mode="json"), None)
        store.finish_run(run_id, "completed", "", {k: v for k, v in metrics.items() if k != "examples"})
    metrics["run_id"] = run_id
    return metrics
