"""The figures of one pipeline run, for `factory report` and the dataset card: a plain dict, computed in DuckDB.

Reads (never writes): `runs`, `run_progress`, `run_rows`, `prompts`, `responses`, `critiques`, `revisions`,
`judgments`, `comparisons`, `preference_pairs`, and when they exist `judge_calibrations`, `guard_flags` and
`contamination`. Every figure is an aggregate or a histogram bin computed in SQL over the run's rows
(`Store.run_scope`: the rows it wrote or reused), so a run of a million rows costs a few scans and a few hundred
numbers in Python, never a million objects. Text that comes from the store (drop reasons, principle ids, spans)
is kept as it is here; the HTML and the card escape it.

Sections (keys of `run_figures`): run, funnel, labels, principles, position_bias, length_bias, calibration,
stages, guard, contamination, cost, examples.
"""

from __future__ import annotations

import json
import math

from factory.store import Store

LABEL_BINS = 20  # histogram bins of P(chosen) over [0.5, 1] and of the margin over [0, 1]
LENGTH_BINS = 16  # bins of the length difference (chosen - rejected, characters) for the label-vs-length plot
EXAMPLES = 5  # guard spans shown per report
EXAMPLE_CHARS = 400  # characters of each text in the example pairs


def run_figures(store: Store, run: str = "latest") -> dict:
    """Every section of the report for pipeline run `run` (an id or 'latest')."""
    run_id = store.resolve_run(run, kind="pipeline")
    scope = store.run_scope([run_id])
    return {"run": run_info(store, run_id), "funnel": funnel(store, scope), "labels": label_histograms(store, scope),
            "principles": per_principle(store, scope), "position_bias": position_bias(store, scope),
            "length_bias": length_bias(store, scope), "calibration": calibration(store, scope),
            "stages": stages(store, scope, run_id), "guard": guard(store, run_id),
            "contamination": contamination(store, run_id), "cost": cost(store, run_id),
            "examples": examples(store, scope)}


def run_info(store: Store, run_id: str) -> dict:
    row = store.query("SELECT run_id, name, status, message, config_path, started_at, finished_at, config "
                      "FROM runs WHERE run_id = ?", [run_id])[0]
    cfg = json.loads(row.pop("config") or "{}")
    models = cfg.get("models") or {}
    policy = models.get("policy") or {}
    judge = {**policy, **(models.get("judge") or {})}
    label = cfg.get("label") or {}
    return {**row, "policy": policy.get("path"), "judge": judge.get("path"), "constitution": cfg.get("constitution"),
            "label_enabled": label.get("enabled"), "label_mode": label.get("mode"),
            "tie_threshold": label.get("tie_threshold")}


def _by_status(store: Store, scope, table: str) -> dict[str, int]:
    status = "'ok'" if table in ("prompts", "comparisons") else "coalesce(t.status, 'ok')"
    return dict(store.run_sql(f"SELECT {status}, count(*) FROM {table} t WHERE {scope.sql(table, 't')} "
                              "GROUP BY ALL ORDER BY ALL"))


