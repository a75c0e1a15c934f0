"""What every model stage shares: find pending rows by anti-join, batch them through an engine within the
token budget, record prompts that do not fit the context as skipped, and write each batch in one
transaction. A killed stage loses at most the batch in flight; a finished stage makes no model calls."""

from __future__ import annotations

import json
import time
import unicodedata
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from factory.config import ModelConfig, SamplingConfig
from factory.conversation import split_reasoning
from factory.engines.base import Engine
from factory.store import ID_COLUMN, Store, now


class BudgetExhausted(Exception):
    """The run spent its output-token budget; finished rows are stored and a re-run resumes."""


@dataclass
class Job:
    row_id: str
    prompt: object  # rendered prompt: a string (plain) or chat messages (chat)
    fields: dict  # table-specific columns: prompt_id, parent_id, round, principle_id ...
    seed: int
    echo_of: str | None = None  # the request the model was given; an output that merely repeats it fails


@dataclass
class StageStats:
    rows: int = 0
    skipped: int = 0
    failed: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    seconds: float = 0.0
    model_calls: int = 0


@dataclass
class StageProgress:
    """A stage's progress in this run, written to `run_progress` with each batch it commits (`factory status`
    reads rows/s and an ETA from it). `wanted`: rows pending when the stage started; `stored_before`: its rows
    that were already stored; seconds: wall time since the stage started (engine start excluded)."""

    run_id: str
    stage: str
    model_id: str
    wanted: int
    stored_before: int
    done: int = 0
    t0: float = field(default_factory=time.perf_counter)
    started_at: object = field(default_factory=now)

    def advance(self, n: int) -> dict:
        self.done += n
        return self.row()

    def row(self) -> dict:
        return {"run_id": self.run_id, "stage": self.stage, "model_id": self.model_id, "wanted": self.wanted,
                "stored_before": self.stored_before, "done": self.done, "seconds": time.perf_counter() - self.t0,
                "started_at": self.started_at, "updated_at": now()}


@dataclass
class Context:
    """One run's state shared by its stages."""

    store: Store
    run_id: str
    seed: int
    write_batch_size: int = 256
    max_output_tokens: int | None = None
    progress: object = None  # a rich Progress, or None
    log: Callable[[str], None] = lambda msg: None
    stats: dict[tuple[str, str], StageStats] = field(default_factory=dict)

    def stage_stats(self, stage: str, model: str) -> StageStats:
        return self.stats.setdefault((stage, model), StageStats())

    def tokens_spent(self) -> int:
        return sum(s.output_tokens for s in self.stats.values())

    def start_progress(self, stage: str, model_id: str, wanted: int, stored_before: int) -> StageProgress:
        """Record that a stage starts (after its engine is up) and return its progress for the batch commits."""
        p = StageProgress(self.run_id, stage, model_id, wanted, stored_before)
        self.store.record_progress(p.row())
        return p


def model_label(cfg: ModelConfig) -> str:
    """The model's identity in lineage and row ids: a name, not a machine-specific cache path."""
    from factory.models import DEFAULT_MODEL_NAME

    return DEFAULT_MODEL_NAME if cfg.path in ("default", DEFAULT_MODEL_NAME) else cfg.path


def sampling_json(s: SamplingConfig) -> str:
    d = s.model_dump(mode="json")
    if not d.get("min_tokens"):  # added later: at its default it leaves the ids of existing stores unchanged
        d.pop("min_tokens", None)
    return json.dumps(d, sort_keys=True)


def stage_lineage(mcfg: ModelConfig, info, sampling: SamplingConfig, stage: str, constitution=None,
                  few_shot: bool = False, system_prompt: str | None = None) -> dict:
    """The lineage columns shared by every row a stage writes (model, sampling, template, constitution).
    `info` is the model's factory.model_info.ModelInfo: row ids hash its `key`, rows show its label."""
    from factory import templates

    lineage = {"model_id": info.label, "model_fingerprint": info.fingerprint, "sampling": sampling_json(sampling),
               "template_hash": templates.fixed_text_hash(mcfg.prompt_format, stage, constitution, few_shot,
                                                          system_prompt)}
    if constitution is not None:
        lineage.update(constitution_id=constitution.id, constitution_version=constitution.version)
    return lineage


