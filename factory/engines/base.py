"""The engine Protocol and what every backend shares: tokenization with the BOS token, and stop handling.

Prompts are tokenized here, once, and handed to the backend as token ids, so both backends see exactly
the same input and the BOS token the shipped model needs is never forgotten or doubled. User text is
encoded without parsing special tokens (templates.quote already broke any special-token strings).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

from factory.config import ModelConfig, SamplingConfig


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    output_tokens: int
    finish_reason: str  # "stop" (EOS or stop string) or "length"


class Engine(Protocol):
    name: str  # backend name: "vllm" or "transformers"
    model_id: str  # the model folder (lineage)
    max_model_len: int
    special_tokens: tuple[str, ...]
    tokenizer: object  # the Hugging Face tokenizer, for answer-token ids

    def encode(self, prompt: str | list[dict]) -> list[int]: ...

    def encode_batch(self, prompts: list[str | list[dict]]) -> list[list[int]]:
        """`[self.encode(p) for p in prompts]`, with a shared prefix tokenized once (base.encode_batch)."""
        ...

    def encode_segments(self, prompts: list) -> list[list[int]]:
        """`[self.encode(p.prompt) for p in prompts]` for prompts given in pieces (segments.Segmented), each distinct
        piece tokenized once (segments.encode_segments). Optional: callers fall back to `encode_batch`."""
        ...

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                 stop: list[str]) -> list[Completion]:
        """One completion per prompt, in the order of `prompts` (`seeds[i]` seeds prompt i's sampling)."""
        ...

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                        stop: list[str]) -> Iterator[tuple[int, Completion]]:
        """The completions of `generate`, each yielded as `(index in prompts, completion)` as soon as it is done.

        Why: the caller can hand the engine thousands of prompts at once (so the engine's own batch stays full and
        no batch waits for its slowest row) and still store finished rows every few hundred. Every index is
        yielded exactly once, in any order, with exactly the completion `generate` gives for it. Closing the
        iterator early (`close()`, an exception in the caller, or dropping it) cancels the work not yet yielded,
        so the engine is clean for the next call. One stream at a time per engine."""
        ...

    def score_next_token(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Log-probabilities (over the whole vocabulary) of each of `token_ids` as the next token."""
        ...


def encode_prompt(tokenizer, prompt: str | list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """Token ids for a plain string or a chat message list, starting with exactly one BOS token.
    `chat_template_kwargs` (the model section's) go to the chat template, e.g. enable_thinking=False."""
    text = render_prompt(tokenizer, prompt, chat_template_kwargs)
    return _with_bos(tokenizer, tokenizer(text, add_special_tokens=False)["input_ids"])


def render_prompt(tokenizer, prompt: str | list[dict], chat_template_kwargs: dict | None = None) -> str:
    """The text `encode_prompt` tokenizes: a plain string as is, a message list through the chat template."""
    if not isinstance(prompt, list):
        return prompt
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; use 'plain' for base models")
    kwargs = chat_template_kwargs or {}
    if prompt and prompt[0]["role"] == "system" and not template_keeps_system(tokenizer, kwargs):
        prompt = fold_system(prompt)
    return tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)


def _with_bos(tokenizer, ids: list[int]) -> list[int]:
    bos = tokenizer.bos_token_id
    return [bos] + ids if bos is not None and (not ids or ids[0] != bos) else ids


# ---- encode_batch: the shared prefix of a batch tokenized once -----------------------------------------------
#
# Plain critique and revision prompts start with the same few-shot text (thousands of characters); only what
# follows it differs per row. encode_batch tokenizes that prefix P once per (tokenizer, P) and each row's rest R
# alone, and returns ids(P) + ids(R), which must equal ids(P + R), what encode_prompt returns.
#
# Where it cuts: after a newline, before a letter or digit c that every prompt of the batch has there (the cut lies
# inside the batch's common prefix, so the junction "\n" + c is the same for every row). Why the ids are the same:
#  1. Added (special) tokens are matched first, on the whole string. One matched across the cut would contain
#     "\n" + c; none may (checked), and none that strips whitespace on its left may start with c (it would eat P's
#     newline).
#  2. The model (BPE) merges adjacent symbols into vocabulary tokens; a merge across the cut would make a token
#     containing "\n" + c (in the vocabulary's own spelling: raw, or byte-level "Ċ" + c). None may exist (checked
#     over the whole vocabulary). With no merge across it, BPE on either side runs as it would alone, so the pieces
#     left and right of the cut are exactly those of P alone and of R alone. Regex pre-tokenizers (Llama 3, Qwen 2)
#     also split there ("\s*[\r\n]+" ends at a letter or digit), which only adds to this.
#  3. What depends on the position in the string (a prepended "▁" in SentencePiece normalizers or Metaspace, a
#     one-character look-ahead in a pre-tokenizer regex) is taken care of by tokenizing R behind an anchor, P's last
#     character, and dropping the anchor's ids: R never stands at the start of a string, as it does not in P + R;
#     the look-ahead sees c in both.
# The argument is checked on the real tokenizer, once per (tokenizer, P): P + probe for hostile probes (spaces,
# newlines, CRLF, punctuation, emoji, combining marks, digits, a special-token string, a zero-width space, all
# starting with c) and P's own continuation must split exactly; a tokenizer or prefix that fails any check is
# tokenized whole (one batched call). Every call also compares its first row with the whole-string encoding.
#
# Several cuts (factory/engines/segments.py, the label stage's judge prompts): the text is cut at several junctions
# "\n" + c at once. Points 1 and 2 hold at each cut on their own (no added token and no vocabulary token contains
# "\n" + c, whatever surrounds it), so neither the added-token split nor any merge crosses any cut, and the pieces
# between consecutive cuts are tokenized exactly as they would be alone; point 3 holds for each piece after the first,
# tokenized behind the anchor "\n" (every cut's left character). So the pieces' ids concatenate to the whole
# string's. The check runs once per (tokenizer, c), with probes on both sides of the cut; a junction that fails it is
# not cut. Every call also compares its first prompt with the whole-string encoding.

PREFIX_MIN_CHARS = 200  # a shorter common prefix is not worth it: one batched call for the whole strings
_PROBES = ("", " ", "  ", "\n", "\n\n\n", "\r\n", " \t x", "!!?", ":", "'s 't", "\U0001F642\U0001F642 ok", "\u0301e\u0301",
           "123456789", "\u200b<bos>", "<|im_start|>", "<end_of_turn>", "</s>", " Human: x\n\nAssistant:", "-----\n\n")


def _token_texts(tokenizer) -> tuple[list[str], list]:
    """Every vocabulary token's string, and the added tokens (AddedToken objects or strings)."""
    cache = tokenizer.__dict__.setdefault("_factory_prefix_cache", {})
    if "vocab" not in cache:
        added = list(getattr(tokenizer, "added_tokens_decoder", {}).values())
        cache["vocab"] = (list(tokenizer.get_vocab()), added)
    return cache["vocab"]


def _byte_level(text: str) -> str:
    """`text` as byte-level BPE vocabularies (GPT-2, Llama 3, Qwen) spell it: printable bytes as themselves, the
    others shifted past 255 (GPT-2's bytes_to_unicode; "\n" is "Ċ")."""
    printable = set(range(ord("!"), ord("~") + 1)) | set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), 256))
    table, n = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b], n = chr(256 + n), n + 1
    return "".join(table[b] for b in text.encode("utf-8"))


