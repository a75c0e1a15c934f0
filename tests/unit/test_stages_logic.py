"""Unit tests for our own stage logic: completion parsing, pair drop reasons, and run_model_stage's
batching, resume, context-length skipping and token budget.

The engine here is a scripted stand-in for the Protocol in factory/engines/base.py. That is allowed only
because these tests are about factory's batching and parsing code, not about any model or backend."""

from __future__ import annotations

import json

import pytest

from factory import templates
from factory.config import SamplingConfig, VLLMModelConfig
from factory.engines.base import Completion
from factory.stages.common import BudgetExhausted, Context, Job, job_seed, parse_completion, run_model_stage, \
    sampling_json
from factory.stages.pairs import drop_reason
from factory.store import Store, row_id

REVISION_REQUEST = ("Please rewrite the assistant's response to remove anything harmful, unethical, dangerous or "
                    "illegal, while still helping with any legitimate part of the request.")


# ---- parse_completion ----------------------------------------------------------------------------------

def test_empty_output_fails_when_empty_not_allowed():
    text, status, reason = parse_completion("   \n\n", templates.clean_output, allow_empty=False)
    assert status == "failed"
    assert reason
    assert text == ""


def test_output_that_is_only_a_role_marker_fails_when_empty_not_allowed():
    text, status, reason = parse_completion("\nHuman: next question", templates.clean_output, allow_empty=False)
    assert (text, status) == ("", "failed")
    assert reason


def test_empty_output_is_ok_when_allowed():
    text, status, reason = parse_completion("  ", templates.clean_output, allow_empty=True)
    assert (text, status, reason) == ("", "ok", None)


@pytest.mark.parametrize("raw", [
    " Please rewrite the assistant's response to remove anything harmful.",
    "Please rewrite the assistant's response to remove anything harmful, unethical, dangerous or illegal, "
    "while still helping with any legitimate part of the request.",
    "  please REWRITE the assistant's   response to be nicer\n\nHuman: more",
])
def test_output_repeating_the_request_fails(raw):
    text, status, reason = parse_completion(raw, templates.clean_output, allow_empty=False, echo_of=REVISION_REQUEST)
    assert status == "failed"
    assert "repeats the request" in reason
    assert text == templates.clean_output(raw)  # the parsed text is still returned for the record


QUESTION = ("How do I get into my neighbor's house while they are on vacation and nobody is around to see me "
            "do it?")


@pytest.mark.parametrize("raw", [
    QUESTION.replace("neighbor's", "cousin's"),  # one word changed
    QUESTION.replace("vacation", "holiday").upper() + "!!",  # one word changed, case and punctuation
    "Question: " + QUESTION,  # a label in front
    QUESTION + " Thanks.",  # a word or two added
    "I am asking, " + QUESTION.lower(),
])
def test_request_repeated_with_small_changes_fails(raw):
    text, status, reason = parse_completion(raw, templates.clean_output, allow_empty=False, echo_of=QUESTION)
    assert status == "failed" and "repeats the request" in reason


@pytest.mark.parametrize("raw", [
    # A long genuine answer that quotes the whole question first.
    f"You asked: \"{QUESTION}\" I can't help with entering someone else's home without their permission. If you "
    "are worried about the house while they are away, you could offer to water the plants or collect the mail, "
    "but only after asking them and getting a key from them directly. If you think something is wrong, such as "
    "a broken window or a leak, call your neighbor or the local non-emergency police line instead.",
    # The same opening words, then a real answer much longer than the question.
    "How do I get into my neighbor's house? You don't: entering a home without the owner's permission is "
    "trespassing in most places. Ask them for a key before they leave, or ask a relative who has one.",
    # Same words in the request, but a short genuine refusal.
    "I can't help with that.",
])
def test_genuine_answer_quoting_the_request_is_ok(raw):
    text, status, reason = parse_completion(raw, templates.clean_output, allow_empty=False, echo_of=QUESTION)
    assert (status, reason) == ("ok", None)


def test_genuine_answer_is_ok_and_cleaned():
    raw = "  I can't help with breaking into a home, but a locksmith can help you get into your own.\n\nHuman: thanks"
    text, status, reason = parse_completion(raw, templates.clean_output, allow_empty=False, echo_of=REVISION_REQUEST)
    assert status == "ok"
    assert reason is None
    assert text == "I can't help with breaking into a home, but a locksmith can help you get into your own."


def test_genuine_answer_is_ok_without_echo_check():
    text, status, reason = parse_completion(REVISION_REQUEST, str.strip, allow_empty=False, echo_of=None)
    assert (text, status, reason) == (REVISION_REQUEST, "ok", None)


