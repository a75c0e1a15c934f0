"""engines.segments.encode_segments: the label stage's judge prompts tokenized piece by piece (each distinct piece of
a batch once), with the ids exactly encode_prompt's of the whole prompt, on the real tokenizers of every family
(tests/families.py), plain and chat, every judge mode, with hostile prompts and responses."""

from __future__ import annotations

from pathlib import Path

import pytest
from families import SPECS, load_tokenizer
from test_encode_batch import HOSTILE

from factory import judge
from factory.constitution import load_constitution
from factory.engines import segments
from factory.engines.base import _junction_safe, encode_prompt
from factory.engines.segments import Segmented, encode_segments
from factory.model_info import control_strings
from factory.stages.label import _render, _render_parts

ROOT = Path(__file__).resolve().parents[2]
FAMILIES = list(SPECS)
MODES = ["logprob", "cot", "rubric"]
# Questions that start the piece with other characters than a letter (a space is a junction some vocabularies span).
ODD_QUESTIONS = ["(Harm) Which response is safer?", "1. Which is kinder?", "\u00bfCu\u00e1l es mejor?",
                 " Which, spaced?"]


@pytest.fixture(scope="module")
def tokenizers(shipped_model_dir):
    return {f: load_tokenizer(SPECS[f], shipped_model_dir) for f in FAMILIES}


@pytest.fixture(scope="module")
def questions():
    return [p.comparison for p in load_constitution(ROOT / "constitutions/harmless.yaml").principles] + ODD_QUESTIONS


def _conversations() -> list:
    """Single prompts and multi-turn conversations (with a system prompt, which the judge leaves out)."""
    convs: list = list(HOSTILE)
    for i, text in enumerate(HOSTILE):
        convs.append([{"role": "system", "content": HOSTILE[-1 - i]}, {"role": "user", "content": text},
                      {"role": "assistant", "content": HOSTILE[(i + 1) % len(HOSTILE)]},
                      {"role": "user", "content": HOSTILE[(i + 2) % len(HOSTILE)]}])
    return convs


def _judge_prompts(mode: str, fmt: str, questions: list[str], sp) -> list[Segmented]:
    """Pages as the label stage makes them: per conversation two candidate pairs (x, y), each judged with two
    principles in both orders, every text hostile."""
    out = []
    for i, conv in enumerate(_conversations()):
        x = HOSTILE[(i + 3) % len(HOSTILE)]
        for j, y in enumerate((HOSTILE[(i + 5) % len(HOSTILE)], HOSTILE[(i + 7) % len(HOSTILE)] + " rev")):
            for q in (questions[(i + j) % len(questions)], questions[(i + j + 1) % len(questions)]):
                for a, b in ((x, y), (y, x)):
                    out.append(_render_parts(mode, fmt, q, conv, a, b, sp)[0])
    return out


def _junctions(prompts: list[Segmented]) -> set[str]:
    """The characters after a newline at the junctions between pieces."""
    return {p.parts[k][0] for p in prompts for k in range(1, len(p.parts))
            if p.parts[k] and p.parts[k - 1].endswith("\n")}


def _no_fallback(monkeypatch) -> list[int]:
    """Records the sizes of whole-string batches: a fallback tokenizes the whole batch, the insurance one prompt."""
    sizes: list[int] = []
    real = segments._whole

    def spy(tokenizer, docs):
        sizes.append(len(docs))
        return real(tokenizer, docs)

    monkeypatch.setattr(segments, "_whole", spy)
    return sizes


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("fmt", ["plain", "chat"])
@pytest.mark.parametrize("mode", MODES)
def test_judge_prompts_encode_exactly_as_whole_strings(tokenizers, questions, family, fmt, mode, monkeypatch):
    tok = tokenizers[family]
    sp = tuple(control_strings(tok)) if mode != "cot" else ()  # raw control strings in the texts too
    prompts = _judge_prompts(mode, fmt, questions, sp)
    expected = [encode_prompt(tok, p.prompt) for p in prompts]
    sizes = _no_fallback(monkeypatch)
    assert encode_segments(tok, prompts) == expected
    assert encode_segments(tok, prompts[5:6]) == expected[5:6]
    assert encode_segments(tok, []) == []
    # The pieces were really used: no batch fell back to whole strings, and every junction whose "\n" + c no token
    # spans was cut (a question's first letter always is).
    assert all(n <= 1 for n in sizes), f"{family}: fell back to whole strings"
    cache = tok.__dict__["_factory_prefix_cache"]
    for c in _junctions(prompts):
        assert cache.get(("segment", c), False) == _junction_safe(tok, "\n", c), (family, c)
    assert all(cache[("segment", q[0])] for q in questions if q[0].isalpha()), family


