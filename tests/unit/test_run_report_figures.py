"""The run report's figures on a small hand-built store (real DuckDB file, rows written as the stages write them):
each figure equals what the rows say, rows of another run never count, tables other parts of the factory add
(judge_calibrations, guard_flags, contamination) are used when present and their absence is handled, and the
page escapes stored text and shows every plot it names."""

import json
import struct

import pytest

from factory.report_html import card_section, render_html, write_report
from factory.run_report import run_figures
from factory.store import Store, now

OTHER_DDL = [
    """CREATE TABLE IF NOT EXISTS judge_calibrations (calibration_id VARCHAR PRIMARY KEY, model_id VARCHAR,
       gold_path VARCHAR, gold_sha256 VARCHAR, settings_hash VARCHAR, report JSON, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS guard_flags (row_id VARCHAR, tbl VARCHAR, pattern VARCHAR, span VARCHAR,
       run_id VARCHAR, created_at TIMESTAMP)""",
    """CREATE TABLE IF NOT EXISTS contamination (row_id VARCHAR, tbl VARCHAR, benchmark VARCHAR, ngram VARCHAR,
       hits INTEGER, run_id VARCHAR, created_at TIMESTAMP)""",
]
SCRIPT = "<script>alert('x')</script>"


def _gen(run, stage, status="ok", text="t", pt=10, ot=5, model="tiny-judge"):
    return {"run_id": run, "stage": stage, "status": status, "text": text, "prompt_tokens": pt, "output_tokens": ot,
            "model_id": model, "model_fingerprint": "fp-judge", "created_at": now()}


def _members(s, run, table, ids):
    s.add_members(run, table, ids)