def funnel(store: Store, scope) -> dict:
    """From prompts to kept pairs: rows per table and status, pairs per source and outcome, and every drop reason
    as stored (whatever the stages that wrote it call it)."""
    statuses = {t: _by_status(store, scope, t)
                for t in ("prompts", "responses", "critiques", "revisions", "judgments", "comparisons")}
    pairs = store.query(f"""SELECT coalesce(source, '') AS source, coalesce(dropped_reason, 'kept') AS status,
                                   count(*) AS n
                            FROM preference_pairs pp WHERE {scope.sql('preference_pairs', 'pp')}
                            GROUP BY ALL ORDER BY source, status""")
    steps = [{"step": "prompts", "n": statuses["prompts"].get("ok", 0), "of": None}]
    for t in ("responses", "critiques", "revisions", "judgments"):
        if statuses[t] or t != "judgments":
            steps.append({"step": f"{t} ok", "n": statuses[t].get("ok", 0), "of": sum(statuses[t].values())})
    if statuses["comparisons"]:
        steps.append({"step": "comparisons (both orders)", "n": statuses["comparisons"]["ok"], "of": None})
    sources = sorted({p["source"] for p in pairs})
    for s in sources:
        total = sum(p["n"] for p in pairs if p["source"] == s)
        kept = sum(p["n"] for p in pairs if p["source"] == s and p["status"] == "kept")
        steps += [{"step": f"pairs: {s}", "n": total, "of": None}, {"step": f"kept: {s}", "n": kept, "of": total}]
    dropped: dict[str, int] = {}
    for p in pairs:
        if p["status"] != "kept":
            dropped[p["status"]] = dropped.get(p["status"], 0) + p["n"]
    return {"steps": steps, "statuses": statuses, "pairs": pairs, "sources": sources,
            "pairs_total": sum(p["n"] for p in pairs), "kept": sum(p["n"] for p in pairs if p["status"] == "kept"),
            "dropped": dict(sorted(dropped.items(), key=lambda kv: (-kv[1], kv[0])))}


def histogram(store: Store, table_sql: str, expr: str, lo: float, hi: float, bins: int, group: str = "'all'",
              params: list | None = None) -> dict:
    """Counts of `expr` over `table_sql` in `bins` equal bins of [lo, hi] (the last bin closed; values outside
    are clamped into the end bins) per `group`, in SQL. Returns {"edges": [...], "counts": {group: [n per bin]}}."""
    width = (hi - lo) / bins
    rows = store.run_sql(f"""SELECT {group} AS g, least({bins - 1}, greatest(0, floor(({expr} - {lo}) / {width})))::INT
                                    AS b, count(*) FROM {table_sql} WHERE {expr} IS NOT NULL GROUP BY ALL""",
                         params or [])
    counts: dict[str, list[int]] = {}
    for g, b, n in rows:
        counts.setdefault(str(g), [0] * bins)[b] += n
    return {"edges": [lo + i * width for i in range(bins + 1)], "counts": dict(sorted(counts.items()))}


def _ai_pairs(scope) -> str:
    return (f"(SELECT * FROM preference_pairs pp WHERE {scope.sql('preference_pairs', 'pp')} "
            "AND pp.source = 'ai_feedback')")


def nice_span(span: float | None) -> float:
    """The smallest of 0.01, 0.02, 0.05, 0.1, 0.2, 0.5 (or 1) that covers `span`: labels of a small judge stay
    within a few hundredths of 0.5, and bins over all of [0.5, 1] would put them all in the first bin."""
    for step in (0.01, 0.02, 0.05, 0.1, 0.2, 0.5):
        if span is not None and span <= step:
            return step
    return 1.0


def label_histograms(store: Store, scope) -> dict:
    """P(chosen) and margin of the AI-feedback pairs that have a label, kept ones and dropped ones (ties, ...) by
    outcome, in LABEL_BINS bins from 0.5 (margin 0) to the largest label rounded up (`nice_span`)."""
    pairs = _ai_pairs(scope)
    status = "coalesce(dropped_reason, 'kept')"
    top_label, top_margin = store.run_sql(f"SELECT max(label), max(margin) FROM {pairs} a")[0]
    label_hi = 0.5 + min(0.5, nice_span(None if top_label is None else top_label - 0.5))
    margin_hi = min(1.0, nice_span(top_margin))
    return {"label": histogram(store, pairs, "label", 0.5, label_hi, LABEL_BINS, status),
            "margin": histogram(store, pairs, "margin", 0.0, margin_hi, LABEL_BINS, status)}


def per_principle(store: Store, scope) -> list[dict]:
    """Per principle: comparisons, position consistency (both orders pick the same side), mean order disagreement,
    and how often the judge prefers the revision (x is the initial response, y its revision: p_x < 0.5)."""
    return store.query(f"""SELECT principle_id, count(*) AS comparisons,
                                  avg(consistent::DOUBLE) AS position_consistency,
                                  avg(disagreement) AS mean_order_disagreement,
                                  count(*) FILTER (source = 'revisions') AS revision_comparisons,
                                  avg((p_x < 0.5)::DOUBLE) FILTER (source = 'revisions') AS prefers_revision
                           FROM comparisons c WHERE {scope.sql('comparisons', 'c')}
                           GROUP BY principle_id ORDER BY principle_id""")