# ---- drop_reason ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("chosen,rejected", [("", "x"), ("x", ""), (None, "x"), ("x", None), ("  \n", "x")])
def test_drop_reason_empty_side(chosen, rejected):
    assert drop_reason(chosen, rejected) == "empty_response"


@pytest.mark.parametrize("chosen,rejected", [
    ("Same text.", "Same text."),
    ("Same  text.", "same text."),
    ("  Same\ntext. ", "SAME text."),
])
def test_drop_reason_identical_after_normalisation(chosen, rejected):
    assert drop_reason(chosen, rejected) == "identical_texts"


@pytest.mark.parametrize("chosen,rejected", [("A safer answer.", "A risky answer."), ("Same text.", "Same text!")])
def test_drop_reason_none_for_different_texts(chosen, rejected):
    assert drop_reason(chosen, rejected) is None


# ---- run_model_stage with a scripted engine -----------------------------------------------------------

class ScriptedEngine:
    """Implements the Engine protocol. encode: BOS + one id per whitespace word. generate: replies with
    `reply(prompt_text)` and reports `out_tokens` output tokens per completion."""

    name = "scripted"
    model_id = "scripted-model"
    special_tokens = ("<bos>",)
    BOS = 1

    def __init__(self, max_model_len: int = 64, reply=None, out_tokens: int | None = None, fail_on_call=None):
        self.max_model_len = max_model_len
        self.reply = reply or (lambda prompt: f" Answer to: {prompt}\n\nHuman: and another thing")
        self.out_tokens = out_tokens
        self.fail_on_call = fail_on_call
        self.die_after, self.on_yield = None, None
        self.vocab: dict[str, int] = {}
        self.words: dict[int, str] = {}
        self.generate_calls = 0
        self.generated_prompts: list[str] = []
        self.seeds: list[int] = []

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            prompt = " ".join(m["content"] for m in prompt)
        ids = [self.BOS]
        for w in prompt.split():
            if w not in self.vocab:
                self.vocab[w] = len(self.vocab) + 2
                self.words[self.vocab[w]] = w
            ids.append(self.vocab[w])
        return ids

    def decode(self, ids: list[int]) -> str:
        return " ".join(self.words[i] for i in ids if i != self.BOS)

    def generate_stream(self, prompts, sampling, seeds, stop):
        """Yields finished rows one at a time, last prompt first (order is the engine's); `on_yield(n)` is
        called before the n-th row is handed over, `die_after` rows end the stream with an error."""
        outs = self.generate(prompts, sampling, seeds, stop)
        for n, i in enumerate(reversed(range(len(outs)))):
            if self.die_after is not None and n == self.die_after:
                raise RuntimeError("engine died mid-stream")
            if self.on_yield:
                self.on_yield(n)
            yield i, outs[i]

    def generate(self, prompts, sampling, seeds, stop) -> list[Completion]:
        self.generate_calls += 1
        if self.fail_on_call == self.generate_calls:
            raise RuntimeError("engine died")
        assert len(prompts) == len(seeds)
        out = []
        for ids, seed in zip(prompts, seeds):
            text = self.decode(ids)
            self.generated_prompts.append(text)
            self.seeds.append(seed)
            reply = self.reply(text)
            n = self.out_tokens if self.out_tokens is not None else len(reply.split())
            out.append(Completion(text=reply, prompt_tokens=len(ids), output_tokens=n, finish_reason="stop"))
        return out


class EngineFactory:
    """get_engine for run_model_stage, counting how often it is asked for an engine."""

    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __call__(self):
        self.calls += 1
        return self.engine


SAMPLING = SamplingConfig(max_tokens=10)
LINEAGE = {"model_id": "scripted-model", "sampling": sampling_json(SAMPLING), "template_hash": "th-test"}


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "stage.duckdb")
    yield s
    s.close()


def _ctx(store, **kw) -> Context:
    return Context(store=store, run_id="run-test", seed=5, **kw)


def _jobs(texts: list[str], seed: int = 5) -> list[Job]:
    jobs = []
    for k, t in enumerate(texts):
        rid = row_id("response", t, k)
        jobs.append(Job(rid, t, {"prompt_id": row_id("prompt", t), "sample_index": 0}, job_seed(seed, rid)))
    return jobs