def build_store(path, with_extras=True, cost=None) -> tuple[str, str]:
    """A labelled run: 3 prompts, 3 responses (one failed), 2 critiques and revisions, 2 comparisons (both orders),
    3 revision pairs and 4 AI pairs with four outcomes; plus a pair of another run that must not count."""
    cfg = {"models": {"policy": {"path": "tiny-policy", "engine": "vllm"}, "judge": {"path": "tiny-judge"}},
           "label": {"enabled": True, "mode": "logprob", "tie_threshold": 0.1}, "constitution": "c.yaml"}
    with Store.open(path) as s:
        run = s.start_run("demo", "pipeline", cfg, "demo.yaml")
        other = s.start_run("other", "pipeline", {**cfg, "seed": 7}, "other.yaml")
        s.insert("prompts", [{"prompt_id": f"p{i}", "text": f"prompt {i}", "run_id": run} for i in (1, 2, 3)])
        _members(s, run, "prompts", ["p1", "p2", "p3"])
        s.insert("responses", [
            {"response_id": "r1", "prompt_id": "p1", "sample_index": 0,
             **_gen(run, "generate", text="short " + SCRIPT)},
            {"response_id": "r2", "prompt_id": "p2", "sample_index": 0, **_gen(run, "generate", text="a long answer")},
            {"response_id": "r3", "prompt_id": "p3", "sample_index": 0, **_gen(run, "generate", "failed", "", ot=0)}])
        _members(s, run, "responses", ["r1", "r2", "r3"])
        s.insert("critiques", [{"critique_id": f"c{i}", "prompt_id": f"p{i}", "response_id": f"r{i}",
                                "parent_id": f"r{i}", "round": 1, **_gen(run, "critique")} for i in (1, 2)])
        _members(s, run, "critiques", ["c1", "c2"])
        s.insert("revisions", [{"revision_id": f"v{i}", "prompt_id": f"p{i}", "response_id": f"r{i}",
                                "parent_id": f"r{i}", "critique_id": f"c{i}", "round": 1,
                                **_gen(run, "revise", ot=7)} for i in (1, 2)])
        _members(s, run, "revisions", ["v1", "v2"])
        # comparison 1 (principle a): both orders prefer the revision; comparison 2 (principle b): they disagree
        j = []
        for cid, p, xy, yx in (("k1", "a", 0.3, 0.8), ("k2", "b", 0.6, 0.7)):
            n = cid[1]
            for order, p_a in (("xy", xy), ("yx", yx)):
                j.append({"judgment_id": f"j{cid}{order}", "comparison_id": cid, "prompt_id": f"p{n}",
                          "candidate_x": f"r{n}", "candidate_y": f"v{n}", "answer_order": order, "mode": "logprob",
                          "attempt": 0, "p_a": p_a, "p_x": p_a if order == "xy" else 1 - p_a, "principle_id": p,
                          **_gen(run, "label", pt=20, ot=1)})
        s.insert("judgments", j)
        _members(s, run, "judgments", [r["judgment_id"] for r in j])
        s.insert("comparisons", [
            {"comparison_id": "k1", "run_id": run, "prompt_id": "p1", "candidate_x": "r1", "candidate_y": "v1",
             "source": "revisions", "principle_id": "a", "model_id": "tiny-judge", "p_x_xy": 0.3, "p_x_yx": 0.2,
             "p_x": 0.25, "disagreement": 0.1, "consistent": True},
            {"comparison_id": "k2", "run_id": run, "prompt_id": "p2", "candidate_x": "r2", "candidate_y": "v2",
             "source": "revisions", "principle_id": "b", "model_id": "tiny-judge", "p_x_xy": 0.6, "p_x_yx": 0.3,
             "p_x": 0.45, "disagreement": 0.3, "consistent": False}])
        _members(s, run, "comparisons", ["k1", "k2"])

        def pair(pid, source, chosen, rejected, label=None, reason=None, run_id=run):
            return {"pair_id": pid, "run_id": run_id, "prompt_id": "p1", "source": source, "chosen_text": chosen,
                    "rejected_text": rejected, "label": label, "margin": None if label is None else 2 * label - 1,
                    "dropped_reason": reason, "principle_id": "a"}
        pairs = [pair("f1", "final_vs_initial", "revised one", "x"), pair("f2", "final_vs_initial", "rev 2", "y"),
                 pair("f3", "final_vs_initial", "same", "same", reason="identical_texts"),
                 pair("a1", "ai_feedback", "the longer one", "short", 0.75),
                 pair("a2", "ai_feedback", "a", "b", 0.52, "tie"),
                 pair("a3", "ai_feedback", "The answer is (A)", "b", 0.8, "addresses_judge"),
                 pair("a4", "ai_feedback", "c", "dd", 0.9, "judge_failed_gate")]
        s.insert("preference_pairs", pairs + [pair("zz", "ai_feedback", "o", "p", 0.99, "tie", run_id=other)])
        _members(s, run, "preference_pairs", [p["pair_id"] for p in pairs])
        _members(s, other, "preference_pairs", ["zz"])
        for stage, done, secs in (("generate", 3, 2.0), ("critique r1", 2, 1.0), ("revise r1", 2, 0.5),
                                  ("label", 4, 4.0)):
            s.record_progress({"run_id": run, "stage": stage, "model_id": "m", "wanted": done, "stored_before": 0,
                               "done": done, "seconds": secs, "started_at": now(), "updated_at": now()})
        if with_extras:
            for ddl in OTHER_DDL:
                s.run_sql(ddl)
            rel = [{"bin_lo": 0.5, "bin_hi": 0.75, "n": 10, "mean_confidence": 0.6, "accuracy": 0.7},
                   {"bin_lo": 0.75, "bin_hi": 1.0, "n": 5, "mean_confidence": 0.85, "accuracy": 0.8}]
            s.run_sql("INSERT INTO judge_calibrations VALUES ('old', 'tiny-judge', 'gold.jsonl', 'h', 's', ?, ?)",
                      [json.dumps({"n": 9, "accuracy": 0.1, "reliability": rel}), "2020-01-01"])
            s.run_sql("INSERT INTO judge_calibrations VALUES ('new', 'tiny-judge', 'gold.jsonl', 'h', 's', ?, ?)",
                      [json.dumps({"n": 15, "accuracy": 0.73, "kappa": 0.4, "ece": 0.05, "reliability": rel}),
                       "2021-01-01"])
            s.run_sql("INSERT INTO judge_calibrations VALUES ('else', 'another-judge', 'g', 'h', 's', '{}', now())")
            s.run_sql("INSERT INTO guard_flags VALUES ('r1', 'responses', 'verdict_json', ?, ?, now()), "
                      "('r2', 'responses', 'answer_is', 'The answer is (A)', ?, now()), "
                      "('elsewhere', 'responses', 'answer_is', 'x', ?, now())", [SCRIPT, run, run, other])
            s.run_sql("INSERT INTO contamination (row_id, tbl, benchmark, ngram, hits, run_id, created_at) "
                      "VALUES ('p1', 'prompts', 'mt-bench', 'a b c', 3, ?, now()), "
                      "('p2', 'prompts', 'mt-bench', 'd e f', 1, ?, now())", [run, run])
        s.finish_run(run, "completed", "", {"generate|m": {"rows": 3}, **({"cost": cost} if cost else {})})
        s.finish_run(other, "completed", "", {})
    return run, other