def job_seed(seed: int, row: str) -> int:
    return (int(row[:8], 16) ^ seed) & 0x7FFFFFFF


# Punctuation and symbols (ASCII, Latin-1, general punctuation, CJK and full-width forms) become spaces;
# apostrophes are dropped, so "assistant's" stays one word.
_PUNCT = {c: " " for r in ((0x21, 0x80), (0xA1, 0xC0), (0x2000, 0x2070), (0x3000, 0x3040), (0xFF00, 0xFF66))
          for c in range(*r) if unicodedata.category(chr(c))[0] in "PS"}
_PUNCT.update({ord("'"): None, 0x2019: None})


def _words(text: str) -> list[str]:
    """Lower-cased words, punctuation and spacing dropped: str.translate and split, linear and in C."""
    return text.lower().translate(_PUNCT).split()


def _echoes(text: str, request: str, threshold: float = 0.9) -> bool:
    """Whether `text` merely repeats `request`: near-identical (the word multisets' Dice overlap
    2|A&B| / (|A|+|B|) >= 0.9, so one word changed in a 20-word request still counts), or the same opening
    five words without adding much (at most 30% more words; a restated question plus an answer is longer and
    passes). Linear in the two lengths: one translate-and-split pass and, only when the lengths are close
    enough for the overlap to reach the threshold, one Counter intersection."""
    a, b = _words(text), _words(request)
    if not a or not b:
        return a == b
    if a[:5] == b[:5] and len(a) <= 1.3 * len(b):
        return True
    # Dice <= 2 min / (|A|+|B|): texts of very different lengths cannot be near-identical; skip the count.
    if 2 * min(len(a), len(b)) < threshold * (len(a) + len(b)):
        return False
    common = sum((Counter(a) & Counter(b)).values())
    return 2 * common >= threshold * (len(a) + len(b))


def parse_completion(raw: str, clean: Callable[[str], str], allow_empty: bool,
                     echo_of: str | None = None) -> tuple[str, str, str | None]:
    """(text, status, reason): the raw output is always kept; an empty parse or an output that only
    repeats the request it was given (small base models do this) is a recorded failure."""
    text = clean(raw)
    if not text and not allow_empty:
        return text, "failed", "no text left after parsing the model output"
    if text and echo_of and _echoes(text, echo_of):
        return text, "failed", "the output repeats the request instead of answering it"
    return text, "ok", None


def fit_to_context(engine: Engine, batch: list[Job], reserve: int, base: dict, id_col: str, st: StageStats,
                   encode: Callable | None = None) -> tuple[list[dict], list[Job], list[list[int]]]:
    """Encode a batch; jobs whose prompt plus `reserve` new tokens exceed the context become 'skipped' rows
    with the reason and the max_model_len they were skipped under (a run with a larger one tries them again,
    see `Store.pending_ids`), the rest are returned with their token ids."""
    skipped, runnable, ids = [], [], []
    for job in batch:
        tokens = (encode or engine.encode)(job.prompt)
        if len(tokens) + reserve > engine.max_model_len:
            skipped.append({**base, **job.fields, id_col: job.row_id, "status": "skipped", "seed": job.seed,
                            "reason": f"prompt_too_long: {len(tokens)} prompt tokens + {reserve} new tokens > "
                                      f"max_model_len {engine.max_model_len}",
                            "prompt_tokens": len(tokens), "output_tokens": 0, "max_model_len": engine.max_model_len,
                            "created_at": now()})
            st.skipped += 1
        else:
            runnable.append(job)
            ids.append(tokens)
    return skipped, runnable, ids


