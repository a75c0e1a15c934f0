"""The judge quality report: how far the AI-feedback labels can be trusted.

Reads `comparisons`, `judgments` and `preference_pairs` for one pipeline's comparisons; writes the report as
JSON into `judge_reports` under the run id. Figures: position consistency (both orders pick the same side),
mean |P(x|xy) - P(x|yx)|, the distribution of label entropy, agreement of the AI labels with the revision
pairs (does the judge prefer the revision?), per-principle statistics and pair drop counts.
"""

from __future__ import annotations

import json

import pyarrow as pa

from factory.judge import binary_entropy
from factory.store import Store, now

ENTROPY_BINS = [0.0, 0.2, 0.4, 0.6, 0.8, 1.0001]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(store: Store, comparison_ids: list[str], pair_counts: dict[str, int]) -> dict:
    store.con.register("_cmp", pa.table({"id": comparison_ids}))
    try:
        comps = store.query("SELECT c.* FROM comparisons c SEMI JOIN _cmp w ON c.comparison_id = w.id")
        judgments = store.query("""SELECT status, count(*) AS n, sum(output_tokens) AS output_tokens
                                   FROM judgments j SEMI JOIN _cmp w ON j.comparison_id = w.id GROUP BY status""")
    finally:
        store.con.unregister("_cmp")
    entropies = [binary_entropy(c["p_x"]) for c in comps]
    hist = {f"{lo:.1f}-{min(hi, 1.0):.1f}": sum(lo <= e < hi for e in entropies)
            for lo, hi in zip(ENTROPY_BINS, ENTROPY_BINS[1:])}
    rev = [c for c in comps if c["source"] == "revisions"]
    per_principle = {}
    for pid in sorted({c["principle_id"] for c in comps}):
        mine = [c for c in comps if c["principle_id"] == pid]
        mine_rev = [c for c in mine if c["source"] == "revisions"]
        per_principle[pid] = {
            "comparisons": len(mine),
            "position_consistency": _mean([float(c["consistent"]) for c in mine]),
            "mean_order_disagreement": _mean([c["disagreement"] for c in mine]),
            "prefers_revision": _mean([float(c["p_x"] < 0.5) for c in mine_rev]),
        }
    return {
        "comparisons": len(comps),
        "comparisons_requested": len(comparison_ids),
        "judgments": {r["status"]: r["n"] for r in judgments},
        "judge_output_tokens": sum(r["output_tokens"] or 0 for r in judgments),
        "position_consistency": _mean([float(c["consistent"]) for c in comps]),
        "mean_order_disagreement": _mean([c["disagreement"] for c in comps]),
        "mean_label_entropy": _mean(entropies),
        "label_entropy_histogram": hist,
        # Share of revision comparisons where the judge prefers the revision (agreement with the
        # revision-based pairs, which always choose the revision).
        "agreement_with_revision_pairs": _mean([float(c["p_x"] < 0.5) for c in rev]),
        "per_principle": per_principle,
        "pairs": pair_counts,
    }


def save_report(store: Store, run_id: str, report: dict) -> None:
    store.insert("judge_reports", [{"run_id": run_id, "report": json.dumps(report), "created_at": now()}], replace=True)


def load_report(store: Store, run_id: str) -> dict | None:
    rows = store.query("SELECT report FROM judge_reports WHERE run_id = ?", [run_id])
    return json.loads(rows[0]["report"]) if rows else None