def position_bias(store: Store, scope) -> dict:
    """The share of judgments choosing (A) in each order (xy: the first candidate is (A); yx: the second is),
    overall, and the mean |P(x|xy) - P(x|yx)| of the comparisons. A judge without position bias chooses (A) in
    half of all judgments."""
    orders = store.query(f"""SELECT answer_order, count(*) AS judgments, avg((p_a > 0.5)::DOUBLE) AS chose_a,
                                    avg(p_a) AS mean_p_a
                             FROM judgments j WHERE {scope.sql('judgments', 'j')} AND j.status = 'ok'
                               AND j.p_a IS NOT NULL GROUP BY answer_order ORDER BY answer_order""")
    total = store.query(f"""SELECT count(*) AS judgments, avg((p_a > 0.5)::DOUBLE) AS chose_a FROM judgments j
                            WHERE {scope.sql('judgments', 'j')} AND j.status = 'ok' AND j.p_a IS NOT NULL""")[0]
    comps = store.query(f"""SELECT count(*) AS comparisons, avg(disagreement) AS mean_order_disagreement,
                                   avg(consistent::DOUBLE) AS position_consistency
                            FROM comparisons c WHERE {scope.sql('comparisons', 'c')}""")[0]
    return {"orders": orders, "judgments": total["judgments"], "chose_a": total["chose_a"], **comps}


def length_bias(store: Store, scope) -> dict:
    """Among the kept AI-feedback pairs: how often the longer text (characters) is chosen, the correlation of the
    label with the length difference, and a 2-D histogram of label against length difference (chosen - rejected,
    clipped to its 1st-99th percentiles) with the mean label per length bin."""
    kept = (f"(SELECT *, length(chosen_text) - length(rejected_text) AS d FROM {_ai_pairs(scope)} "
            "WHERE dropped_reason IS NULL)")
    s = store.query(f"""SELECT count(*) AS pairs, count(*) FILTER (d > 0) AS longer_wins,
                               count(*) FILTER (d < 0) AS shorter_wins, count(*) FILTER (d = 0) AS same_length,
                               corr(label, d) AS label_length_corr, avg(d) AS mean_length_difference,
                               quantile_cont(d, 0.01) AS lo, quantile_cont(d, 0.99) AS hi, max(label) AS top
                        FROM {kept} k WHERE label IS NOT NULL""")[0]
    decided = s["longer_wins"] + s["shorter_wins"]
    out = {k: s[k] for k in ("pairs", "longer_wins", "shorter_wins", "same_length", "label_length_corr",
                              "mean_length_difference")}
    if out["label_length_corr"] is not None and math.isnan(out["label_length_corr"]):  # fewer than 2 pairs, or
        out["label_length_corr"] = None  # every length difference the same
    out["longer_wins_rate"] = s["longer_wins"] / decided if decided else None
    out["grid"] = None
    if s["pairs"]:
        lo, hi = float(s["lo"]), float(s["hi"])
        if hi <= lo:
            lo, hi = lo - 1.0, hi + 1.0
        dw, lw = (hi - lo) / LENGTH_BINS, min(0.5, nice_span(s["top"] - 0.5)) / LABEL_BINS
        cells = store.run_sql(f"""SELECT least({LENGTH_BINS - 1}, greatest(0, floor((d - {lo}) / {dw})))::INT AS x,
                                         least({LABEL_BINS - 1}, greatest(0, floor((label - 0.5) / {lw})))::INT AS y,
                                         count(*), sum(label)
                                  FROM {kept} k WHERE label IS NOT NULL GROUP BY ALL""")
        counts = [[0] * LENGTH_BINS for _ in range(LABEL_BINS)]
        sums, ns = [0.0] * LENGTH_BINS, [0] * LENGTH_BINS
        for x, y, n, total in cells:
            counts[y][x] += n
            sums[x] += total
            ns[x] += n
        out["grid"] = {"x_edges": [lo + i * dw for i in range(LENGTH_BINS + 1)],
                       "y_edges": [0.5 + i * lw for i in range(LABEL_BINS + 1)], "counts": counts,
                       "mean_label": [sums[i] / ns[i] if ns[i] else None for i in range(LENGTH_BINS)]}
    return out


