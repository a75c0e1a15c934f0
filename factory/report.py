"""The judge quality report: how far the AI-feedback labels can be trusted.

Reads `comparisons`, `judgments` and `preference_pairs` for one pipeline's comparisons; writes the report as
JSON into `judge_reports` under the run id. Figures: position consistency (both orders pick the same side),
mean |P(x|xy) - P(x|yx)|, the distribution of label entropy, agreement of the AI labels with the revision
pairs (does the judge prefer the revision?), per-principle statistics, pair drop counts, and the guard's flags
(`guard_flags`: responses and revisions that address the judge, by pattern group and table).
"""

from __future__ import annotations

import json

from factory.store import Store, now

ENTROPY_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0001]


_ENTROPY = "CASE WHEN p_x <= 0 OR p_x >= 1 THEN 0.0 ELSE -(p_x * log2(p_x) + (1 - p_x) * log2(1 - p_x)) END"
_BINS = list(zip(ENTROPY_BINS, ENTROPY_BINS[1:]))


def build_report(store: Store, run_id: str, pair_counts: dict[str, int]) -> dict:
    """The report over the run's comparisons (its membership in `run_rows`, reused ones included), aggregated in
    SQL: a million comparisons never become Python objects."""
    mine = "(SELECT DISTINCT id FROM run_rows WHERE run_id = $run AND tbl = 'comparisons')"
    comps = f"(SELECT c.*, {_ENTROPY} AS entropy FROM comparisons c SEMI JOIN {mine} w ON c.comparison_id = w.id)"
    run = {"run": run_id}
    requested = store.query(f"SELECT count(*) AS n FROM {mine}", run)[0]["n"]
    total = store.query(f"""SELECT count(*) AS n, avg(consistent::DOUBLE) AS cons, avg(disagreement) AS dis,
                                   avg(entropy) AS ent, avg((p_x < 0.5)::DOUBLE) FILTER (source = 'revisions') AS rev,
                                   {', '.join(f"count(*) FILTER (entropy >= {lo} AND entropy < {hi}) AS b{i}"
                                              for i, (lo, hi) in enumerate(_BINS))}
                            FROM {comps}""", run)[0]
    per_principle = {r.pop("principle_id"): r for r in store.query(f"""
        SELECT principle_id, count(*) AS comparisons, avg(consistent::DOUBLE) AS position_consistency,
               avg(disagreement) AS mean_order_disagreement,
               avg((p_x < 0.5)::DOUBLE) FILTER (source = 'revisions') AS prefers_revision
        FROM {comps} GROUP BY principle_id ORDER BY principle_id""", run)}
    judgments = store.query(f"""SELECT status, count(*) AS n, sum(output_tokens) AS output_tokens
                                FROM judgments j SEMI JOIN {mine} w ON j.comparison_id = w.id GROUP BY status""", run)
    return {
        "comparisons": total["n"],
        "comparisons_requested": requested,
        "judgments": {r["status"]: r["n"] for r in judgments},
        "judge_output_tokens": sum(r["output_tokens"] or 0 for r in judgments),
        "position_consistency": total["cons"],
        "mean_order_disagreement": total["dis"],
        "mean_label_entropy": total["ent"],
        "label_entropy_histogram": {f"{lo:.1f}-{min(hi, 1.0):.1f}": total[f"b{i}"] for i, (lo, hi) in enumerate(_BINS)},
        # Share of revision comparisons where the judge prefers the revision (agreement with the
        # revision-based pairs, which always choose the revision).
        "agreement_with_revision_pairs": total["rev"],
        "per_principle": per_principle,
        "pairs": pair_counts,
        "guard": guard_section(store, run_id),
    }


def save_report(store: Store, run_id: str, report: dict) -> None:
    store.insert("judge_reports", [{"run_id": run_id, "report": json.dumps(report), "created_at": now()}], replace=True)


def load_report(store: Store, run_id: str) -> dict | None:
    rows = store.query("SELECT report FROM judge_reports WHERE run_id = ?", [run_id])
    return json.loads(rows[0]["report"]) if rows else None


def guard_section(store: Store, run_id: str) -> dict:
    """The guard (factory/guard.py) in this run: whether it was on, the run's responses and revisions flagged as
    addressing the judge (by pattern group and by table, with a few spans), and the pairs dropped as
    'addresses_judge' per source. A flag belongs to the text, so a run that reused flagged rows counts them too."""
    cfg = store.run_sql("SELECT config FROM runs WHERE run_id = ?", [run_id])
    guard_cfg = (json.loads(cfg[0][0]) if cfg and cfg[0][0] else {}).get("label", {}).get("guard", {})
    out = {"enabled": guard_cfg.get("enabled", True), "judge_flagged": guard_cfg.get("judge_flagged", False),
           "flagged_rows": 0, "by_pattern": {}, "by_table": {}, "examples": [], "dropped_pairs": {}}
    if not store._has("guard_flags"):  # a store written before the guard (read-only: not migrated)
        return out
    flags = """(SELECT g.* FROM guard_flags g SEMI JOIN (SELECT tbl, id FROM run_rows WHERE run_id = $run
               AND tbl IN ('responses', 'revisions')) m ON m.id = g.row_id AND m.tbl = g.tbl)"""
    run = {"run": run_id}
    rows = store.query(f"SELECT pattern, tbl, count(*) AS n FROM {flags} GROUP BY ALL ORDER BY ALL", run)
    for r in rows:
        out["by_pattern"][r["pattern"]] = out["by_pattern"].get(r["pattern"], 0) + r["n"]
        out["by_table"][r["tbl"]] = out["by_table"].get(r["tbl"], 0) + r["n"]
    out["flagged_rows"] = sum(r["n"] for r in rows)
    out["examples"] = store.query(f"SELECT tbl, row_id, pattern, span FROM {flags} ORDER BY row_id LIMIT 3", run)
    out["dropped_pairs"] = dict(store.run_sql(
        """SELECT CASE WHEN p.source = 'ai_feedback' THEN 'ai_feedback' ELSE 'revisions' END, count(*)
           FROM preference_pairs p SEMI JOIN (SELECT id FROM run_rows WHERE run_id = ? AND tbl = 'preference_pairs') m
           ON m.id = p.pair_id WHERE p.dropped_reason = 'addresses_judge' GROUP BY ALL ORDER BY ALL""", [run_id]))
    return out