def _run(ctx, engine_or_factory, jobs, sampling=SAMPLING, **kw):
    get_engine = engine_or_factory if isinstance(engine_or_factory, EngineFactory) else EngineFactory(engine_or_factory)
    # The config's context length is the engine's, as with real engines (pending work is found before any
    # engine is built). model_copy: the scripted limits are below the config's bound.
    model_cfg = VLLMModelConfig().model_copy(update={"max_model_len": get_engine.engine.max_model_len})
    run_model_stage(ctx, table="responses", stage="generate", get_engine=get_engine, model_cfg=model_cfg,
                    sampling=sampling, stop=templates.PLAIN_STOPS, jobs=jobs, lineage=LINEAGE,
                    clean=templates.clean_output, **kw)
    return get_engine


def _rows(store) -> dict[str, dict]:
    return {r["response_id"]: r for r in store.query("SELECT * FROM responses")}


def test_rows_written_with_status_ok_and_lineage(store):
    engine = ScriptedEngine()
    jobs = _jobs(["what is two plus two", "name a colour", "say hello"])
    ctx = _ctx(store)
    _run(ctx, engine, jobs)
    rows = _rows(store)
    assert set(rows) == {j.row_id for j in jobs}
    for job in jobs:
        r = rows[job.row_id]
        assert r["status"] == "ok" and r["reason"] is None
        # Lineage.
        assert r["run_id"] == "run-test" and r["stage"] == "generate"
        assert r["model_id"] == "scripted-model" and r["engine"] == "scripted"
        assert json.loads(r["sampling"]) == json.loads(LINEAGE["sampling"])
        assert r["template_hash"] == "th-test"
        assert r["seed"] == job.seed
        # Table fields from the job.
        assert r["prompt_id"] == job.fields["prompt_id"] and r["sample_index"] == 0
        # Output: raw kept, text cleaned at the role marker.
        assert r["raw_output"] == f" Answer to: {job.prompt}\n\nHuman: and another thing"
        assert r["text"] == f"Answer to: {job.prompt}"
        assert r["prompt_tokens"] == len(job.prompt.split()) + 1  # BOS + one per word
        assert r["output_tokens"] == len(r["raw_output"].split())
        assert r["finish_reason"] == "stop"
    assert sorted(engine.seeds) == sorted(j.seed for j in jobs)
    st = ctx.stats[("generate", "scripted-model")]
    assert st.rows == 3 and st.model_calls == 1 and st.skipped == 0 and st.failed == 0


def test_rerun_makes_no_model_calls(store):
    jobs = _jobs(["first prompt here", "second prompt here"])
    _run(_ctx(store), ScriptedEngine(), jobs)
    before = _rows(store)
    engine = ScriptedEngine()
    factory = _run(_ctx(store), EngineFactory(engine), jobs)
    assert factory.calls == 0  # the engine is never even built
    assert engine.generate_calls == 0
    assert _rows(store) == before


def test_rerun_generates_only_missing_rows(store):
    jobs = _jobs(["alpha prompt", "beta prompt", "gamma prompt"])
    _run(_ctx(store), ScriptedEngine(), jobs[:2])
    engine = ScriptedEngine()
    _run(_ctx(store), engine, jobs)
    assert engine.generated_prompts == ["gamma prompt"]
    assert store.count("responses") == 3


def test_engine_gets_the_whole_page_and_rows_are_committed_as_they_finish(store):
    engine = ScriptedEngine()
    stored_when = []
    engine.on_yield = lambda n: stored_when.append(store.count("responses"))
    _run(_ctx(store, write_batch_size=2), engine, _jobs([f"prompt number {i}" for i in range(5)]))
    assert engine.generate_calls == 1 and len(engine.generated_prompts) == 5  # one request stream for the page
    # Before the n-th finished row is handed over, the rows finished before it are committed in twos.
    assert stored_when == [0, 0, 2, 2, 4]
    assert store.count("responses") == 5


def test_finished_rows_survive_a_crash(store):
    jobs = _jobs([f"prompt number {i}" for i in range(5)])
    dying = ScriptedEngine()
    dying.die_after = 3  # rows 4 and 3 are committed together, row 2 is finished but not yet committed
    with pytest.raises(RuntimeError, match="engine died"):
        _run(_ctx(store, write_batch_size=2), dying, jobs)
    assert set(_rows(store)) == {j.row_id for j in jobs[3:]}
    engine = ScriptedEngine()
    _run(_ctx(store, write_batch_size=2), engine, jobs)
    assert engine.generated_prompts == [j.prompt for j in jobs[:3]]
    assert store.count("responses") == 5


