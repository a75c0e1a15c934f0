"""An engine that answers instantly, for measuring and testing factory's own cost (issue 11, items 7 and 8).

This is the one place a scripted engine belongs: the tests and the benchmark that use it are about factory's
orchestration (pending-work queries, rendering, tokenization, parsing, batching, DuckDB writes), not about any
model. Everything except the model is real: prompts are tokenized by the REAL tokenizer of the shipped Gemma 3
270M (`factory.models.resolve_model('default')`, local files only), with the same `encode_prompt` the vLLM and
transformers engines use, so tokenization costs what it costs in production.

`generate` returns, instantly, a deterministic sentence per prompt: a hash of the prompt's token ids picks words
from a small word list (disjoint from the words of `benchmarks/scale.py`'s prompts and from the constitution's
requests, so no output is an echo of its request). Different prompts, and so different stages of one prompt,
get different sentences, so a revision never equals the response it revises. `score_next_token` returns
pseudo-random log-probabilities per prompt (read from the same hash): labels vary, the two orders disagree
sometimes, and some averaged labels fall within the tie threshold.

Importable by the tests (tests/ is on sys.path under pytest) and by the benchmark (which puts the repository
root on sys.path): `from tests.instant_engine import InstantEngines` or `from instant_engine import ...`.
"""

from __future__ import annotations

import functools
import hashlib
import time
from collections import Counter

from factory.config import SamplingConfig
from factory.engines.base import Completion, encode_batch, encode_prompt
from factory.engines.segments import encode_segments

# Words of the answers. None appears in the synthetic prompts (benchmarks/scale.py) or in the constitution's
# critique and revision requests, so the echo check never fires; none contains a role marker or a blank line.
WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "glacier", "harbor", "indigo", "juniper",
         "kelp", "lagoon", "meadow", "nectar", "orchid", "pebble", "quartz", "reef", "saffron", "tundra",
         "umber", "velvet", "willow", "xenon", "yarrow", "zephyr", "aurora", "birch", "canyon", "delta",
         "estuary", "fern", "granite", "heron", "iris", "jasper", "kestrel", "lichen", "maple", "nimbus",
         "opal", "prairie", "quill", "raven", "sequoia", "thistle", "upland", "vale", "wren", "yucca")
OPENERS = ("Consider", "Notice", "Picture", "Remember", "Imagine", "Observe", "Recall", "Note")


@functools.lru_cache(maxsize=None)
def shipped_tokenizer():
    """The shipped Gemma 3 270M's tokenizer (its prepared model folder, no network), loaded once per process."""
    from transformers import AutoTokenizer

    from factory.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model("default")), local_files_only=True)


def _digest(ids: list[int]) -> bytes:
    """A stable hash of token ids: the tuple's hash (for ints it depends on the values only, not on
    PYTHONHASHSEED; cheaper than converting the ids to bytes), spread over 16 bytes. The engine stands in for the
    model, so its own cost should stay near zero."""
    return hashlib.blake2b(hash(tuple(ids)).to_bytes(8, "little", signed=True), digest_size=16).digest()