def calibration(store: Store, scope) -> dict | None:
    """The latest calibration of each judge behind the run's comparisons (`judge_calibrations`, matched on the
    judge's id as comparisons store it, or its fingerprint as judgments store it); None without the table or a
    row for the judge."""
    if not store._has("judge_calibrations"):
        return None
    judges = [r[0] for r in store.run_sql(
        f"""SELECT DISTINCT model_id FROM comparisons c WHERE {scope.sql('comparisons', 'c')} AND model_id IS NOT NULL
            UNION SELECT DISTINCT model_fingerprint FROM judgments j WHERE {scope.sql('judgments', 'j')}
            AND model_fingerprint IS NOT NULL""")]
    if not judges:
        return None
    rows = store.query("""SELECT calibration_id, model_id, gold_path, gold_sha256, report, created_at
                          FROM judge_calibrations WHERE list_contains(?, model_id)
                          QUALIFY row_number() OVER (PARTITION BY model_id ORDER BY created_at DESC) = 1
                          ORDER BY model_id""", [judges])
    if not rows:
        return None
    for r in rows:
        r["report"] = json.loads(r["report"]) if isinstance(r["report"], str) else (r["report"] or {})
    return {"judges": rows}


def _stage_key(stage: str, round_no) -> str:
    """The name `run_progress` gives a stage: critique and revise are per round ('critique r1')."""
    return f"{stage} r{round_no}" if round_no is not None and stage in ("critique", "revise") else stage


def stages(store: Store, scope, run_id: str) -> list[dict]:
    """Per stage: the run's rows and their tokens; the rows this run wrote itself and its wall seconds
    (`run_progress`), so rows/s and output tokens/s are this run's throughput (rows reused from an earlier run
    cost nothing here)."""
    found: dict[str, dict] = {}
    for table in ("responses", "critiques", "revisions", "judgments"):
        round_col = "t.round" if table in ("critiques", "revisions") else "NULL::INT"
        for r in store.query(f"""SELECT t.stage, {round_col} AS round, count(*) AS rows,
                                        count(*) FILTER (t.run_id = $run) AS written,
                                        coalesce(sum(t.prompt_tokens), 0) AS prompt_tokens,
                                        coalesce(sum(t.output_tokens), 0) AS output_tokens,
                                        coalesce(sum(t.output_tokens) FILTER (t.run_id = $run), 0)
                                            AS written_output_tokens
                                 FROM {table} t WHERE {scope.sql(table, 't')} GROUP BY ALL ORDER BY ALL""",
                             {"run": run_id}):
            key = _stage_key(r.pop("stage"), r.pop("round"))
            found[key] = {"stage": key, "table": table, **{k: int(v) for k, v in r.items()}}
    progress = {p["stage"]: p for p in store.query(
        "SELECT stage, done, wanted, seconds FROM run_progress WHERE run_id = ? ORDER BY started_at, stage", [run_id])}
    out = []
    for key in list(progress) + [k for k in found if k not in progress]:
        row = found.get(key, {"stage": key, "table": None, "rows": None, "written": None, "prompt_tokens": None,
                              "output_tokens": None, "written_output_tokens": None})
        p = progress.get(key, {})
        secs = p.get("seconds")
        row.update(seconds=secs, done=p.get("done"),
                   rows_per_s=p["done"] / secs if secs and p.get("done") else None,
                   output_tokens_per_s=row["written_output_tokens"] / secs if secs and row["written_output_tokens"]
                   else None)
        out.append(row)
    return out


