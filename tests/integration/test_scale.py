"""factory's orchestration at thousands of jobs (issue 11, item 8), with an engine that answers instantly
(tests/instant_engine.py: the real Gemma 3 tokenizer, deterministic outputs). These tests are about factory's
own work, not a model, which is why a scripted engine is allowed here. No test times anything: growth is
checked by counting what the pipeline does (SQL statements, rows fetched into Python, engine calls, prompts
tokenized) at N and 4N prompts.

The pipeline has the quickstart's shape (pipelines/quickstart.yaml: generate, 1 round of critique + revision
with few-shot plain prompts, pairs, logprob labels with 2 principles x both orders) over the synthetic prompts
of benchmarks/scale.py (10-60 words, one in five a multi-turn conversation).

Runtime: the models' info (tokenizer, fingerprint) is loaded once for the module instead of once per run (a
fixed ~5 s per run that says nothing about scale); the rest is the real `run_pipeline`."""

from __future__ import annotations

import functools
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

from instant_engine import InstantEngines
from factory.pipeline import run_pipeline
from factory.store import TABLES, Store

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from benchmarks.scale import pipeline_config, write_prompts  # noqa: E402

pytestmark = pytest.mark.integration

N_BIG = 2400  # (a) and (b): thousands of jobs (2,400 prompts -> 16,800 engine jobs, 28,800 rows)
N_SMALL, BATCH = 96, 32  # (c): N and 4N prompts in batches of 32


@pytest.fixture(scope="module", autouse=True)
def model_info_once():
    """Load each model's info (tokenizer, fingerprint) once for the module: run_pipeline's check_models calls
    factory.pipeline.load_model_info at every run; same config -> same ModelInfo."""
    import factory.pipeline as fp

    real = fp.load_model_info

    @functools.lru_cache(maxsize=None)
    def cached(cfg_json: str, role: str):
        from factory.config import model_config_from_json

        return real(model_config_from_json(cfg_json), role)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fp, "load_model_info", lambda cfg, role: cached(cfg.model_dump_json(), role))
        yield


def _counts(path) -> dict[str, int]:
    with Store.open(path, read_only=True) as s:
        return {t: s.count(t) for t in TABLES}


def _config(tmp: Path, n: int, write_batch_size: int | None = None):
    return pipeline_config(tmp / "scale.duckdb", write_prompts(tmp / "prompts.jsonl", n), write_batch_size)


# ---- counting what the store executes -------------------------------------------------------------------

class Tally:
    """SQL statements the store's connection executed (by their first word) and rows fetched into Python."""

    def __init__(self):
        self.kinds: Counter = Counter()
        self.rows = 0

    @property
    def statements(self) -> int:
        return sum(self.kinds.values())

    def add(self, sql) -> None:
        words = str(sql).split(None, 1)
        self.kinds[words[0].upper() if words else "?"] += 1


class _Result:
    """What execute() returns (a DuckDB connection / relation), counting the rows fetched from it."""

    def __init__(self, res, tally: Tally):
        self._res, self._tally = res, tally

    def _n(self, out):
        if out is None:
            return out
        n = getattr(out, "num_rows", None)
        self._tally.rows += n if n is not None else (len(out) if hasattr(out, "__len__") else 1)
        return out

    def fetchall(self):
        return self._n(self._res.fetchall())

    def fetchmany(self, *a, **kw):
        return self._n(self._res.fetchmany(*a, **kw))

    def fetchone(self):
        row = self._res.fetchone()
        self._tally.rows += row is not None
        return row

    def fetch_arrow_table(self, *a, **kw):
        return self._n(self._res.fetch_arrow_table(*a, **kw))

    def arrow(self, *a, **kw):
        return self._n(self._res.arrow(*a, **kw))

    def fetchdf(self, *a, **kw):
        return self._n(self._res.fetchdf(*a, **kw))

    df = fetch_df = fetchdf

    def __getattr__(self, name):
        return getattr(self._res, name)


class _Con:
    def __init__(self, con, tally: Tally):
        self._con, self._tally = con, tally

    def execute(self, sql, *a, **kw):
        self._tally.add(sql)
        return _Result(self._con.execute(sql, *a, **kw), self._tally)

    def executemany(self, sql, params=(), *a, **kw):  # row by row: each parameter set counts as a statement
        for _ in params:
            self._tally.add(sql)
        return _Result(self._con.executemany(sql, params, *a, **kw), self._tally)

    def sql(self, sql, *a, **kw):
        self._tally.add(sql)
        return _Result(self._con.sql(sql, *a, **kw), self._tally)

    query = sql

    def __getattr__(self, name):
        return getattr(self._con, name)


@pytest.fixture
def tally(monkeypatch) -> Tally:
    """Counts every statement run through `Store.con` (Store.run_sql, Store.query and any direct use)."""
    t = Tally()
    real = Store.con
    monkeypatch.setattr(Store, "con", property(lambda self: _Con(real.fget(self), t)))
    return t


