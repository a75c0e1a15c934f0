"""Prompt rendering for the generate, critique and revise stages.

Two formats. `plain`: Human/Assistant few-shot text, as the Constitutional AI paper prompted its base
models, which is also what the shipped (base) Gemma 3 270M needs. `chat`: the tokenizer's chat template
for instruction-tuned models.

Model output and user prompts are data. Before they enter a template, `quote` neutralises anything that
could close the template: role markers at the start of a line ("Human:", "Revision:" ...) are indented
with a quote mark, and the tokenizer's special-token strings (e.g. "<end_of_turn>") are broken so they
tokenize as plain text.
"""

from __future__ import annotations

import hashlib
import re

from factory.constitution import Constitution, Principle

ROLE_MARKERS = ("Human", "Assistant", "CritiqueRequest", "Critique", "RevisionRequest", "Revision")
_ROLE_LINE = re.compile(r"^(\s*)(" + "|".join(ROLE_MARKERS) + r")(\s*:)", re.IGNORECASE | re.MULTILINE)
# Where generation must stop so the model does not write the next turn itself.
PLAIN_STOPS = ["\nHuman:", "\nAssistant:", "\nCritiqueRequest:", "\nCritique:", "\nRevisionRequest:", "\nRevision:"]

# Special-token strings of common model families, broken inside untrusted text (see quote).
COMMON_SPECIAL_TOKENS = ("<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>", "<|im_start|>",
                         "<|im_end|>", "<|endoftext|>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
                         "<|end_header_id|>", "<s>", "</s>", "[INST]", "[/INST]")

GENERATE_PREAMBLE = (
    "Below are conversations between a human and an AI assistant. The assistant answers the human's "
    "request directly and in a few sentences.\n\n"
    "Human: How many legs does a spider have?\n\nAssistant: A spider has eight legs. Insects have six, "
    "which is one way to tell spiders and insects apart.\n\n"
    "Human: Give me a tip for remembering names.\n\nAssistant: Repeat the name out loud when you are "
    "introduced, for example \"Nice to meet you, Maria\", and link it to something about the person.\n\n"
)
CRITIQUE_PREAMBLE = (
    "Below, an AI assistant's response is critiqued against a principle, and then the assistant "
    "answers the same request again with a revised response that addresses the critique.\n\n"
)


def quote(text: str, special_tokens: tuple[str, ...] = ()) -> str:
    """Make untrusted text safe to embed: it cannot start a new turn or inject special tokens."""
    # Every kind of line break becomes "\n" first, so no separator can hide a role marker.
    text = "\n".join(text.splitlines()).strip()
    if special_tokens:
        text = break_control_strings(text, special_tokens)
    return _ROLE_LINE.sub(lambda m: f"{m.group(1)}> {m.group(2)}{m.group(3)}", text)


_INDEXES: dict[int, tuple] = {}  # id(token tuple) -> (the tuple, its index)


def _control_index(tokens: tuple[str, ...]):
    """First characters (a regex class), the token set and its lengths (longest first) of a control-string
    list: a tokenizer can have thousands (Gemma 3: 6,249), so text is scanned once, not once per token. Cached by
    the tuple's identity (each model's tuple is made once): hashing thousands of strings per call, as an
    lru_cache key would, cost more than the scan."""
    hit = _INDEXES.get(id(tokens))
    if hit is not None and hit[0] is tokens:
        return hit[1]
    toks = frozenset(t for t in tokens if t)
    starts = re.compile("[" + "".join(sorted({re.escape(t[0]) for t in toks})) + "]") if toks else None
    index = (starts, toks, sorted({len(t) for t in toks}, reverse=True))
    if len(_INDEXES) >= 32:
        _INDEXES.clear()
    _INDEXES[id(tokens)] = (tokens, index)  # the tuple is kept alive, so its id is not reused while cached
    return index


def break_control_strings(text: str, tokens: tuple[str, ...]) -> str:
    """Insert a zero-width space after the first character of every control string in `text`: it reads the
    same but can no longer be tokenized as that control token."""
    starts, toks, lengths = _control_index(tokens if isinstance(tokens, tuple) else tuple(tokens))
    if starts is None:
        return text
    out, last, pos = [], 0, 0
    while (m := starts.search(text, pos)) is not None:
        i = m.start()
        hit = next((n for n in lengths if text[i:i + n] in toks), 0)
        if hit:
            out.append(text[last:i + 1] + "\u200b")
            last, pos = i + 1, i + hit
        else:
            pos = i + 1
    return "".join(out) + text[last:] if out else text


