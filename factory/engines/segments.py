"""Prompts given in pieces (segments), each distinct piece of a batch tokenized once.

A page of judge prompts repeats its pieces: the conversation in all four prompts of a candidate pair (2 principles x
2 orders) and in every pair of that conversation, a principle's question in every prompt, each response once as
option (A) and once as (B). `encode_segments` tokenizes every distinct piece of the batch once, in one batched
call, and concatenates their ids: the same ids as `encode_prompt` of the whole text, for the reason the notes
before `factory.engines.base.encode_batch` give (applied at each cut; see "Several cuts" there). It cuts only
after a newline, before a character c for which the junction "\\n" + c is proven safe on this tokenizer
(`_cut_ok`); at any other junction the two pieces are joined, so the ids are exact whatever the pieces are.
"""

from __future__ import annotations

from dataclasses import dataclass

from factory.engines.base import _PROBES, _junction_safe, _tokens, _with_bos, render_prompt

ANCHOR = "\n"  # every cut is after a newline: each piece after the first is tokenized behind it
# Texts ending in a newline that the probes put left of a cut (a piece's end, as the judge prompts have them and worse).
_LEFTS = ("\n", "x\n", "Human: hi\n\n", 'Options:\n(A) "ok"\n', " \n", "\r\n", "\t\n\n\n", ".\n", "123\n",
          "\U0001F642\n", "e\u0301\n", "\u200b\n", "<end_of_turn>\n", "<|im_end|>\n", "</s>\n", "-----\n")


@dataclass(frozen=True)
class Segmented:
    """A prompt in pieces: the plain text, or (chat) the content of its one user message, is "".join(parts)."""

    parts: tuple[str, ...]
    chat: bool = False

    @property
    def prompt(self) -> str | list[dict]:
        """The prompt `encode_prompt` takes: the text, or the one user message."""
        text = "".join(self.parts)
        return [{"role": "user", "content": text}] if self.chat else text


def _cache(tokenizer) -> dict:
    return tokenizer.__dict__.setdefault("_factory_prefix_cache", {})


def _anchor_ids(tokenizer) -> list[int]:
    cache = _cache(tokenizer)
    if ("anchor", ANCHOR) not in cache:
        cache[("anchor", ANCHOR)] = _tokens(tokenizer, [ANCHOR])[0]
    return cache[("anchor", ANCHOR)]


def _cut_ok(tokenizer, c: str) -> bool:
    """Whether a cut between a newline and `c` gives exact ids on this tokenizer: no added or vocabulary token
    spans "\\n" + c (`_junction_safe`), and for probes left and right of the cut (hostile texts ending in a newline,
    `_PROBES` after c) the pieces' ids concatenate to the whole string's. Checked once per (tokenizer, c)."""
    cache = _cache(tokenizer)
    key = ("segment", c)
    if key not in cache:
        ok = _junction_safe(tokenizer, ANCHOR, c)
        if ok:
            a_ids, skip = _anchor_ids(tokenizer), len(_anchor_ids(tokenizer))
            rights = [c + p for p in _PROBES]
            lefts = _tokens(tokenizer, list(_LEFTS))
            rests = _tokens(tokenizer, [ANCHOR + r for r in rights])
            whole = _tokens(tokenizer, [left + r for left in _LEFTS for r in rights])
            pairs = [(lt, rt) for lt in lefts for rt in rests]
            ok = all(r[:skip] == a_ids for r in rests) and all(w == lt + rt[skip:] for w, (lt, rt) in zip(whole, pairs))
        cache[key] = ok
    return cache[key]


