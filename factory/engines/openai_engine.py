"""OpenAI-compatible HTTP engine: a `vllm serve` process, or any server with the /v1/completions API.

Prompts are tokenized locally (the `path` folder's tokenizer) and sent as token ids, exactly as the
offline engines see them; the server returns text, token counts and, when asked, top log-probabilities.
The API key is read from the environment variable named by `api_key_env` at request time and is never
stored. Requests run with bounded concurrency (`concurrency`, 64 by default: against `vllm serve` the requests in
flight are the server's batch, so a handful would leave it mostly idle; measured against a local CPU `vllm serve`,
64 gave 1.41x the rows/s of 8, as fast as the offline engine: benchmarks/openai_concurrency.py); 429, 5xx, timeouts
and connection errors are retried with exponential backoff, and when retries run out the stage fails with a clear
error (finished batches are stored; a re-run resumes).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

import httpx

from factory.config import OpenAIModelConfig, SamplingConfig
from factory.model_info import control_strings
from factory.engines.base import Completion, cut_at_stop, encode_batch, encode_prompt, in_order
from factory.engines.segments import encode_segments

TOP_LOGPROBS = 20


def completion_body(api_model: str, ids: list[int], sampling: SamplingConfig, seed: int, stop: list[str]) -> dict:
    """The /v1/completions request for one prompt. Every sampling setting stored in the rows' lineage is sent,
    defaults included, so the server's own defaults (a model's generation_config) never apply silently.
    top_k -1 ("off") is sent as 0, which vLLM's server prefers for "off"; min_tokens is a vLLM extension."""
    return {"model": api_model, "prompt": ids, "max_tokens": sampling.max_tokens, "min_tokens": sampling.min_tokens,
            "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": max(sampling.top_k, 0),
            "repetition_penalty": sampling.repetition_penalty, "seed": seed, "stop": stop or None}


class EndpointError(RuntimeError):
    """The server kept failing after every retry."""


