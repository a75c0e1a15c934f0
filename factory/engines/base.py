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
    if isinstance(prompt, list):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompt_format 'chat' needs a tokenizer with a chat template; use 'plain' for base models")
        kwargs = chat_template_kwargs or {}
        if prompt and prompt[0]["role"] == "system" and not template_keeps_system(tokenizer, kwargs):
            prompt = fold_system(prompt)
        prompt = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, **kwargs)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


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
