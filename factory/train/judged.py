"""The judge on (conversation, x, y) comparisons outside the label stage: `factory eval`'s win rate
(factory/train/evaluate.py) and GRPO's reward (factory/train/grpo.py) both ask it here.

Reads nothing from the store: it takes a judge engine and the comparisons, and returns P(x better) per comparison.
The judge prompt is the label stage's, byte for byte (factory.stages.label._render / _encode: the same layout, the
answer tokens derived from the judge's own tokenizer by model_info.answer_cue). Each comparison is asked in both
orders, x as (A) and x as (B), and P(x better) is the mean of the two orders (judge.first_better, judge.swap_average),
so the judge's preference for a position cancels: P(x over y) + P(y over x) = 1 for any judge.

Modes (as the label stage's): "logprob" reads P(A) from the log-probabilities of the two answer tokens; "rubric"
has the judge write "Score A: n / Score B: m" (greedy by default) and maps it to 0.5 + (n - m) / 18
(judge.parse_rubric); a reply that does not parse counts as no preference (0.5) in that order and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from factory import judge
from factory.constitution import sample_principles
from factory.train.rates import rate, wins


@dataclass(frozen=True)
class Comparison:
    question: str  # the principle's comparison question
    prompt: str | list[dict]  # the conversation the two texts answer (its text, or its turns)
    x: str
    y: str


@dataclass
class Judged:
    p_x: list[float]  # per comparison: P(x better), both orders averaged
    prompts: int  # judge prompts sent (distinct ones: a repeated prompt is asked once)
    failed: int  # orders with no usable answer (a rubric reply that does not parse); counted as 0.5


def p_x_better(engine, comparisons: list[Comparison], mode: str = "logprob", prompt_format: str = "plain",
               special_tokens: tuple[str, ...] | None = None, sampling=None, seed: int = 0) -> Judged:
    """P(x better than y) for each comparison, from `engine` (a factory engine: encode, score_next_token, generate).
    `prompt_format` is the judge's (plain text or its chat template); `sampling` the rubric replies' decoding."""
    from factory.config import SamplingConfig
    from factory.model_info import answer_cue
    from factory.stages.label import _encode, _render

    if mode not in ("logprob", "rubric"):
        raise ValueError(f"judge mode {mode!r}: expected 'logprob' or 'rubric'")
    sp = engine.special_tokens if special_tokens is None else special_tokens
    cue_ids, answer = answer_cue(engine.tokenizer, judge.ANSWER_CUE) if mode == "logprob" else ([], [])
    # Two judge prompts per comparison: x as (A), then x as (B). Identical prompts (a policy that samples the same
    # text twice) are asked once, so they also get the same answer.
    index: dict[tuple[int, ...], int] = {}
    unique: list[list[int]] = []
    where: list[tuple[int, int]] = []
    for c in comparisons:
        pair = []
        for first, second in ((c.x, c.y), (c.y, c.x)):
            ids = _encode(engine, _render(mode, prompt_format, c.question, c.prompt, first, second, sp), cue_ids)
            key = tuple(ids)
            if key not in index:
                index[key] = len(unique)
                unique.append(ids)
            pair.append(index[key])
        where.append((pair[0], pair[1]))
    failed = 0
    if not unique:
        return Judged([], 0, 0)
    if mode == "logprob":
        p_a = [judge.normalise(lp[0], lp[1]) for lp in engine.score_next_token(unique, answer)]
    else:
        sampling = sampling or SamplingConfig(max_tokens=24)
        p_a = []
        for out in engine.generate(unique, sampling, [seed] * len(unique), ["\n\n"]):
            p, reason = judge.parse_rubric(out.text)
            failed += p is None
            p_a.append(0.5 if p is None else p)
    p_x = [judge.swap_average(judge.first_better(p_a[i], "xy"), judge.first_better(p_a[j], "yx")) for i, j in where]
    return Judged(p_x=p_x, prompts=len(unique), failed=failed)


def win_rate(engine, constitution, prompts, policy_texts, reference_texts, seed: int, prompt_format: str = "plain",
             special_tokens: tuple[str, ...] | None = None, key: str = "win_rate") -> dict:
    """`factory eval`'s win rate: both orders per prompt (p_x_better), x = the policy; ties count half. Returns the
    rate with its count and 95% interval, and per-prompt P(policy better) under `<key>_p_policy_better`."""
    comparisons = []
    for i, (p, a, b) in enumerate(zip(prompts, policy_texts, reference_texts)):
        text = p if isinstance(p, str) else judge.conversation_lines(p)  # the principle's key: the conversation
        comparisons.append(Comparison(sample_principles(constitution, 1, seed, f"eval:{i}:{text}")[0].comparison,
                                      p, a, b))
    probs = p_x_better(engine, comparisons, "logprob", prompt_format, special_tokens).p_x
    return {**rate(key, wins(probs), len(probs)), f"{key}_p_policy_better": probs}


def single_answer_head(question: str, options: tuple[str, str], prompt, response: str, sp: tuple[str, ...]) -> str:
    """The judge prompt up to its answer cue: the conversation and the response (delimited, one line each), the
    question and the two options (the template's own text). The cue follows option (B) directly, as in the
    comparison prompt (the shipped judge answers only then; judge.py)."""
    return (f"{judge.HEAD}{judge.conversation_lines(prompt, sp)}\n"
            f"Assistant: {judge.OPEN}{judge.delimit(response, sp)}{judge.CLOSE}\n\n"
            f"{question}\nOptions:\n(A) {options[0]}\n(B) {options[1]}\n")


def single_answer(engine, question: str, yes: str, no: str, prompts, responses, prompt_format: str) -> list[float]:
    """P(yes) per response: the question asked with the options in both orders ((A) yes, then (A) no), each
    renormalised over the two answer tokens, averaged (position bias cancels as in the win rate)."""
    from factory.model_info import answer_cue

    cue_ids, answer = answer_cue(engine.tokenizer, judge.ANSWER_CUE)
    sp = engine.special_tokens
    ids = []
    for p, r in zip(prompts, responses):
        for options in ((yes, no), (no, yes)):
            head = single_answer_head(question, options, p, r, sp)
            # chat: the head is the user's turn and the cue starts the judge's reply (as the label stage does)
            ids.append(engine.encode(head if prompt_format == "plain" else
                                     [{"role": "user", "content": head.rstrip("\n")}]) + cue_ids)
    scores = engine.score_next_token(ids, answer) if ids else []
    p_a = [judge.normalise(lp[0], lp[1]) for lp in scores]
    return [(p_a[2 * i] + 1.0 - p_a[2 * i + 1]) / 2 for i in range(len(p_a) // 2)]