class OpenAIEngine:
    name = "openai"

    def __init__(self, cfg: OpenAIModelConfig, model_dir: str, seed: int = 0):
        from transformers import AutoTokenizer

        if not cfg.base_url:
            raise ValueError("models.*.base_url is required for engine 'openai' (e.g. http://127.0.0.1:8000/v1)")
        self.cfg = cfg
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=cfg.trust_remote_code)
        self.model_id = model_dir
        self.api_model = cfg.api_model or model_dir
        self.max_model_len = cfg.max_model_len
        self.chat_template_kwargs = dict(cfg.chat_template_kwargs)
        self.special_tokens = control_strings(self.tokenizer)
        self._exact_logprobs: bool | None = None  # whether the server takes logprob_token_ids (tried once)
        # One pooled connection per request in flight (httpx's default pool of 100 would cap, and then time out,
        # a larger concurrency).
        limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
        self.client = httpx.Client(base_url=cfg.base_url.rstrip("/"), timeout=cfg.timeout_s, limits=limits)

    def encode(self, prompt) -> list[int]:
        return encode_prompt(self.tokenizer, prompt, self.chat_template_kwargs)

    def encode_batch(self, prompts) -> list[list[int]]:
        return encode_batch(self.tokenizer, prompts, self.chat_template_kwargs)

    def encode_segments(self, prompts) -> list[list[int]]:
        return encode_segments(self.tokenizer, prompts, self.chat_template_kwargs)

    def _headers(self) -> dict:
        key = os.environ.get(self.cfg.api_key_env)
        return {"Authorization": f"Bearer {key}"} if key else {}

    def _post(self, body: dict) -> dict:
        delay = 1.0
        for attempt in range(self.cfg.max_retries + 1):
            try:
                r = self.client.post("/completions", json=body, headers=self._headers())
                if r.status_code == 429 or r.status_code >= 500:
                    raise httpx.HTTPStatusError(f"server answered {r.status_code}", request=r.request, response=r)
                if r.status_code >= 400:  # a client error will not get better by retrying
                    raise EndpointError(f"{self.cfg.base_url} rejected the request ({r.status_code}): {r.text[:300]}")
                return r.json()
            except (httpx.TransportError, httpx.HTTPStatusError) as e:
                if attempt == self.cfg.max_retries:
                    raise EndpointError(f"{self.cfg.base_url} failed after {attempt + 1} attempts: {e}. Finished "
                                        "rows are stored; run the same command again to resume.") from e
                time.sleep(delay)
                delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    def _map(self, bodies: list[dict]) -> list[dict]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self._post, bodies))

    def generate(self, prompts, sampling: SamplingConfig, seeds, stop) -> list[Completion]:
        return in_order(self.generate_stream(prompts, sampling, seeds, stop), len(prompts))

    def generate_stream(self, prompts, sampling: SamplingConfig, seeds, stop) -> Iterator[tuple[int, Completion]]:
        """One request per prompt, `concurrency` in flight; `(index, completion)` as each response arrives.

        Closing the stream early cancels the requests not yet sent; the few in flight finish in their threads
        and are dropped (an HTTP request cannot be taken back; waiting for them, retries included, would only
        delay the caller's error)."""
        # The OpenAI API takes at most 4 stop strings: send the shortest (most general) and cut at all of
        # them here, so the text is the same as the offline engines give.
        sent = sorted(set(stop), key=len)[:4]
        pool = ThreadPoolExecutor(max_workers=self.cfg.concurrency)
        try:
            index = {pool.submit(self._post, completion_body(self.api_model, ids, sampling, seed, sent)): i
                     for i, (ids, seed) in enumerate(zip(prompts, seeds, strict=True))}
            pending = set(index)
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    i = index[future]
                    yield i, self._completion(prompts[i], future.result(), stop)
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _completion(self, ids: list[int], resp: dict, stop: list[str]) -> Completion:
        choice = resp["choices"][0]
        n_out = (resp.get("usage") or {}).get("completion_tokens")
        if n_out is None:
            n_out = len(self.tokenizer(choice["text"], add_special_tokens=False)["input_ids"])
        text, cut = cut_at_stop(choice["text"], stop)
        finish = "stop" if cut or choice.get("finish_reason") != "length" else "length"
        return Completion(text=text, prompt_tokens=len(ids), output_tokens=n_out, finish_reason=finish)

    def score_next_token(self, prompts, token_ids) -> list[list[float]]:
        """Top log-probabilities of the next token; an answer token outside the top k gets -inf.
        Servers that return no log-probabilities raise: use the rubric judge (label.mode: rubric)."""
        wanted = [self.tokenizer.convert_ids_to_tokens(t) for t in token_ids]
        decoded = [self.tokenizer.decode([t]) for t in token_ids]
        bodies = [{"model": self.api_model, "prompt": ids, "max_tokens": 1, "temperature": 0.0,
                   "logprobs": TOP_LOGPROBS} for ids in prompts]
        # vLLM's server returns the log-probabilities of named tokens (`logprob_token_ids`) whatever their rank;
        # a server that refuses the field falls back to the top-k (an answer outside it is a failed judgment).
        exact = [{**b, "logprob_token_ids": list(token_ids)} for b in bodies]
        responses: list[dict] = []
        if self._exact_logprobs is None and bodies:
            try:
                responses = [self._post(exact[0])]
                self._exact_logprobs = True
            except EndpointError as e:
                if "rejected the request" not in str(e):
                    raise
                self._exact_logprobs = False
        rest = len(responses)
        responses += self._map(exact[rest:] if self._exact_logprobs else bodies[rest:])
        result = []
        for resp in responses:
            lp = (resp["choices"][0].get("logprobs") or {}).get("top_logprobs")
            if not lp:
                raise EndpointError(f"{self.cfg.base_url} returned no log-probabilities; set label.mode: rubric")
            top = lp[0] or {}
            result.append([top.get(w, top.get(d, -math.inf)) for w, d in zip(wanted, decoded)])
        return result

    def close(self) -> None:
        """Close the HTTP client's connections (the server and its model are not ours to stop). Idempotent."""
        self.client.close()