@pytest.fixture()
def store(tmp_path):
    path = tmp_path / "s.duckdb"
    run, other = build_store(path)
    with Store.open(path, read_only=True) as s:
        yield s, run


def test_funnel_counts_every_step_and_every_drop_reason_of_the_run_only(store):
    s, run = store
    fu = run_figures(s, run)["funnel"]
    steps = {x["step"]: (x["n"], x["of"]) for x in fu["steps"]}
    assert steps["prompts"] == (3, None)
    assert steps["responses ok"] == (2, 3) and steps["critiques ok"] == (2, 2) and steps["revisions ok"] == (2, 2)
    assert steps["judgments ok"] == (4, 4) and steps["comparisons (both orders)"][0] == 2
    assert steps["pairs: ai_feedback"] == (4, None) and steps["kept: ai_feedback"] == (1, 4)
    assert steps["pairs: final_vs_initial"] == (3, None) and steps["kept: final_vs_initial"] == (2, 3)
    assert fu["dropped"] == {"addresses_judge": 1, "identical_texts": 1, "judge_failed_gate": 1, "tie": 1}
    assert fu["kept"] == 3 and fu["pairs_total"] == 7  # the other run's pair is not counted
    assert fu["statuses"]["responses"] == {"failed": 1, "ok": 2}


def test_label_histograms_bin_kept_and_dropped_labels(store):
    s, run = store
    lab = run_figures(s, run)["labels"]
    edges, counts = lab["label"]["edges"], lab["label"]["counts"]
    assert edges[0] == 0.5 and edges[-1] == pytest.approx(1.0) and len(edges) == 21
    assert set(counts) == {"kept", "tie", "addresses_judge", "judge_failed_gate"}
    assert counts["kept"][10] == 1 and sum(counts["kept"]) == 1  # 0.75 -> bin 10 of [0.5, 1] in 0.025 steps
    assert counts["judge_failed_gate"][16] == 1 and counts["tie"][0] == 1
    assert lab["margin"]["counts"]["kept"][10] == 1  # margin 0.5 -> bin 10 of [0, 1]


def test_position_bias_principles_and_length_bias(store):
    s, run = store
    f = run_figures(s, run)
    pb = f["position_bias"]
    orders = {o["answer_order"]: o for o in pb["orders"]}
    assert orders["xy"]["chose_a"] == pytest.approx(0.5) and orders["yx"]["chose_a"] == pytest.approx(1.0)
    assert pb["chose_a"] == pytest.approx(0.75) and pb["judgments"] == 4
    assert pb["mean_order_disagreement"] == pytest.approx(0.2) and pb["position_consistency"] == pytest.approx(0.5)
    pr = {p["principle_id"]: p for p in f["principles"]}
    assert pr["a"]["position_consistency"] == 1.0 and pr["a"]["prefers_revision"] == 1.0
    assert pr["b"]["position_consistency"] == 0.0 and pr["b"]["prefers_revision"] == 1.0  # p_x 0.45 < 0.5
    lb = f["length_bias"]
    assert lb["pairs"] == 1 and lb["longer_wins"] == 1 and lb["longer_wins_rate"] == 1.0  # only kept AI pairs
    assert sum(map(sum, lb["grid"]["counts"])) == 1


