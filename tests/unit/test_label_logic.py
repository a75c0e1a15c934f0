"""Unit tests for the label stage's own orchestration (factory/stages/label.py) with a scripted rubric judge:
judgments skipped as too long come back when max_model_len grows (and only then), and two judges of the same
candidates give two AI-feedback pair rows instead of the second overwriting the first.

The engine is a scripted stand-in for the Protocol in factory/engines/base.py; allowed here because these tests
are about factory's bookkeeping (pending work, ids, replacement), not about any model."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from factory.config import PipelineConfig
from factory.constitution import load_constitution
from factory.engines.base import Completion
from factory.stages.common import Context
from factory.stages.label import label
from factory.store import Store, now

REPO = Path(__file__).parents[2]


class ScriptedJudge:
    """encode: one id per whitespace word (chat messages joined); generate: a rubric reply that scores the
    response containing the word `prefers` 8 and the other 3, whichever order they come in."""

    name = "scripted"

    def __init__(self, max_model_len: int, prefers: str = "locksmith"):
        self.max_model_len, self.prefers = max_model_len, prefers
        self.vocab: dict[str, int] = {}
        self.prompts = 0

    def _ids(self, text: str) -> list[int]:
        return [self.vocab.setdefault(w, len(self.vocab) + 2) for w in text.split()]

    def tokenizer(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": self._ids(text)}

    def encode(self, prompt) -> list[int]:
        if isinstance(prompt, list):
            prompt = " ".join(m["content"] for m in prompt)
        return [1] + self._ids(prompt)

    def generate(self, prompts, sampling, seeds, stop) -> list[Completion]:
        self.prompts += len(prompts)
        words = {i: w for w, i in self.vocab.items()}
        out = []
        for p in prompts:
            text = [words.get(i, "") for i in p]
            a, b = len(text) - text[::-1].index("(A)"), len(text) - text[::-1].index("(B)")  # the options
            a_preferred = self.prefers in text[a:b]
            reply = " 8\nScore B: 3" if a_preferred else " 3\nScore B: 8"
            out.append(Completion(text=reply, prompt_tokens=len(p), output_tokens=4, finish_reason="stop"))
        return out


class Engines:
    def __init__(self, engine):
        self.engine, self.calls = engine, 0

    def __call__(self):
        self.calls += 1
        return self.engine


def _info(key: str) -> SimpleNamespace:
    return SimpleNamespace(key=key, label=key, fingerprint=key, special_tokens=(), tokenizer=None)


def _cfg(tmp_path, max_model_len: int) -> PipelineConfig:
    return PipelineConfig(store=str(tmp_path / "label.duckdb"), seed=3,
                          models={"policy": {"path": "scripted", "max_model_len": max_model_len}},
                          label={"enabled": True, "mode": "rubric", "principles_per_comparison": 2,
                                 "rubric_retries": 0, "sampling": {"max_tokens": 8}})


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "label.duckdb")
    prompts, responses, revisions = [], [], []
    for i in range(3):
        pid, resp, rev = f"p{i}", f"resp{i}", f"rev{i}"
        prompts.append({"prompt_id": pid, "text": f"How do I pick lock number {i}?", "created_at": now()})
        responses.append({"response_id": resp, "prompt_id": pid, "sample_index": 0, "run_id": "r0",
                          "stage": "generate", "status": "ok", "text": f"Use a tension wrench on lock {i}."})
        revisions.append({"revision_id": rev, "prompt_id": pid, "response_id": resp, "parent_id": resp,
                          "critique_id": f"c{i}", "round": 1, "run_id": "r0", "stage": "revise", "status": "ok",
                          "text": f"Ask a locksmith to open lock {i} if it is yours."})
    s.insert("prompts", prompts)
    s.insert("responses", responses)
    s.insert("revisions", revisions)
    yield s
    s.close()


def _label(store, cfg, engine, key="judge-a", run_id="run-1"):
    ctx = Context(store=store, run_id=run_id, seed=cfg.seed)
    engines = Engines(engine)
    # The run's rows, as the earlier stages record them (the label stage reads its input through them).
    store.add_members(run_id, "prompts", ["p0", "p1", "p2"])
    store.add_members(run_id, "responses", ["resp0", "resp1", "resp2"])
    store.add_members(run_id, "revisions", ["rev0", "rev1", "rev2"])
    counts = label(ctx, cfg, load_constitution(REPO / "constitutions/harmless.yaml"), engines, _info(key))
    comparison_ids = sorted(r[0] for r in store.run_sql(
        "SELECT DISTINCT id FROM run_rows WHERE run_id = ? AND tbl = 'comparisons'", [run_id]))
    return counts, comparison_ids, engines, ctx


def test_skipped_judgments_come_back_when_the_judge_context_grows(store, tmp_path):
    small = _cfg(tmp_path, 64)  # the rubric prompt is longer than 64 words: every judgment is skipped
    counts, cids, _, _ = _label(store, small, ScriptedJudge(64))
    judgments = store.query("SELECT * FROM judgments")
    assert len(judgments) == 2 * len(cids) == 12
    assert all(j["status"] == "skipped" and j["max_model_len"] == 64 for j in judgments)
    assert counts == {"kept": 0, "not_judged": 3}

    # Same limit: nothing pending, no engine.
    engine = ScriptedJudge(64)
    *_, engines, _ = _label(store, small, engine)
    assert engines.calls == 0 and engine.prompts == 0

    # Larger limit: every skipped judgment is judged (replaced, not duplicated), and the pairs get labels.
    engine = ScriptedJudge(4096)
    counts, cids2, engines, ctx = _label(store, _cfg(tmp_path, 4096), engine)
    assert cids2 == cids and engine.prompts == 12
    judgments = store.query("SELECT * FROM judgments")
    assert len(judgments) == 12 and all(j["status"] == "ok" and j["max_model_len"] == 4096 for j in judgments)
    assert ctx.stage_stats("label", "judge-a").rows == 12
    assert store.count("comparisons") == 6
    pairs = store.query("SELECT * FROM preference_pairs WHERE source = 'ai_feedback'")
    assert len(pairs) == 3 and counts == {"kept": 3}
    assert all(p["dropped_reason"] is None and p["chosen_id"].startswith("rev") for p in pairs)

    # Done: a re-run at the larger limit judges nothing.
    engine = ScriptedJudge(4096)
    *_, engines, _ = _label(store, _cfg(tmp_path, 4096), engine)
    assert engines.calls == 0


def test_two_judges_of_the_same_candidates_give_two_pair_rows(store, tmp_path):
    cfg = _cfg(tmp_path, 4096)
    _label(store, cfg, ScriptedJudge(4096, prefers="locksmith"), key="judge-a", run_id="run-a")
    first = {p["pair_id"]: p for p in store.query("SELECT * FROM preference_pairs")}
    assert len(first) == 3 and all(p["chosen_id"].startswith("rev") for p in first.values())

    # Another judge model prefers the original responses; its pairs sit next to the first judge's.
    _label(store, cfg, ScriptedJudge(4096, prefers="wrench"), key="judge-b", run_id="run-b")
    pairs = {p["pair_id"]: p for p in store.query("SELECT * FROM preference_pairs")}
    assert len(pairs) == 6
    assert {k: v for k, v in pairs.items() if k in first} == first  # the first judge's rows are untouched
    second = [p for k, p in pairs.items() if k not in first]
    assert {p["run_id"] for p in second} == {"run-b"}
    assert {(p["chosen_id"], p["rejected_id"]) for p in second} == \
        {(p["rejected_id"], p["chosen_id"]) for p in first.values()}
    assert all(p["constitution_id"] == "harmless" for p in pairs.values())

    # The same judge again writes the same ids (a re-run replaces its own rows, nothing new).
    _label(store, cfg, ScriptedJudge(4096, prefers="wrench"), key="judge-b", run_id="run-b2")
    assert store.count("preference_pairs") == 6


def test_finished_label_stage_shows_nothing_pending(store, tmp_path):
    """The label stage's progress starts from an estimate (judgments per prompt); a pair with nothing to judge
    (here: a revision identical to its response) makes fewer. Once the stage ends, `factory status` must show
    nothing pending for it."""
    store.run_sql("UPDATE revisions SET text = 'Use a tension wrench on lock 2.' WHERE revision_id = 'rev2'")
    _label(store, _cfg(tmp_path, 4096), ScriptedJudge(4096))
    (p,) = store.run_progress("run-1")
    assert p["stage"] == "label" and p["done"] == 8 and p["pending"] == 0