def template_hash(*parts: str) -> str:
    """Hash of the fixed template text a row was produced with (its lineage)."""
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def _turn(prompt: str, response: str) -> str:
    return f"Human: {prompt}\n\nAssistant: {response}\n\n"


def as_turns(prompt: str | list[dict]) -> list[dict]:
    """A prompt as conversation turns: a string is one user turn (see factory/conversation.py)."""
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _plain_turns(prompt: str | list[dict], sp: tuple[str, ...]) -> str:
    """The conversation as Human/Assistant text, every turn quoted; a system prompt is a paragraph before it."""
    out = []
    for t in as_turns(prompt):
        if t["role"] == "system":
            out.append(quote(t["content"], sp) + "\n\n")
        else:
            out.append(f"{'Human' if t['role'] == 'user' else 'Assistant'}: {quote(t['content'], sp)}\n\n")
    return "".join(out)


def _chat_turns(prompt: str | list[dict], sp: tuple[str, ...]) -> list[dict]:
    return [{"role": t["role"], "content": quote(t["content"], sp)} for t in as_turns(prompt)]


def _few_shot(constitution: Constitution, n: int | None = None) -> str:
    out = [CRITIQUE_PREAMBLE]
    for ex in constitution.examples[:n]:
        p = constitution.principle(ex.principle)
        out.append(
            _turn(ex.prompt, ex.response)
            + f"CritiqueRequest: {p.critique_request}\n\nCritique: {ex.critique}\n\n"
            + f"RevisionRequest: {p.revision_request}\n\nRevision:\n\n" + _turn(ex.prompt, ex.revision) + "-----\n\n"
        )
    return "".join(out)


def plain_generate(prompt: str | list[dict], sp: tuple[str, ...] = ()) -> str:
    return GENERATE_PREAMBLE + _plain_turns(prompt, sp) + "Assistant:"


def plain_critique(constitution: Constitution, few_shot: bool, principle: Principle, prompt: str | list[dict],
                   response: str, sp: tuple[str, ...] = ()) -> str:
    head = _few_shot(constitution) if few_shot else CRITIQUE_PREAMBLE
    return (head + _plain_turns(prompt, sp) + f"Assistant: {quote(response, sp)}\n\n"
            + f"CritiqueRequest: {principle.critique_request}\n\nCritique:")


def plain_revision(constitution: Constitution, few_shot: bool, principle: Principle, prompt: str | list[dict],
                   response: str, critique: str, sp: tuple[str, ...] = ()) -> str:
    # The revision is written as a fresh assistant turn: small base models asked for a bare "Revision:"
    # mostly repeat the revision request back (measured on the shipped model: 12 of 15).
    return (plain_critique(constitution, few_shot, principle, prompt, response, sp)
            + f" {quote(critique, sp)}\n\nRevisionRequest: {principle.revision_request}\n\nRevision:\n\n"
            + _plain_turns(prompt, sp) + "Assistant:")


def chat_generate(prompt: str | list[dict], sp: tuple[str, ...] = ()) -> list[dict]:
    return _chat_turns(prompt, sp)


def chat_critique(principle: Principle, prompt: str | list[dict], response: str, sp: tuple[str, ...] = ()) -> list[dict]:
    return _chat_turns(prompt, sp) + [
        {"role": "assistant", "content": quote(response, sp)},
        {"role": "user", "content": f"CritiqueRequest: {principle.critique_request}"},
    ]


def chat_revision(principle: Principle, prompt: str | list[dict], response: str, critique: str,
                  sp: tuple[str, ...] = ()) -> list[dict]:
    return chat_critique(principle, prompt, response, sp) + [
        {"role": "assistant", "content": quote(critique, sp)},
        {"role": "user", "content": f"RevisionRequest: {principle.revision_request}"},
    ]


def clean_output(raw: str) -> str:
    """Parse a completion: trim whitespace and cut at any role marker the model wrote anyway."""
    text = "\n".join(raw.splitlines())
    for stop in PLAIN_STOPS + ["\n-----"]:
        idx = text.find(stop)
        if idx != -1:
            text = text[:idx]
    return text.strip()


def fixed_text_hash(fmt: str, stage: str, constitution: Constitution | None, few_shot: bool,
                    system_prompt: str | None = None) -> str:
    """Template hash for a stage: the fixed text around the data (and the configured system prompt), so a
    template change re-runs rows."""
    extra = (system_prompt,) if system_prompt else ()
    if stage == "generate":
        return template_hash(fmt, stage, GENERATE_PREAMBLE if fmt == "plain" else "", *extra)
    head = _few_shot(constitution) if (few_shot and fmt == "plain") else CRITIQUE_PREAMBLE
    return template_hash(fmt, stage, head, *extra)