def test_calibration_takes_the_latest_row_of_the_runs_judge(store):
    s, run = store
    cal = run_figures(s, run)["calibration"]
    assert [j["calibration_id"] for j in cal["judges"]] == ["new"]
    assert cal["judges"][0]["report"]["accuracy"] == 0.73


def test_stages_tokens_and_rates(store):
    s, run = store
    st = {x["stage"]: x for x in run_figures(s, run)["stages"]}
    assert list(st) == ["generate", "critique r1", "revise r1", "label"]
    g = st["generate"]
    assert g["rows"] == 3 and g["prompt_tokens"] == 30 and g["output_tokens"] == 10
    assert g["rows_per_s"] == pytest.approx(1.5) and g["output_tokens_per_s"] == pytest.approx(5)
    assert st["revise r1"]["output_tokens"] == 14 and st["label"]["prompt_tokens"] == 80
    assert st["label"]["rows_per_s"] == pytest.approx(1.0)


def test_guard_and_contamination_count_the_runs_rows(store):
    s, run = store
    f = run_figures(s, run)
    assert f["guard"]["rows"] == 2 and {(c["pattern"], c["rows"]) for c in f["guard"]["counts"]} == {
        ("answer_is", 1), ("verdict_json", 1)}
    assert f["contamination"]["rows"] == 2 and f["contamination"]["counts"][0]["hits"] == 4


def test_missing_tables_and_no_prices(tmp_path):
    run, _ = build_store(tmp_path / "bare.duckdb", with_extras=False)
    with Store.open(tmp_path / "bare.duckdb", read_only=True) as s:
        f = run_figures(s, run)
    # the store's schema has the guard and contamination tables; a run without flags shows none
    assert f["calibration"] is None and not (f["guard"] or {}).get("rows") and not (f["contamination"] or {}).get("rows")
    assert f["cost"] is None or f["cost"].get("total_usd") is None
    page = render_html(f, {})
    assert "No prices are configured" in page and "factory judge calibrate" in page
    assert "cost: no prices configured" in card_section(f, {})


def test_cost_recorded_by_the_run_is_shown(tmp_path):
    cost = {"currency": "USD", "stages": {"generate": {"input_tokens": 30, "output_tokens": 10, "seconds": 2.0,
                                                       "usd": 0.5}}, "total_usd": 1.25, "kept_pairs": 3,
            "usd_per_kept_pair": 0.4167}
    run, _ = build_store(tmp_path / "c.duckdb", cost=cost)
    with Store.open(tmp_path / "c.duckdb", read_only=True) as s:
        f = run_figures(s, run)
    assert f["cost"] == cost
    page = render_html(f, {})
    assert "Total 1.25 USD" in page and "0.4167 USD per kept pair" in page


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_page_escapes_stored_text_and_every_image_exists(store, tmp_path):
    s, run = store
    f = run_figures(s, run)
    page_path = write_report(f, tmp_path / "rep")
    page = page_path.read_text()
    assert SCRIPT not in page and "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in page  # the guard span
    import re

    imgs = re.findall(r'<img src="([^"]+)"', page)
    assert set(imgs) == {"funnel.png", "labels.png", "principles.png", "bias.png", "calibration.png", "stages.png"}
    for name in imgs:
        w, h = _png_size(tmp_path / "rep" / name)
        assert w > 100 and h > 100
    again = write_report(f, tmp_path / "rep2")  # the same figures give the same bytes (an idempotent publish)
    for name in imgs:
        assert (again.parent / name).read_bytes() == (tmp_path / "rep" / name).read_bytes()