def write_rows(store: Store, table: str, rows: list[dict], retry: set[str], progress: dict | None = None) -> int:
    """Insert a batch; rows of the ids in `retry` (stored as skipped before) replace the stored row, every
    other id is inserted only if absent. Returns the rows written. `progress` (the stage's run_progress row) is
    written with the batch's last transaction."""
    id_col = ID_COLUMN[table]
    again = [r for r in rows if r[id_col] in retry]
    if not again:
        return store.insert(table, rows, progress=progress)
    added = store.insert(table, [r for r in rows if r[id_col] not in retry])
    store.insert(table, again, replace=True, progress=progress)  # same ids: the count does not grow
    return added + len(again)


def run_model_stage(ctx: Context, *, table: str, stage: str, get_engine: Callable[[], Engine],
                    model_cfg: ModelConfig, sampling: SamplingConfig, stop: list[str], jobs: list[Job],
                    lineage: dict, clean: Callable[[str], str], allow_empty: bool = True) -> None:
    # Pending: rows not stored yet, and rows skipped as too long under a smaller context than this run's.
    missing, retry = ctx.store.pending_ids(table, [j.row_id for j in jobs], model_cfg.max_model_len)
    todo = [j for j in jobs if j.row_id in missing or j.row_id in retry]
    label = f"{stage}" + (f" r{jobs[0].fields['round']}" if jobs and "round" in jobs[0].fields else "")
    if not todo:
        ctx.log(f"{label}: nothing to do ({len(jobs)} rows already stored)")
        return
    ctx.store.release()  # readers may open the store while the engine starts and while it generates
    engine = get_engine()
    st = ctx.stage_stats(stage, lineage["model_id"])
    prog = ctx.start_progress(label, lineage["model_id"], len(todo), len(jobs) - len(todo))
    task = ctx.progress.add_task(label, total=len(todo)) if ctx.progress else None
    base = {"run_id": ctx.run_id, "stage": stage, **lineage, "engine": engine.name,
            "max_model_len": engine.max_model_len}
    i = 0
    while i < len(todo):
        size = ctx.write_batch_size
        if ctx.max_output_tokens is not None:
            left = ctx.max_output_tokens - ctx.tokens_spent()
            if left <= 0:
                raise BudgetExhausted(f"output-token budget of {ctx.max_output_tokens} reached during {label}")
            # Bound the overshoot: a batch may not promise much more than the tokens left.
            size = min(size, max(1, left // sampling.max_tokens))
        batch = todo[i:i + size]
        i += len(batch)
        rows, runnable, ids = fit_to_context(engine, batch, sampling.max_tokens, base, ID_COLUMN[table], st)
        if runnable:
            t0 = time.perf_counter()
            outs = engine.generate(ids, sampling, [j.seed for j in runnable], stop)
            st.seconds += time.perf_counter() - t0
            st.model_calls += 1
            for job, out in zip(runnable, outs):
                reasoning, answer = split_reasoning(out.text)
                text, status, reason = parse_completion(answer, clean, allow_empty, job.echo_of)
                if reasoning is not None and not answer.strip():
                    text, status, reason = "", "failed", "the reasoning trace (<think>) never closed: no answer after it"
                st.failed += status == "failed"
                st.prompt_tokens += out.prompt_tokens
                st.output_tokens += out.output_tokens
                rows.append({**base, **job.fields, ID_COLUMN[table]: job.row_id, "raw_output": out.text,
                             "text": text, "reasoning": reasoning, "status": status, "reason": reason,
                             "finish_reason": out.finish_reason,
                             "prompt_tokens": out.prompt_tokens, "output_tokens": out.output_tokens,
                             "seed": job.seed, "created_at": now()})
        added = write_rows(ctx.store, table, rows, retry, progress=prog.advance(len(batch)))
        st.rows += added
        ctx.log(f"{label}: wrote {added} rows ({i}/{len(todo)})")
        if task is not None:
            ctx.progress.update(task, advance=len(batch))