def _junction_safe(tokenizer, left: str, c: str) -> bool:
    """No added token and no vocabulary token can span the cut between `left` (P's last character) and `c`."""
    cache = tokenizer.__dict__.setdefault("_factory_prefix_cache", {})
    key = ("junction", left, c)
    if key not in cache:
        vocab, added = _token_texts(tokenizer)
        spellings = {left + c, _byte_level(left + c), (left + c).replace(" ", "\u2581")}
        ok = not any(s in t for t in vocab for s in spellings)
        for t in added:
            content = getattr(t, "content", t)
            if left + c in content or (getattr(t, "lstrip", False) and content.startswith(c)):
                ok = False
        cache[key] = ok
    return cache[key]


def _tokens(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, no special tokens added: what `tokenizer(texts, add_special_tokens=False)` gives.
    A fast tokenizer's own backend is called directly, with `encode_batch_fast` (no character offsets, which
    nothing here uses: ~1.4x fewer seconds per token, measured on the Gemma 3 tokenizer); the ids are the same."""
    if not texts:
        return []
    backend = getattr(tokenizer, "_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None and hasattr(backend, "encode_batch_fast") and \
            not getattr(backend, "encode_special_tokens", False) and not getattr(tokenizer, "split_special_tokens", False):
        return [e.ids for e in backend.encode_batch_fast(texts, add_special_tokens=False)]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def _prefix_entry(tokenizer, prefix: str, c: str, continuation: str):
    """(ids of P, anchor, ids of the anchor) when the cut after `prefix` (before `c`) is safe, else None."""
    cache = tokenizer.__dict__.setdefault("_factory_prefix_cache", {})
    key = ("prefix", prefix, c)
    if key in cache:
        return cache[key]
    entry = None
    anchor = prefix[-1]
    if _junction_safe(tokenizer, anchor, c):
        p_ids, a_ids = _tokens(tokenizer, [prefix, anchor])
        probes = [c + p for p in _PROBES] + [continuation]
        whole = _tokens(tokenizer, [prefix + p for p in probes])
        rest = _tokens(tokenizer, [anchor + p for p in probes])
        if p_ids and all(r[:len(a_ids)] == a_ids and w == p_ids + r[len(a_ids):] for w, r in zip(whole, rest)):
            entry = (p_ids, anchor, len(a_ids))
    if sum(1 for k in cache if k[0] == "prefix") >= 16:  # a few prefixes per tokenizer; forget the oldest
        del cache[next(k for k in cache if k[0] == "prefix")]
    cache[key] = entry
    return entry


def _cut(texts: list[str]) -> int:
    """The last safe cut inside the texts' common prefix: after a newline, before a letter or digit all share."""
    import os

    common = os.path.commonprefix(texts)
    for k in range(len(common) - 1, 0, -1):
        if common[k - 1] == "\n" and common[k].isalnum():
            return k
    return 0


