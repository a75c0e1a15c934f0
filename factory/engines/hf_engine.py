"""transformers engine: batched `generate` with left padding. Slower than vLLM; useful where vLLM is
not installed, and as a cross-check (greedy outputs of both engines agree on short completions)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, StoppingCriteria, StoppingCriteriaList, StopStringCriteria

from factory.config import SamplingConfig, TransformersModelConfig
from factory.model_info import control_strings
from factory.engines.base import Completion, cut_at_stop, encode_batch, encode_prompt, free_memory, in_order
from factory.engines.segments import encode_segments

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "auto": "auto"}


class _NotBefore(StoppingCriteria):
    """A stopping criterion that only counts once the sequences are `length` tokens long (min_tokens, as vLLM
    does it: stop strings completed before then do not end the completion)."""

    def __init__(self, inner: StoppingCriteria, length: int):
        self.inner, self.length = inner, length

    def __call__(self, input_ids, scores, **kwargs):
        done = self.inner(input_ids, scores, **kwargs)
        return done if input_ids.shape[-1] >= self.length else torch.zeros_like(done)


class TransformersEngine:
    name = "transformers"

    def __init__(self, cfg: TransformersModelConfig, model_dir: str, seed: int = 0):
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=_DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code).to(self.device).eval()
        self.model_id = model_dir
        self.max_model_len = cfg.max_model_len
        self.batch_size = cfg.batch_size
        self.chat_template_kwargs = dict(cfg.chat_template_kwargs)
        self.seed = seed
        self.special_tokens = control_strings(self.tokenizer)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos]) | {self.tokenizer.eos_token_id}
        self.eos_ids.discard(None)
        self._stops: dict[tuple, StopStringCriteria] = {}

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat_template_kwargs)

    def encode_batch(self, prompts) -> list[list[int]]:
        return encode_batch(self.tokenizer, prompts, self.chat_template_kwargs)

    def encode_segments(self, prompts) -> list[list[int]]:
        return encode_segments(self.tokenizer, prompts, self.chat_template_kwargs)

    def _stop_criteria(self, stop: list[str]) -> StopStringCriteria:
        # Building the criteria scans the whole vocabulary (2.5 s for Gemma's 262k tokens): once per stop list.
        key = tuple(stop)
        if key not in self._stops:
            self._stops[key] = StopStringCriteria(self.tokenizer, list(stop))
        return self._stops[key]

    @torch.inference_mode()
    def _generate_batch(self, batch: list[list[int]], sampling: SamplingConfig, seed: int, stop: list[str]):
        width = max(len(ids) for ids in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
        sample = sampling.temperature > 0
        kwargs = dict(max_new_tokens=sampling.max_tokens, min_new_tokens=sampling.min_tokens or None, do_sample=sample,
                      pad_token_id=pad, repetition_penalty=sampling.repetition_penalty)
        if sample:
            torch.manual_seed(seed)
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p,
                          top_k=sampling.top_k if sampling.top_k > 0 else None)
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        if stop:
            criteria = self._stop_criteria(stop)
            if sampling.min_tokens:
                criteria = _NotBefore(criteria, width + sampling.min_tokens)
            kwargs["stopping_criteria"] = StoppingCriteriaList([criteria])
        out = self.model.generate(input_ids=input_ids, attention_mask=mask, **kwargs)
        result = []
        for ids, row in zip(batch, out[:, width:].tolist()):
            n, hit_eos = len(row), False
            for i, t in enumerate(row):
                if t in self.eos_ids:
                    n, hit_eos = i + 1, True
                    break
            if not hit_eos:  # a row stopped early by a stop string is padded to the batch's length
                while n and row[n - 1] == pad:
                    n -= 1
            text = self.tokenizer.decode(row[:n], skip_special_tokens=True)
            # A stop string inside the first min_tokens tokens does not end the completion (as in vLLM).
            keep = len(self.tokenizer.decode(row[:min(n, sampling.min_tokens)], skip_special_tokens=True))
            tail, hit_stop = cut_at_stop(text[keep:], stop)
            text = text[:keep] + tail
            finish = "stop" if (hit_eos or hit_stop) else "length"
            result.append(Completion(text=text, prompt_tokens=len(ids), output_tokens=n, finish_reason=finish))
        return result

    @torch.inference_mode()
    def score_next_token(self, prompts, token_ids) -> list[list[float]]:
        result: list[list[float]] = []
        pad = self.tokenizer.pad_token_id
        for i in range(0, len(prompts), self.batch_size):
            batch = prompts[i:i + self.batch_size]
            width = max(len(ids) for ids in batch)
            input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=self.device)
            # Left padding shifts positions; give each row positions that start at 0 on its first real token.
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions).logits[:, -1, :]
            logits = logits.float()
            logprobs = torch.log_softmax(logits, dim=-1)[:, token_ids]
            result += logprobs.tolist()
        return result

    def generate(self, prompts, sampling, seeds, stop) -> list[Completion]:
        return in_order(self.generate_stream(prompts, sampling, seeds, stop), len(prompts))

    def generate_stream(self, prompts, sampling, seeds, stop) -> Iterator[tuple[int, Completion]]:
        """`(index, completion)` for each row of a micro-batch (`batch_size` rows, seeded with its first row's
        seed) as soon as that micro-batch is done; `generate` is this stream put back in order. transformers'
        `generate` has no requests in flight to cancel: closing the stream just stops before the next batch."""
        for start in range(0, len(prompts), self.batch_size):
            batch = self._generate_batch(prompts[start:start + self.batch_size], sampling, seeds[start], stop)
            yield from enumerate(batch, start)

    def close(self) -> None:
        """Drop the model (and the stop-string criteria that hold the tokenizer's tables) and return the memory:
        collect, then on GPU give the caching allocator's free blocks back. The engine cannot generate afterwards."""
        self.model = None
        self._stops.clear()
        free_memory()
