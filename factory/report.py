"""The judge quality report: how far the AI-feedback labels can be trusted.

Reads `comparisons`, `judgments` and `preference_pairs` for one pipeline's comparisons; writes the report as
JSON into `judge_reports` under the run id. Figures: position consistency (both orders pick the same side),
mean |P(x|xy) - P(x|yx)|, the distribution of label entropy, agreement of the AI labels with the revision
pairs (does the judge prefer the revision?), per-principle statistics and pair drop counts.
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
    }


def save_report(store: Store, run_id: str, report: dict) -> None:
    store.insert("judge_reports", [{"run_id": run_id, "report": json.dumps(report), "created_at": now()}], replace=True)


def load_report(store: Store, run_id: str) -> dict | None:
    rows = store.query("SELECT report FROM judge_reports WHERE run_id = ?", [run_id])
    return json.loads(rows[0]["report"]) if rows else None