def encode_batch(tokenizer, prompts: list[str | list[dict]], chat_template_kwargs: dict | None = None) -> list[list[int]]:
    """`[encode_prompt(tokenizer, p, chat_template_kwargs) for p in prompts]`, the same ids, faster: the prefix
    every prompt shares (the few-shot examples of plain critique and revision prompts) is tokenized once per
    tokenizer and prefix, and only each prompt's rest, in one batched tokenizer call. See the notes above for why
    the ids are provably the same, and what is checked on the real tokenizer before a prefix is used."""
    texts = [render_prompt(tokenizer, p, chat_template_kwargs) for p in prompts]
    if not texts:
        return []
    k = _cut(texts) if len(texts) > 1 and getattr(tokenizer, "is_fast", False) else 0
    entry = _prefix_entry(tokenizer, texts[0][:k], texts[0][k], texts[0][k:]) if k >= PREFIX_MIN_CHARS else None
    if entry is None:
        return [_with_bos(tokenizer, ids) for ids in _tokens(tokenizer, texts)]
    p_ids, anchor, skip = entry
    rests = _tokens(tokenizer, [anchor + t[k:] for t in texts])
    out = [_with_bos(tokenizer, p_ids + r[skip:]) for r in rests]
    if out[0] != encode_prompt(tokenizer, texts[0]):  # cheap insurance: one whole-string encoding per call
        tokenizer.__dict__["_factory_prefix_cache"][("prefix", texts[0][:k], texts[0][k])] = None
        return [_with_bos(tokenizer, ids) for ids in _tokens(tokenizer, texts)]
    return out