def _pieces(tokenizer, prompt: Segmented, chat_template_kwargs: dict | None) -> list[str]:
    """The rendered text of `prompt` as pieces (their concatenation IS the text `encode_prompt` tokenizes). Chat:
    the template's text before the content joins the first piece, the text after it the last one."""
    parts = [p for p in prompt.parts if p]
    if not prompt.chat:
        return parts or [""]
    content = "".join(parts)
    text = render_prompt(tokenizer, prompt.prompt, chat_template_kwargs)
    i = text.find(content) if content else -1
    if i < 0 or len(parts) < 2:  # the template changed the content (trimmed it, say): the text is one piece
        return [text]
    return [text[:i] + parts[0], *parts[1:-1], parts[-1] + text[i + len(content):]]


def _join_unsafe(tokenizer, pieces: list[str]) -> list[str]:
    """`pieces` with every junction that is not a proven-safe cut joined."""
    out, known = [pieces[0]], _cache(tokenizer)
    for p in pieces[1:]:
        ok = known.get(("segment", p[0]))
        if out[-1].endswith(ANCHOR) and (ok if ok is not None else _cut_ok(tokenizer, p[0])):
            out.append(p)
        else:
            out[-1] += p
    return out


def _whole(tokenizer, docs: list[list[str]]) -> list[list[int]]:
    return [_with_bos(tokenizer, ids) for ids in _tokens(tokenizer, ["".join(d) for d in docs])]


def _blame(tokenizer, doc: list[str]) -> None:
    """After a mismatch on `doc`: mark unsafe each junction whose cut alone changes doc's ids (all of them if
    none does alone), so later calls do not cut there."""
    skip = len(_anchor_ids(tokenizer))
    whole = _tokens(tokenizer, ["".join(doc)])[0]
    bad = set()
    for k in range(1, len(doc)):
        left, right = _tokens(tokenizer, ["".join(doc[:k]), ANCHOR + "".join(doc[k:])])
        if left + right[skip:] != whole:
            bad.add(doc[k][0])
    for c in bad or {p[0] for p in doc[1:]}:
        _cache(tokenizer)[("segment", c)] = False


def encode_segments(tokenizer, prompts: list[Segmented], chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """`[encode_prompt(tokenizer, p.prompt, chat_template_kwargs) for p in prompts]`, the same ids, faster: each
    distinct piece of the batch is tokenized once (one batched call), behind the anchor "\\n" unless it starts a
    prompt, and each prompt's ids are its pieces' ids concatenated. Only proven-safe junctions are cut (see the
    module notes); the first prompt cut is also checked against its whole-string ids, and on a mismatch the
    junctions to blame are marked unsafe and the batch is tokenized whole."""
    docs = [_pieces(tokenizer, p, chat_template_kwargs) for p in prompts]
    if not docs or not getattr(tokenizer, "is_fast", False):
        return _whole(tokenizer, docs)
    docs = [_join_unsafe(tokenizer, d) for d in docs]
    rests = dict.fromkeys(ANCHOR + p for d in docs for p in d[1:])
    keys = list(dict.fromkeys([d[0] for d in docs] + list(rests)))
    ids = dict(zip(keys, _tokens(tokenizer, keys)))
    a_ids = _anchor_ids(tokenizer)
    skip = len(a_ids)
    merged = {k[1] for k in rests if ids[k][:skip] != a_ids}  # the anchor merged with the piece: a token spans it
    if merged:
        for c in merged:
            _cache(tokenizer)[("segment", c)] = False
        return _whole(tokenizer, docs)
    out, bos = [], tokenizer.bos_token_id  # `_with_bos`, with the attribute read once
    for d in docs:
        toks = list(ids[d[0]])
        for p in d[1:]:
            toks += ids[ANCHOR + p][skip:]
        if bos is not None and (not toks or toks[0] != bos):
            toks.insert(0, bos)
        out.append(toks)
    i = next((i for i, d in enumerate(docs) if len(d) > 1), None)  # the first prompt that was cut
    if i is not None and out[i] != _whole(tokenizer, docs[i:i + 1])[0]:  # cheap insurance: one whole string per call
        _blame(tokenizer, docs[i])
        return _whole(tokenizer, docs)
    return out