def examples(store: Store, scope, chars: int = EXAMPLE_CHARS) -> list[dict]:
    """One pair per source and outcome (kept, and each drop reason): the first by pair id, its texts cut to `chars`
    characters. The window runs in DuckDB; only the few chosen rows are joined to their prompts."""
    return store.query(f"""WITH pick AS MATERIALIZED (
                               SELECT pp.pair_id, pp.prompt_id, pp.source,
                                      coalesce(pp.dropped_reason, 'kept') AS status,
                                      pp.principle_id, pp.label, left(pp.chosen_text, {chars}) AS chosen,
                                      left(pp.rejected_text, {chars}) AS rejected
                               FROM preference_pairs pp WHERE {scope.sql('preference_pairs', 'pp')}
                               QUALIFY row_number() OVER (PARTITION BY pp.source, coalesce(pp.dropped_reason, 'kept')
                                                          ORDER BY pp.pair_id) = 1)
                           SELECT pick.*, left(p.text, {chars}) AS prompt
                           FROM pick LEFT JOIN prompts p USING (prompt_id)
                           ORDER BY pick.source, pick.status <> 'kept', pick.status""")


def _member_ids(tables: tuple[str, ...]) -> str:
    names = ", ".join(f"'{t}'" for t in tables)
    return f"(SELECT id FROM run_rows WHERE run_id = $run AND tbl IN ({names}))"


def guard(store: Store, run_id: str) -> dict | None:
    """Rows of the run the guard flagged (`guard_flags`), per table and pattern, and a few matched spans."""
    if not store._has("guard_flags"):
        return None
    mine = f"(g.row_id IN {_member_ids(('responses', 'revisions'))} OR g.run_id = $run)"
    counts = store.query(f"""SELECT g.tbl, g.pattern, count(DISTINCT g.row_id) AS rows, count(*) AS flags
                             FROM guard_flags g WHERE {mine} GROUP BY ALL ORDER BY ALL""", {"run": run_id})
    examples = store.query(f"""SELECT g.tbl, g.pattern, left(g.span, 200) AS span FROM guard_flags g WHERE {mine}
                               ORDER BY g.pattern, g.row_id LIMIT {EXAMPLES}""", {"run": run_id})
    rows = store.query(f"SELECT count(DISTINCT g.row_id) AS n FROM guard_flags g WHERE {mine}", {"run": run_id})[0]["n"]
    return {"counts": counts, "rows": rows, "examples": examples}


def contamination(store: Store, run_id: str) -> dict | None:
    """Rows of the run that overlap a benchmark (`contamination`), per table and benchmark."""
    if not store._has("contamination"):
        return None
    mine = f"(c.row_id IN {_member_ids(('prompts', 'responses', 'revisions'))} OR c.run_id = $run)"
    counts = store.query(f"""SELECT c.tbl, c.benchmark, count(DISTINCT c.row_id) AS rows,
                                    coalesce(sum(c.hits), 0) AS hits
                             FROM contamination c WHERE {mine} GROUP BY ALL ORDER BY ALL""", {"run": run_id})
    rows = store.query(f"SELECT count(DISTINCT c.row_id) AS n FROM contamination c WHERE {mine}",
                       {"run": run_id})[0]["n"]
    return {"counts": counts, "rows": rows}


def cost(store: Store, run_id: str) -> dict | None:
    """The run's cost ledger: `runs.stats -> 'cost'` when the run recorded one, else `factory.cost.run_cost` when
    that module exists; None when neither (the report then says no prices are configured)."""
    row = store.run_sql("SELECT stats -> 'cost' FROM runs WHERE run_id = ?", [run_id])
    if row and row[0][0] is not None:
        value = json.loads(row[0][0]) if isinstance(row[0][0], str) else row[0][0]
        if value:
            return value
    try:
        from factory.cost import run_cost  # written by another part of the factory; absent in older versions
    except ImportError:
        return None
    return run_cost(store, run_id)