class InstantEngine:
    """Implements the Engine Protocol of factory/engines/base.py with the real shipped tokenizer and instant,
    deterministic outputs. Counts every request it gets (see `calls`)."""

    name = "instant"

    def __init__(self, max_model_len: int = 2048, tokenizer=None, stream_order: str = "shuffled"):
        self.tokenizer = tokenizer or shipped_tokenizer()
        from factory.model_info import control_strings

        self.model_id = "instant:" + str(getattr(self.tokenizer, "name_or_path", "gemma-3-270m"))
        self.max_model_len = max_model_len
        self.special_tokens = control_strings(self.tokenizer)
        self.stream_order = stream_order  # 'shuffled': generate_stream yields out of order, like a real engine
        # Token count of each word with its leading space: output_tokens without tokenizing every answer.
        self._word_tokens = {w: len(self.tokenizer(" " + w, add_special_tokens=False)["input_ids"])
                             for w in WORDS + OPENERS}
        self.calls: Counter = Counter()  # method -> calls
        self.items: Counter = Counter()  # method -> prompts handled
        # Seconds spent making outputs (not tokenizing: the real engines tokenize with factory's own code, so
        # that counts as factory's). This is the stand-in's own cost, which a model would replace.
        self.output_seconds = 0.0

    # ---- tokenization --------------------------------------------------------------------------------
    def encode(self, prompt: str | list[dict]) -> list[int]:
        self.calls["encode"] += 1
        self.items["encode"] += 1
        return encode_prompt(self.tokenizer, prompt)

    def encode_batch(self, prompts: list) -> list[list[int]]:
        """What the real engines do (factory.engines.base.encode_batch: one batched tokenizer call, a shared
        few-shot prefix tokenized once): the same ids as `encode` for each prompt."""
        self.calls["encode_batch"] += 1
        self.items["encode_batch"] += len(prompts)
        return encode_batch(self.tokenizer, prompts)

    def encode_segments(self, prompts: list) -> list[list[int]]:
        """What the real engines do (factory.engines.segments.encode_segments: each distinct piece of the batch
        tokenized once): the same ids as `encode(p.prompt)` for each prompt."""
        self.calls["encode_segments"] += 1
        self.items["encode_segments"] += len(prompts)
        return encode_segments(self.tokenizer, prompts)

    # ---- outputs -------------------------------------------------------------------------------------
    def _answer(self, ids: list[int], max_tokens: int, h: bytes | None = None) -> Completion:
        h = _digest(ids) if h is None else h
        n_words = 6 + h[0] % 12  # 6..17 words
        words = [OPENERS[h[1] % len(OPENERS)]] + [WORDS[b % len(WORDS)] for b in h[2:2 + n_words - 1]]
        if len(words) < n_words:  # the digest has 14 bytes left; stretch it for long answers
            words += [WORDS[(b * 7 + 3) % len(WORDS)] for b in h[: n_words - len(words)]]
        # The first word's count comes from its spaced form too; close enough for a token count.
        kept, n_tokens = [], 0
        for w in words:
            t = self._word_tokens[w]
            if n_tokens + t > max_tokens:
                break
            kept.append(w)
            n_tokens += t
        finish = "stop" if len(kept) == len(words) else "length"
        text = " " + " ".join(kept) + ("." if finish == "stop" else "")
        return Completion(text=text, prompt_tokens=len(ids), output_tokens=n_tokens + (finish == "stop"),
                          finish_reason=finish)

    def generate(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                 stop: list[str]) -> list[Completion]:
        assert len(prompts) == len(seeds), "one seed per prompt"
        self.calls["generate"] += 1
        self.items["generate"] += len(prompts)
        t0 = time.perf_counter()
        out = [self._answer(ids, sampling.max_tokens) for ids in prompts]
        self.output_seconds += time.perf_counter() - t0
        return out

    def generate_stream(self, prompts: list[list[int]], sampling: SamplingConfig, seeds: list[int],
                        stop: list[str]):
        """Yields (index into `prompts`, Completion) as each finishes. A real engine finishes short answers
        first; here the order is a fixed permutation (by each answer's hash) unless `stream_order='in_order'`,
        so a caller that assumes input order is caught."""
        assert len(prompts) == len(seeds), "one seed per prompt"
        self.calls["generate_stream"] += 1
        self.items["generate_stream"] += len(prompts)
        t0 = time.perf_counter()
        digests = [_digest(ids) for ids in prompts]
        order = range(len(prompts))
        if self.stream_order == "shuffled":
            order = sorted(order, key=lambda i: digests[i][::-1])
        self.output_seconds += time.perf_counter() - t0
        for i in order:
            t0 = time.perf_counter()
            out = self._answer(prompts[i], sampling.max_tokens, digests[i])
            self.output_seconds += time.perf_counter() - t0
            yield i, out

    def score_next_token(self, prompts: list[list[int]], token_ids: list[int]) -> list[list[float]]:
        """Log-probabilities of each of `token_ids` as the next token: pseudo-random per prompt, in (-6, -0.05).
        One prompt in 16 gets equal values (a judge with no preference), so exact ties occur too."""
        self.calls["score_next_token"] += 1
        self.items["score_next_token"] += len(prompts)
        t0, out = time.perf_counter(), []
        for ids in prompts:
            h = _digest(ids)
            # Uniform in (0.05, 6.0) from 4 bytes of the digest each (a Random seeded per prompt cost more than
            # the rest of this method together).
            u = [0.05 + 5.95 * int.from_bytes(h[k:k + 4], "little") / 2 ** 32 for k in (1, 5, 9, 12)]
            if h[0] % 16 == 0:
                out.append([-u[0]] * len(token_ids))
            else:
                out.append([-u[j % 4] for j in range(len(token_ids))])
        self.output_seconds += time.perf_counter() - t0
        return out

    def close(self) -> None:
        self.calls["close"] += 1

    @property
    def model_calls(self) -> int:
        """Requests that would cost a model: generate, generate_stream and score_next_token calls."""
        return self.calls["generate"] + self.calls["generate_stream"] + self.calls["score_next_token"]


class InstantEngines:
    """factory.pipeline.Engines' interface (`getter(cfg)` -> get(), `close()`) over instant engines: one engine
    per context length, so policy and judge of one config share the same engine. Counts engine requests
    (`gets`: get() calls, i.e. stages that asked for an engine) and engines made."""

    def __init__(self, tokenizer=None, stream_order: str = "shuffled"):
        self.tokenizer, self.stream_order = tokenizer, stream_order
        self.engines: dict[int, InstantEngine] = {}
        self.gets = 0
        self.closed = 0

    def getter(self, cfg):
        def get() -> InstantEngine:
            self.gets += 1
            if cfg.max_model_len not in self.engines:
                self.engines[cfg.max_model_len] = InstantEngine(cfg.max_model_len, self.tokenizer, self.stream_order)
            return self.engines[cfg.max_model_len]
        return get

    def close(self) -> None:
        self.closed += 1
        for engine in self.engines.values():
            engine.close()

    @property
    def output_seconds(self) -> float:
        """Seconds the stand-in spent making outputs, over every engine made (what a model would replace)."""
        return sum(e.output_seconds for e in self.engines.values())

    @property
    def calls(self) -> Counter:
        """Calls per method, over every engine made."""
        total: Counter = Counter()
        for engine in self.engines.values():
            total += engine.calls
        return total

    @property
    def model_calls(self) -> int:
        return sum(e.model_calls for e in self.engines.values())

    @property
    def prompts_handled(self) -> int:
        """Prompts given to generate / generate_stream / score_next_token, over every engine."""
        return sum(e.items["generate"] + e.items["generate_stream"] + e.items["score_next_token"]
                   for e in self.engines.values())
