"""Conversations: a prompt is one user turn, or a list of turns that ends with the user's.

Prompts arrive as plain text, as a `messages` column (a list of {"role", "content"}, roles system / user /
assistant, as TRL and the chat templates use), or as an HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...",
ending with a Human turn), the format of the Constitutional AI paper's red-team prompts. Every stage reads a
prompt as a list of turns (`turns_of`): the response, critique and revision continue the conversation, and the
judge is shown all of it. Model output and user text stay data: templates quote every turn.

Also here: splitting a reasoning trace (<think>...</think>) off a completion, so it is stored apart from the
answer and never judged as the answer.
"""

from __future__ import annotations

import json
import re

ROLES = ("system", "user", "assistant")
_HH_MARK = re.compile(r"(?:^|\n\n)(Human|Assistant):[ \t]?")
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


class ConversationError(ValueError):
    """A malformed conversation; the message says what is wrong (the caller adds file and line)."""


def validate_messages(messages) -> list[dict]:
    """A role/content list ending with a user turn; system only first; user and assistant alternate."""
    if not isinstance(messages, list) or not messages:
        raise ConversationError("'messages' must be a non-empty list of {\"role\": ..., \"content\": ...} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or set(m) - {"role", "content", "name"} or "role" not in m or "content" not in m:
            raise ConversationError(f"message {i} must be an object with 'role' and 'content' (got {str(m)[:80]!r})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ConversationError(f"message {i} has role {role!r}; allowed: {', '.join(ROLES)}")
        if not isinstance(content, str) or not content.strip():
            raise ConversationError(f"message {i} ({role}) has empty or non-text content")
        if role == "system" and i != 0:
            raise ConversationError(f"message {i}: a system message may only come first")
        out.append({"role": role, "content": content.strip()})
    chat = [m for m in out if m["role"] != "system"]
    if not chat:
        raise ConversationError("the conversation has no user turn")
    for i, m in enumerate(chat):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise ConversationError(f"turn {i + 1} is {m['role']!r} where {want!r} was expected: user and assistant "
                                    "turns must alternate, starting with the user")
    if chat[-1]["role"] != "user":
        raise ConversationError("the conversation must end with a user turn (the one the model answers)")
    return out


def parse_hh(text: str) -> list[dict]:
    """An HH-RLHF transcript ("\\n\\nHuman: ...\\n\\nAssistant: ...") as turns; a final empty Assistant turn
    (the cue the dataset ends prompts with) is dropped."""
    if not isinstance(text, str):
        raise ConversationError("an HH transcript must be text")
    marks = list(_HH_MARK.finditer(text))
    if not marks or text[:marks[0].start()].strip():
        raise ConversationError("an HH transcript starts with 'Human:' (e.g. \"\\n\\nHuman: ...\\n\\nAssistant: ...\")")
    turns = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        content = text[m.end():nxt.start() if nxt else len(text)].strip()
        turns.append({"role": "user" if m.group(1) == "Human" else "assistant", "content": content})
    if turns and turns[-1]["role"] == "assistant" and not turns[-1]["content"]:
        turns.pop()
    return validate_messages(turns)


def canonical(messages: list[dict]) -> str:
    """The JSON a multi-turn prompt is stored and hashed as."""
    return json.dumps(messages, ensure_ascii=False, separators=(",", ":"))


def transcript(messages: list[dict]) -> str:
    """Readable text of a conversation, the `prompts.text` of a multi-turn prompt (HH style, no system)."""
    names = {"user": "Human", "assistant": "Assistant"}
    return "\n\n".join(f"{names[m['role']]}: {m['content']}" for m in messages if m["role"] != "system")


def turns_of(text: str, messages: str | list | None = None) -> list[dict]:
    """The turns of a stored prompt: its `messages` when it has them, else one user turn of its text."""
    if messages:
        return json.loads(messages) if isinstance(messages, str) else messages
    return [{"role": "user", "content": text}]


def with_system(turns: list[dict], system: str | None) -> list[dict]:
    """Prepend the configured system prompt unless the conversation brings its own."""
    if system and not (turns and turns[0]["role"] == "system"):
        return [{"role": "system", "content": system}] + turns
    return turns


def split_reasoning(raw: str) -> tuple[str | None, str]:
    """(reasoning, answer) of a completion. A trace that never closes leaves no answer (the caller records it
    as failed); the reasoning is stored apart and never judged as the answer."""
    start = raw.find(THINK_OPEN)
    end = raw.find(THINK_CLOSE)
    if end != -1 and (start == -1 or start < end):
        reasoning = raw[start + len(THINK_OPEN) if start != -1 else 0:end]
        return reasoning.strip(), raw[end + len(THINK_CLOSE):]
    if start != -1 and not raw[:start].strip():
        return raw[start + len(THINK_OPEN):].strip(), ""
    return None, raw