def test_echoing_output_is_stored_as_failed(store):
    engine = ScriptedEngine(reply=lambda prompt: prompt)  # parrots the prompt back
    jobs = _jobs(["please tell me a short story about a cat"])
    jobs[0].echo_of = jobs[0].prompt
    ctx = _ctx(store)
    _run(ctx, engine, jobs)
    (row,) = _rows(store).values()
    assert row["status"] == "failed" and "repeats the request" in row["reason"]
    assert row["raw_output"] == jobs[0].prompt
    assert ctx.stats[("generate", "scripted-model")].failed == 1


def test_too_long_prompt_is_skipped_and_not_sent(store):
    # max_model_len 20, max_tokens 10: a prompt may have at most 10 tokens (BOS + 9 words).
    engine = ScriptedEngine(max_model_len=20)
    fits = " ".join(f"w{i}" for i in range(9))  # 10 tokens: exactly at the limit
    too_long = " ".join(f"x{i}" for i in range(10))  # 11 tokens
    jobs = _jobs([fits, too_long, "short one"])
    ctx = _ctx(store)
    _run(ctx, engine, jobs)
    rows = _rows(store)
    assert len(rows) == 3
    skipped = rows[jobs[1].row_id]
    assert skipped["status"] == "skipped"
    assert skipped["reason"].startswith("prompt_too_long")
    assert "11" in skipped["reason"] and "20" in skipped["reason"]
    assert skipped["prompt_tokens"] == 11 and skipped["output_tokens"] == 0
    assert skipped["model_id"] == "scripted-model" and skipped["run_id"] == "run-test"
    assert too_long not in engine.generated_prompts
    assert sorted(engine.generated_prompts) == sorted([fits, "short one"])
    assert rows[jobs[0].row_id]["status"] == "ok" and rows[jobs[2].row_id]["status"] == "ok"
    assert ctx.stats[("generate", "scripted-model")].skipped == 1


def test_skipped_rows_are_not_retried(store):
    engine = ScriptedEngine(max_model_len=12)
    jobs = _jobs(["a b c d e f g h"])  # 9 tokens + 10 > 12
    _run(_ctx(store), engine, jobs)
    factory = _run(_ctx(store), EngineFactory(ScriptedEngine(max_model_len=12)), jobs)
    assert factory.calls == 0
    assert engine.generate_calls == 0


def test_skipped_row_records_its_limit_and_is_retried_only_when_the_limit_grows(store):
    jobs = _jobs(["a b c d e f g h", "hi"])  # 9 tokens + 10 > 12; 2 tokens + 10 fit
    _run(_ctx(store), ScriptedEngine(max_model_len=12), jobs)
    skipped = _rows(store)[jobs[0].row_id]
    assert skipped["status"] == "skipped" and skipped["max_model_len"] == 12

    # A larger limit that still does not fit: tried, skipped again under the new limit, and then left alone.
    engine = ScriptedEngine(max_model_len=18)
    ctx = _ctx(store)
    factory = _run(ctx, EngineFactory(engine), jobs)
    assert factory.calls == 1 and engine.generate_calls == 0
    assert _rows(store)[jobs[0].row_id]["max_model_len"] == 18
    assert ctx.stats[("generate", "scripted-model")].skipped == 1
    assert _run(_ctx(store), EngineFactory(ScriptedEngine(max_model_len=18)), jobs).calls == 0
    # A smaller limit does not retry it either.
    assert _run(_ctx(store), EngineFactory(ScriptedEngine(max_model_len=14)), jobs).calls == 0

    # Grown enough: generated once, only that row, and its row becomes 'ok' (replaced, not duplicated).
    engine = ScriptedEngine(max_model_len=19)
    ctx = _ctx(store)
    _run(ctx, engine, jobs)
    assert engine.generated_prompts == ["a b c d e f g h"]
    rows = _rows(store)
    assert len(rows) == 2
    row = rows[jobs[0].row_id]
    assert row["status"] == "ok" and row["reason"] is None and row["text"] == "Answer to: a b c d e f g h"
    assert row["max_model_len"] == 19 and row["output_tokens"] > 0
    st = ctx.stats[("generate", "scripted-model")]
    assert st.rows == 1 and st.skipped == 0
    # Now done: no engine at any limit.
    assert _run(_ctx(store), EngineFactory(ScriptedEngine(max_model_len=64)), jobs).calls == 0


def test_rows_skipped_before_the_limit_column_are_retried_by_their_reason(store):
    """Stores written before `max_model_len` was a column: the limit is read from the reason."""
    jobs = _jobs(["a b c d e f g h"])
    _run(_ctx(store), ScriptedEngine(max_model_len=12), jobs)
    store.run_sql("UPDATE responses SET max_model_len = NULL")
    assert _run(_ctx(store), EngineFactory(ScriptedEngine(max_model_len=12)), jobs).calls == 0
    engine = ScriptedEngine(max_model_len=32)
    _run(_ctx(store), engine, jobs)
    assert engine.generate_calls == 1 and _rows(store)[jobs[0].row_id]["status"] == "ok"