# ---- the instant engine itself ------------------------------------------------------------------------

def test_instant_engine_batch_and_stream_agree_with_the_one_at_a_time_methods():
    from factory.config import SamplingConfig

    engine = InstantEngines().getter(pipeline_config(Path("s.duckdb"), Path("p.jsonl")).models.policy)()
    # (the shipped base model has no chat template: plain prompts, as the quickstart's prompt_format renders them)
    prompts = ["Human: hi there\n\nAssistant:", "Human: hello\n\nAssistant: hi\n\nHuman: bye", "Explain rain.", "x"]
    ids = [engine.encode(p) for p in prompts]
    assert engine.encode_batch(prompts) == ids
    assert all(i[0] == engine.tokenizer.bos_token_id and i.count(engine.tokenizer.bos_token_id) == 1 for i in ids)
    sampling = SamplingConfig(max_tokens=64)
    outs = engine.generate(ids, sampling, [0] * 4, [])
    assert len({o.text for o in outs}) == 4 and all(o.prompt_tokens == len(i) for o, i in zip(outs, ids))
    streamed = dict(engine.generate_stream(ids, sampling, [0] * 4, []))
    assert sorted(streamed) == [0, 1, 2, 3] and [streamed[k] for k in range(4)] == outs
    short = engine.generate(ids, SamplingConfig(max_tokens=3), [0] * 4, [])
    assert all(o.output_tokens <= 3 and o.finish_reason == "length" for o in short)
    lp = engine.score_next_token(ids, [10, 11])
    assert lp == engine.score_next_token(ids, [10, 11]) and all(len(x) == 2 and max(x) < 0 for x in lp)


# ---- (a) and (b): thousands of jobs ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def big_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scale")
    cfg = _config(tmp, N_BIG)
    engines = InstantEngines()
    result = run_pipeline(cfg, engines=engines)
    return cfg, result, engines


def test_thousands_of_prompts_complete_with_the_row_counts_the_config_implies(big_run):
    cfg, result, engines = big_run
    assert result.status == "completed", result.message
    c = _counts(cfg.store)
    n = N_BIG
    with Store.open(cfg.store, read_only=True) as s:
        def one(sql):
            return s.query(sql)[0]["n"]

        ok_responses = one("SELECT count(*) AS n FROM responses WHERE status = 'ok' AND length(trim(text)) > 0")
        ok_critiques = one("SELECT count(*) AS n FROM critiques WHERE status = 'ok'")
        ok_revisions = one("SELECT count(*) AS n FROM revisions WHERE status = 'ok'")
        judged = one("SELECT count(DISTINCT (candidate_x, candidate_y)) AS n FROM judgments")
        sources = {r["source"]: r["n"] for r in s.query(
            "SELECT source, count(*) AS n FROM preference_pairs GROUP BY source")}
        ai = {r["reason"]: r["n"] for r in s.query(
            "SELECT coalesce(dropped_reason, 'kept') AS reason, count(*) AS n FROM preference_pairs "
            "WHERE source = 'ai_feedback' GROUP BY 1")}
        chosen = {r["chosen_stage"]: r["n"] for r in s.query(
            "SELECT chosen_stage, count(*) AS n FROM preference_pairs WHERE source = 'ai_feedback' "
            "AND dropped_reason IS NULL GROUP BY 1")}
        statuses = {t: {r["status"] for r in s.query(f"SELECT DISTINCT status FROM {t}")}
                    for t in ("responses", "critiques", "revisions", "judgments")}
        conversations = one("SELECT count(*) AS n FROM prompts WHERE messages IS NOT NULL")
    # The instant engine answers every prompt with a distinct, non-echo text: every row is 'ok'.
    assert statuses == {t: {"ok"} for t in statuses}
    assert conversations == n // 5
    samples, ppr, ppc = cfg.generate.samples_per_prompt, cfg.critique.principles_per_round, cfg.label.principles_per_comparison
    assert c["prompts"] == n
    assert c["responses"] == n * samples
    assert c["critiques"] == ok_responses * ppr == n * samples * ppr
    assert c["revisions"] == ok_critiques == n * samples * ppr
    # One final-round pair per ok revision, one AI-feedback pair per candidate (response, revision).
    assert sources == {"final_vs_initial": ok_revisions, "ai_feedback": ok_revisions}
    assert judged == ok_revisions  # no candidate had identical or empty texts
    assert c["judgments"] == 2 * ppc * judged
    assert c["comparisons"] == ppc * judged
    assert c["preference_pairs"] == 2 * ok_revisions
    # The labels vary: ties are dropped, and either side wins some of the time.
    assert set(ai) == {"kept", "tie"} and ai["tie"] < ai["kept"]
    assert chosen.get("revision", 0) > 0 and chosen.get("response", 0) > 0
    # Engine work: each job's prompt is sent once, and a stage asked for its engine once.
    jobs = c["responses"] + c["critiques"] + c["revisions"] + c["judgments"]
    assert engines.prompts_handled == jobs
    assert engines.gets == 4