@pytest.mark.parametrize("mode", MODES)
def test_pieces_render_the_judge_template_byte_for_byte(mode):
    build = {"logprob": judge.logprob_prompt, "cot": judge.cot_prompt, "rubric": judge.rubric_prompt}[mode]
    for conv in _conversations():
        for a, b in ((HOSTILE[0], HOSTILE[3]), (HOSTILE[6], HOSTILE[1])):
            text = build("Which is safer?", conv, a, b, ("<end_of_turn>",))
            plain, cue = _render_parts(mode, "plain", "Which is safer?", conv, a, b, ("<end_of_turn>",))
            chat, chat_cue = _render_parts(mode, "chat", "Which is safer?", conv, a, b, ("<end_of_turn>",))
            assert "".join(plain.parts) + cue == text and cue == chat_cue
            assert chat.prompt == [{"role": "user", "content": "".join(plain.parts).rstrip("\n")}]
            assert _render(mode, "chat", "Which is safer?", conv, a, b, ("<end_of_turn>",)) == (chat.prompt, cue)


def _tokenizer_with(shipped_model_dir, token: str, normalized: bool):
    from tokenizers import AddedToken

    tok = load_tokenizer(SPECS["gemma3"], shipped_model_dir)
    tok.add_tokens([AddedToken(token, normalized=normalized)])
    return tok


@pytest.mark.parametrize("fmt", ["plain", "chat"])
@pytest.mark.parametrize("normalized", [True, False], ids=["add_tokens-default", "matched-raw"])
def test_a_token_across_a_cut_is_not_cut_there(shipped_model_dir, questions, fmt, normalized, monkeypatch):
    """An added token spanning "\n(" (before the option lines): that junction is not cut, the others are, and the
    ids stay exact."""
    tok = _tokenizer_with(shipped_model_dir, "\n(", normalized)
    prompts = _judge_prompts("logprob", fmt, questions, ())
    sizes = _no_fallback(monkeypatch)
    assert encode_segments(tok, prompts) == [encode_prompt(tok, p.prompt) for p in prompts]
    cache = tok.__dict__["_factory_prefix_cache"]
    assert cache[("segment", "(")] is False and cache[("segment", questions[0][0])] is True
    assert all(n <= 1 for n in sizes)


@pytest.mark.parametrize("token", ["\n(", '"\n('], ids=["merges-with-the-anchor", "spans-the-cut-only"])
def test_a_wrongly_trusted_junction_is_caught_and_blamed(shipped_model_dir, questions, token):
    """The insurance: a junction wrongly trusted (marked safe by hand, on a tokenizer with a token that really spans
    it) is caught, by the anchor's ids changing (a token "\n(") or by the first prompt's whole-string check (a
    token '"\n(': the anchor alone does not show it). The batch is tokenized whole (exact ids) and only that
    junction is marked unsafe, so the next call cuts at the others."""
    tok = _tokenizer_with(shipped_model_dir, token, False)
    tok.__dict__.setdefault("_factory_prefix_cache", {})[("segment", "(")] = True
    prompts = _judge_prompts("logprob", "plain", questions, ())
    expected = [encode_prompt(tok, p.prompt) for p in prompts]
    assert encode_segments(tok, prompts) == expected
    cache = tok.__dict__["_factory_prefix_cache"]
    assert cache[("segment", "(")] is False and cache[("segment", questions[0][0])] is True
    assert encode_segments(tok, prompts) == expected


def test_engines_expose_encode_segments():
    from factory.engines import hf_engine, openai_engine, ray_replicas, vllm_engine

    for cls in (vllm_engine.VLLMEngine, hf_engine.TransformersEngine, openai_engine.OpenAIEngine,
                ray_replicas.RayReplicas):
        assert callable(getattr(cls, "encode_segments", None)), cls