def text_tokens(tokenizer, text: str) -> list[int]:
    """Token ids of a continuation appended after a prompt (no BOS, no special-token parsing)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


_SYSTEM_PROBE = "factory-system-probe"


def template_keeps_system(tokenizer, kwargs: dict) -> bool:
    """Whether this chat template renders a system message (Mistral v0.1 raises on one, Phi-3's older template
    drops it silently). Checked once per tokenizer."""
    cache = tokenizer.__dict__.setdefault("_factory_system_support", {})
    key = repr(sorted(kwargs.items()))
    if key not in cache:
        probe = [{"role": "system", "content": _SYSTEM_PROBE}, {"role": "user", "content": "hi"}]
        try:
            cache[key] = _SYSTEM_PROBE in tokenizer.apply_chat_template(
                probe, tokenize=False, add_generation_prompt=True, **kwargs)
        except Exception:  # noqa: BLE001 - jinja's TemplateError / raise_exception: the template refuses it
            cache[key] = False
    return cache[key]


def fold_system(messages: list[dict]) -> list[dict]:
    """The system prompt as the first paragraph of the first user turn, for templates without a system role
    (what those models' own docs recommend)."""
    system, rest = messages[0]["content"], [dict(m) for m in messages[1:]]
    rest[0]["content"] = f"{system}\n\n{rest[0]['content']}"
    return rest


def free_memory() -> None:
    """Return a released model's memory: collect, give the CUDA caching allocator's free blocks back (GPU), and
    give the C heap's free pages back to the OS (glibc `malloc_trim`: after an engine is dropped the driver's
    freed buffers otherwise stay in its RSS, measured ~0.35 GiB per vLLM engine on CPU)."""
    import ctypes
    import gc
    import sys

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


def stream_generate(engine: Engine, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                    stop: list[str]) -> Iterator[tuple[int, Completion]]:
    """`engine.generate_stream(...)`, or `(index, completion)` pairs of one `generate` call for an engine without
    it (a test double, say): what a stage calls so that every engine can be streamed from."""
    if hasattr(engine, "generate_stream"):
        return engine.generate_stream(prompts, sampling, seeds, stop)
    return _one_call(engine, prompts, sampling, seeds, stop)


def _one_call(engine, prompts, sampling, seeds, stop) -> Iterator[tuple[int, Completion]]:
    yield from enumerate(engine.generate(prompts, sampling, seeds, stop))  # a generator: it has close()


def in_order(pairs, n: int) -> list[Completion]:
    """The completions of a `generate_stream` of `n` prompts, back in the prompts' order: how every engine's
    `generate` is built on its `generate_stream`, so the two cannot diverge."""
    result: list[Completion | None] = [None] * n
    for i, completion in pairs:
        result[i] = completion
    missing = [i for i, c in enumerate(result) if c is None]
    if missing:
        raise RuntimeError(f"the engine returned no completion for {len(missing)} of {n} prompts (first: {missing[0]})")
    return result


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """Truncate at the earliest stop string; report whether one was found."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i != -1), default=-1)
    return (text[:cut], True) if cut != -1 else (text, False)


def create_engine(cfg: ModelConfig, model_dir: str, seed: int = 0) -> Engine:
    """Build the backend named in the model config. Imports are local: vLLM is heavy and optional."""
    if cfg.engine == "vllm":
        from factory.engines.vllm_engine import VLLMEngine

        return VLLMEngine(cfg, model_dir, seed)
    if cfg.engine == "openai":
        from factory.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg, model_dir, seed)
    if cfg.engine == "transformers":
        from factory.engines.hf_engine import TransformersEngine

        return TransformersEngine(cfg, model_dir, seed)
    raise ValueError(f"unknown engine {cfg.engine!r}; allowed: vllm, transformers, openai")