def test_noop_rerun_of_thousands_makes_no_engine_calls_and_writes_no_rows(big_run):
    cfg, first, _ = big_run
    before = _counts(cfg.store)
    with Store.open(cfg.store, read_only=True) as s:
        pairs_before = s.query("SELECT * EXCLUDE (run_id, created_at) FROM preference_pairs ORDER BY pair_id")
    engines = InstantEngines()
    again = run_pipeline(cfg, engines=engines)
    assert again.status == "completed"
    assert engines.gets == 0 and engines.model_calls == 0 and not engines.engines
    assert again.stats == {}
    assert _counts(cfg.store) == before
    assert again.scope_counts == first.scope_counts
    with Store.open(cfg.store, read_only=True) as s:
        assert s.query("SELECT * EXCLUDE (run_id, created_at) FROM preference_pairs ORDER BY pair_id") == pairs_before


# ---- (c): orchestration grows with batches, not with jobs squared ---------------------------------------

def _measured_run(tmp: Path, n: int, tally: Tally) -> dict:
    cfg = _config(tmp, n, BATCH)
    engines = InstantEngines()
    s0, r0 = tally.statements, tally.rows
    result = run_pipeline(cfg, engines=engines)
    assert result.status == "completed", result.message
    statements, rows = tally.statements - s0, tally.rows - r0
    c = _counts(cfg.store)
    jobs = {"generate": c["responses"], "critique": c["critiques"], "revise": c["revisions"],
            "label": c["judgments"]}
    s1 = tally.statements
    noop = InstantEngines()
    assert run_pipeline(cfg, engines=noop).status == "completed"
    assert noop.model_calls == 0
    calls = engines.calls
    return {"statements": statements, "rows": rows, "jobs": sum(jobs.values()),
            "batches": sum(math.ceil(j / BATCH) for j in jobs.values()), "model_calls": engines.model_calls,
            "prompts": engines.prompts_handled, "encoded": calls["encode"] + engines_items(engines, "encode_batch")
            + engines_items(engines, "encode_segments"),
            "noop_statements": tally.statements - s1}


def engines_items(engines: InstantEngines, method: str) -> int:
    return sum(e.items[method] for e in engines.engines.values())


def test_statements_and_engine_calls_grow_with_batches_not_jobs(tmp_path, tally):
    """At N and 4N prompts in batches of 32: every count grows at most linearly (4N costs at most 4x; a query
    per batch per already-written batch, i.e. quadratic, would cost ~16x), and the statements added per added
    batch stay under BATCH / 2 = 16 (today a batch costs ~6: BEGIN, count, INSERT, run_progress, COMMIT,
    count), while one statement per job would add at least BATCH = 32 per batch. Rows fetched into Python grow
    linearly (a stage re-reading its table per batch would be quadratic). The engine is called once per batch
    at most (never per job), gets each job's prompt exactly once, and each prompt is tokenized exactly once.
    A no-op re-run costs the same number of statements at N and 4N (one pending query per stage)."""
    (tmp_path / "n").mkdir()
    (tmp_path / "4n").mkdir()
    a = _measured_run(tmp_path / "n", N_SMALL, tally)
    b = _measured_run(tmp_path / "4n", 4 * N_SMALL, tally)
    info = f"N: {a}\n4N: {b}\nstatements by kind: {dict(tally.kinds)}"
    assert b["jobs"] == 4 * a["jobs"], info
    # Linear, not quadratic.
    for key in ("statements", "rows", "model_calls"):
        assert b[key] <= 4 * a[key], f"{key} grew more than 4x for 4x the prompts\n{info}"
    # Per batch, not per job.
    per_added_batch = (b["statements"] - a["statements"]) / (b["batches"] - a["batches"])
    assert per_added_batch <= BATCH / 2, f"{per_added_batch:.1f} statements per added batch of {BATCH}\n{info}"
    for run in (a, b):
        assert run["model_calls"] <= run["batches"], info  # generate / score calls: one per batch at most
        assert run["prompts"] == run["jobs"], info  # every job's prompt went to the engine once
        assert run["encoded"] == run["jobs"], info  # and was tokenized once
    # Rows fetched into Python: at most a few per job (the pending ids, the parents, the candidates ...).
    assert b["rows"] <= 8 * b["jobs"], info
    # A no-op re-run: a fixed number of statements, whatever N.
    assert b["noop_statements"] == a["noop_statements"], info


def test_noop_rerun_rewrites_no_rows(tmp_path):
    cfg = _config(tmp_path, 50)
    first = run_pipeline(cfg, engines=InstantEngines())
    run_pipeline(cfg, engines=InstantEngines())
    with Store.open(cfg.store, read_only=True) as s:
        for table in TABLES:
            runs = {r["run_id"] for r in s.query(f"SELECT DISTINCT run_id FROM {table}")}
            assert runs == {first.run_id}, f"{table}: rows rewritten by the no-op re-run"