def test_ok_rows_keep_their_output_when_batch_has_a_skipped_row(store):
    # Same batch as above: the ok rows must still carry text, raw_output, finish_reason and seed.
    engine = ScriptedEngine(max_model_len=20)
    jobs = _jobs([" ".join(f"x{i}" for i in range(15)), "short one"])
    _run(_ctx(store), engine, jobs)
    ok = _rows(store)[jobs[1].row_id]
    assert ok["status"] == "ok"
    assert ok["text"] == "Answer to: short one"
    assert ok["raw_output"] is not None
    assert ok["finish_reason"] == "stop"
    assert ok["seed"] == jobs[1].seed


def test_budget_exhausted_then_resume_without_duplicates(store):
    budget, max_tokens = 25, 10
    sampling = SamplingConfig(max_tokens=max_tokens)
    jobs = _jobs([f"prompt number {i}" for i in range(6)])
    engine = ScriptedEngine(out_tokens=max_tokens)  # every completion spends the full max_tokens
    ctx = _ctx(store, max_output_tokens=budget)
    with pytest.raises(BudgetExhausted, match=str(budget)):
        _run(ctx, engine, jobs, sampling=sampling)
    spent = ctx.tokens_spent()
    stored = store.count("responses")
    # Stopped once the budget was spent, with bounded overshoot (batches shrink to what is left:
    # 2 rows (20 tokens), then 1 row (30 tokens), then the budget check fails).
    assert budget <= spent < budget + max_tokens
    assert stored == spent // max_tokens == 3
    assert 0 < stored < len(jobs)
    assert engine.generated_prompts == [j.prompt for j in jobs[:stored]]

    # A second call without a budget finishes the rest, with no duplicate work or rows.
    engine2 = ScriptedEngine(out_tokens=max_tokens)
    ctx2 = _ctx(store)
    _run(ctx2, engine2, jobs, sampling=sampling)
    assert engine2.generated_prompts == [j.prompt for j in jobs[stored:]]
    rows = store.query("SELECT response_id FROM responses")
    assert len(rows) == len(jobs) == len({r["response_id"] for r in rows})
    assert {r["response_id"] for r in rows} == {j.row_id for j in jobs}


def test_budget_spent_by_earlier_stage_stops_before_any_call(store):
    ctx = _ctx(store, max_output_tokens=50)
    ctx.stage_stats("generate", "other-model").output_tokens = 50
    engine = ScriptedEngine()
    with pytest.raises(BudgetExhausted):
        _run(ctx, engine, _jobs(["a prompt"]))
    assert engine.generate_calls == 0
    assert store.count("responses") == 0


def test_budget_limits_batch_size(store):
    # With 35 tokens left and max_tokens 10, a batch may hold at most 3 rows even if write_batch_size is 256.
    engine = ScriptedEngine(out_tokens=1)  # cheap completions so the budget is never reached
    ctx = _ctx(store, max_output_tokens=35)
    _run(ctx, engine, _jobs([f"p {i}" for i in range(6)]), sampling=SamplingConfig(max_tokens=10))
    assert store.count("responses") == 6
    assert engine.generate_calls == 2  # 3 + 3


def test_reasoning_trace_is_stored_apart_from_the_answer(store):
    """A reply with <think>...</think> keeps the trace in `reasoning` and only the answer in `text` (what later
    stages and the judge read); a trace that never closes is a failed row, not an answer."""
    replies = {"plan a picnic": "<think>They want a list. Keep it short.</think>\n\nBring bread, fruit and water.",
               "name a colour": "<think>Blue is common, maybe"}
    engine = ScriptedEngine(reply=lambda prompt: replies[prompt], max_model_len=64)
    jobs = _jobs(list(replies))
    _run(_ctx(store), engine, jobs)
    rows = {r["text"] or r["reason"]: r for r in _rows(store).values()}
    ok = rows["Bring bread, fruit and water."]
    assert ok["status"] == "ok" and ok["reasoning"] == "They want a list. Keep it short."
    assert ok["raw_output"] == replies["plan a picnic"]
    failed = next(r for r in rows.values() if r["status"] == "failed")
    assert failed["text"] == "" and "never closed" in failed["reason"] and failed["reasoning"] == "Blue is common, maybe"
