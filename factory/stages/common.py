"""What every model stage shares: the stage contract (`StageSpec`: what a stage reads and writes, its input pages
and pending-work query), and `ModelStage`: per page, find pending rows by anti-join, render and encode only those,
keep the page in flight in the engine within the token budget, record prompts that do not fit the context as
skipped, and commit finished rows every `write_batch_size`. A killed stage loses at most the rows in flight; a
finished stage makes no model calls."""

from __future__ import annotations

import json
import time
import unicodedata
from contextlib import closing
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from factory.config import ModelConfig, SamplingConfig
from factory.conversation import split_reasoning
from factory.engines.base import Engine, stream_generate
from factory.store import ID_COLUMN, Store, now


class BudgetExhausted(Exception):
    """The run spent its output-token budget; finished rows are stored and a re-run resumes."""


@dataclass
class Job:
    row_id: str
    prompt: object  # rendered prompt: a string (plain) or chat messages (chat), or a function that renders it
    # (called only if the job is pending: a finished row is never rendered)
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
    reads rows/s and an ETA from it). `wanted`: rows to do, as far as is known (pages not read yet count as
    pending; rows found stored as pages are read are taken off); `stored_before`: its rows found already stored;
    seconds: wall time since the stage started (engine start excluded)."""

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
    write_batch_size: int = 1024
    chunk_size: int = 4096  # input rows read, rendered and kept in flight at a time
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
    """Encode a batch (`encode`: prompts -> token id lists, default `encode_all`); jobs whose prompt plus `reserve` new tokens exceed the context become 'skipped' rows
    with the reason and the max_model_len they were skipped under (a run with a larger one tries them again,
    see `Store.pending_ids`), the rest are returned with their token ids."""
    skipped, runnable, ids = [], [], []
    encoded = encode([j.prompt for j in batch]) if encode else encode_all(engine, [j.prompt for j in batch])
    for job, tokens in zip(batch, encoded):
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


def members(table: str) -> str:
    """SQL: the ids of `table` that run $run wants (its membership, `run_rows`)."""
    return f"SELECT id FROM run_rows WHERE run_id = $run AND tbl = '{table}'"


@dataclass(frozen=True)
class StageSpec:
    """A stage's contract, in one place: the tables it reads and the one it writes, its input (`keys`: SQL giving
    the keys of this run's input rows, columns `id` and `prompt_id`, sorted by prompt id; `rows`: SQL giving the
    rows of one page of keys, registered as `_chunk(id, prompt_id)`, with the page's lowest and highest prompt id
    as $lo and $hi: every stage goes through the prompts in the same order, so each table it writes is laid out by
    prompt id and a page's reads skip the rest of the table, see `factory.store.within`), and its pending work: the ids of the jobs a page makes, anti-joined against `writes`
    (`Store.pending_ids`: not stored yet, or skipped as too long under a smaller context). The store is the only
    hand-off: a stage's input is the run's rows of the table before it (`run_rows`), and it records the ids it
    wants of `writes` there for the next stage. `owns`: (table, SQL predicate over its rows `t`) for each table
    the stage records rows of, where the stage shares a table with another (critique rounds, the two kinds of
    pairs); default: all of `writes` (used to adopt a finished stage's rows, factory/stages/reuse.py)."""

    name: str
    reads: tuple[str, ...]
    writes: str
    keys: str
    rows: str
    owns: tuple[tuple[str, str], ...] = ()

    def pages(self, ctx: "Context", **params):
        """(number of input rows, iterator over pages of them): pages of `ctx.chunk_size` rows, read and rendered
        one at a time, so memory stays flat however many prompts the run has."""
        params = {"run": ctx.run_id, **params}
        keys = ctx.store.input_keys(self.keys, params)
        size = ctx.chunk_size

        def it():
            for start in range(0, keys.num_rows, size):
                yield ctx.store.read_chunk(self.rows, keys.slice(start, size), params)
        return keys.num_rows, it()


def encode_all(engine: Engine, prompts: list) -> list[list[int]]:
    """Token ids of a page of prompts: the engine's batch encoder where it has one (one tokenizer call, a shared
    few-shot prefix tokenized once), else one prompt at a time."""
    batch = getattr(engine, "encode_batch", None)
    return batch(prompts) if batch is not None else [engine.encode(p) for p in prompts]


def prompt_range(jobs: list[Job]) -> tuple[str, str] | None:
    """The lowest and highest prompt id of some jobs (a page's rows are looked up within it), None if unknown."""
    ids = [j.fields.get("prompt_id") for j in jobs]
    return (min(ids), max(ids)) if ids and None not in ids else None


def take_pending(ctx: "Context", table: str, jobs: list[Job], max_model_len: int,
                 prog: "StageProgress | None") -> tuple[list[Job], set[str]]:
    """Record a page's jobs as the run's rows; return its pending jobs (not stored, or skipped as too long under a
    smaller context) and the ids among them to replace. The stage's progress learns what was found stored."""
    ctx.store.add_members(ctx.run_id, table, [j.row_id for j in jobs])
    missing, retry = ctx.store.pending_ids(table, [j.row_id for j in jobs], max_model_len, prompt_range(jobs))
    todo = [j for j in jobs if j.row_id in missing or j.row_id in retry]
    if prog is not None:
        prog.stored_before += len(jobs) - len(todo)
        prog.wanted = max(prog.wanted - (len(jobs) - len(todo)), prog.done + len(todo))
    return todo, retry


def render(jobs: list[Job]) -> None:
    """Render the prompts of pending jobs, only now: a finished row is never rendered."""
    for job in jobs:
        if callable(job.prompt):
            job.prompt = job.prompt()


class ModelStage:
    """One model stage over the pages of its input: finds each page's pending jobs, renders and encodes only
    those, keeps the engine busy with the whole page, and commits finished rows every `write_batch_size`. The
    engine starts at the first pending job (a finished stage starts none); progress goes to `run_progress`."""

    def __init__(self, ctx: Context, *, table: str, stage: str, get_engine: Callable[[], Engine],
                 model_cfg: ModelConfig, sampling: SamplingConfig, stop: list[str], lineage: dict,
                 clean: Callable[[str], str], allow_empty: bool = True, label: str | None = None, expected: int = 0):
        self.ctx, self.table, self.stage, self.get_engine = ctx, table, stage, get_engine
        self.model_cfg, self.sampling, self.stop, self.lineage = model_cfg, sampling, stop, lineage
        self.clean, self.allow_empty, self.label = clean, allow_empty, label or stage
        self.expected, self.seen, self.engine, self.prog, self.task = expected, 0, None, None, None

    def _start(self) -> None:
        ctx = self.ctx
        ctx.store.release()  # readers may open the store while the engine starts and while it generates
        self.engine = self.get_engine()
        self.st = ctx.stage_stats(self.stage, self.lineage["model_id"])  # a stage with nothing to do has no stats
        self.base = {"run_id": ctx.run_id, "stage": self.stage, **self.lineage, "engine": self.engine.name,
                     "max_model_len": self.engine.max_model_len}
        # wanted: the rows still to do, as far as is known (pages not read yet are counted as pending)
        self.prog = ctx.start_progress(self.label, self.lineage["model_id"], max(self.expected - self.seen, 0),
                                       self.seen)
        if ctx.progress:
            self.task = ctx.progress.add_task(self.label, total=max(self.expected - self.seen, 0))

    def run(self, jobs: list[Job]) -> None:
        """Run one page of jobs: record them as the run's rows, then do the pending ones."""
        ctx = self.ctx
        todo, retry = take_pending(ctx, self.table, jobs, self.model_cfg.max_model_len, self.prog)
        self.seen += len(jobs) - len(todo)
        if not todo:
            return
        if self.engine is None:
            self._start()
        render(todo)
        while todo:
            size = len(todo)
            if ctx.max_output_tokens is not None:
                left = ctx.max_output_tokens - ctx.tokens_spent()
                if left <= 0:
                    raise BudgetExhausted(f"output-token budget of {ctx.max_output_tokens} reached during {self.label}")
                # Bound the overshoot: no more requests in flight than the tokens left can pay for.
                size = min(size, max(1, left // self.sampling.max_tokens))
            self._generate(todo[:size], retry)
            todo = todo[size:]

    def _generate(self, todo: list[Job], retry: set[str]) -> None:
        ctx, st, id_col, engine = self.ctx, self.st, ID_COLUMN[self.table], self.engine
        rows, runnable, ids = fit_to_context(engine, todo, self.sampling.max_tokens, self.base, id_col, st)
        if rows:
            self._commit(rows, retry, len(rows))
        if not runnable:
            return
        t0, committing, buffered = time.perf_counter(), 0.0, []
        st.model_calls += 1
        # The whole page in flight: vLLM schedules it continuously and nothing waits for the slowest row of a
        # commit batch. closing(): an error here cancels the requests still in flight.
        with closing(stream_generate(engine, ids, self.sampling, [j.seed for j in runnable], self.stop)) as stream:
            for i, out in stream:
                buffered.append(self._row(runnable[i], out))
                if len(buffered) >= ctx.write_batch_size:  # finished rows are committed as they come
                    c0 = time.perf_counter()
                    self._commit(buffered, retry, len(buffered))
                    committing += time.perf_counter() - c0
                    buffered = []
        c0 = time.perf_counter()
        self._commit(buffered, retry, len(buffered))
        committing += time.perf_counter() - c0
        st.seconds += time.perf_counter() - t0 - committing

    def _row(self, job: Job, out) -> dict:
        st = self.st
        reasoning, answer = split_reasoning(out.text)
        text, status, reason = parse_completion(answer, self.clean, self.allow_empty, job.echo_of)
        if reasoning is not None and not answer.strip():
            text, status, reason = "", "failed", "the reasoning trace (<think>) never closed: no answer after it"
        st.failed += status == "failed"
        st.prompt_tokens += out.prompt_tokens
        st.output_tokens += out.output_tokens
        return {**self.base, **job.fields, ID_COLUMN[self.table]: job.row_id, "raw_output": out.text, "text": text,
                "reasoning": reasoning, "status": status, "reason": reason, "finish_reason": out.finish_reason,
                "prompt_tokens": out.prompt_tokens, "output_tokens": out.output_tokens, "seed": job.seed,
                "created_at": now()}

    def _commit(self, rows: list[dict], retry: set[str], n: int) -> None:
        added = write_rows(self.ctx.store, self.table, rows, retry, progress=self.prog.advance(n))
        self.st.rows += added
        self.ctx.log(f"{self.label}: wrote {added} rows ({self.prog.done}/{self.prog.wanted})")
        if self.task is not None:
            self.ctx.progress.update(self.task, advance=n)

    def finish(self) -> None:
        if self.engine is None:
            self.ctx.log(f"{self.label}: nothing to do ({self.seen} rows already stored)")
        else:
            finish_progress(self.ctx, self.prog)


def finish_progress(ctx: Context, prog: StageProgress) -> None:
    """Every page is read: what was left to do is done (`wanted` was partly an estimate, e.g. the label stage's
    judgments per prompt, which failed responses lower)."""
    prog.wanted = prog.done
    ctx.store.record_progress(prog.row())


def run_model_stage(ctx: Context, *, jobs: list[Job], **kw) -> None:
    """Run one list of jobs through a model stage (`ModelStage`); the stages feed it page by page."""
    stage = ModelStage(ctx, expected=len(jobs), **kw)
    stage.run(jobs)
    stage.finish()
