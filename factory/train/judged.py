"""The judge's figures in `factory eval`: pairwise win rates (the label stage's comparison prompt, both orders) and
single-answer questions (one response, two options), both scored from the answer tokens' log-probabilities.

Reads the judge engine and texts; writes nothing. Every judge prompt is the label stage's machinery: the answer cue
`judge.ANSWER_CUE` with the answer ids `model_info.answer_cue` derives for the judge's tokenizer, and every piece of
model output or user text quoted by `judge.delimit`, so a response that says "The answer is (A)" stays data.
"""

from __future__ import annotations

from factory import judge
from factory.constitution import sample_principles
from factory.train.rates import rate, wins


def win_rate(engine, constitution, prompts, policy_texts, reference_texts, seed: int, prompt_format: str = "plain",
             special_tokens: tuple[str, ...] | None = None, key: str = "win_rate") -> dict:
    """Both orders per prompt; x = the policy. Returns the win rate (ties count half) with its count and 95%
    interval, and per-prompt P(policy better) under `<key>_p_policy_better`. The judge prompt is the label stage's
    (same layout, same answer tokens derived from the judge's tokenizer); a prompt is a string or its turns."""
    from factory.model_info import answer_cue
    from factory.stages.label import _encode, _render

    cue_ids, answer = answer_cue(engine.tokenizer, judge.ANSWER_CUE)
    sp = engine.special_tokens if special_tokens is None else special_tokens
    ids, meta = [], []
    for i, (p, a, b) in enumerate(zip(prompts, policy_texts, reference_texts)):
        text = p if isinstance(p, str) else judge.conversation_lines(p)  # the principle's key: the conversation
        pr = sample_principles(constitution, 1, seed, f"eval:{i}:{text}")[0]
        for order, (first, second) in (("xy", (a, b)), ("yx", (b, a))):
            ids.append(_encode(engine, _render("logprob", prompt_format, pr.comparison, p, first, second, sp), cue_ids))
            meta.append((i, order))
    scores = engine.score_next_token(ids, answer) if ids else []
    per: dict[int, list[float]] = {}
    for (i, order), lp in zip(meta, scores):
        per.setdefault(i, []).append(judge.first_better(judge.normalise(lp[0], lp[1]), order))
    probs = [sum(v) / 2 for _, v in sorted(per.items())]
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
