"""pairs: revisions -> preference pairs (revision chosen over the text it revised).

Reads: `revisions` of this pipeline, their parents (`responses` or `revisions`). Writes:
`preference_pairs`: the final round's revision over the initial response, and with
`pairs.include_intermediate` also round k over round k-1. Pairs with an empty side or identical texts are
stored with `dropped_reason` set (never silently lost) and counted. With `label.guard.enabled`, a pair whose chosen
revision addresses the judge (factory/guard.py) is stored with `dropped_reason = 'addresses_judge'`, its flag in
`guard_flags`: SFT and DPO must not learn to write verdicts for the judge. No model calls."""

from __future__ import annotations

from factory.config import PipelineConfig
from factory.stages import guard_flags
from factory.stages.common import Context, StageSpec, members
from factory.store import now, row_id

SPEC = StageSpec(
    name="pairs", reads=("revisions", "responses"), writes="preference_pairs",
    owns=(("preference_pairs", "t.source <> 'ai_feedback'"),),
    keys=f"""SELECT DISTINCT r.revision_id AS id, r.prompt_id FROM revisions r SEMI JOIN ({members('revisions')}) m
             ON m.id = r.revision_id WHERE r.status = 'ok' ORDER BY r.prompt_id, r.revision_id""",
    rows="""
WITH texts AS (SELECT response_id AS id, text, 'response' AS stage, status FROM responses
               WHERE prompt_id BETWEEN $lo AND $hi
               UNION ALL
               SELECT revision_id AS id, text, 'revision' AS stage, status FROM revisions
               WHERE prompt_id BETWEEN $lo AND $hi),
mine AS (SELECT r.* FROM revisions r SEMI JOIN _chunk w ON r.revision_id = w.id WHERE r.prompt_id BETWEEN $lo AND $hi),
cands AS (
    SELECT m.*, m.response_id AS rejected_id, 'final_vs_initial' AS source FROM mine m WHERE m.round = $final
    UNION ALL
    SELECT m.*, m.parent_id AS rejected_id, 'round_vs_previous' AS source FROM mine m
    WHERE $intermediate AND NOT (m.round = $final AND m.parent_id = m.response_id))
SELECT c.revision_id AS chosen_id, c.text AS chosen_text, c.prompt_id, c.round, c.principle_id,
       c.constitution_id, c.constitution_version, c.source,
       c.rejected_id, t.stage AS rejected_stage, t.text AS rejected_text, p.text AS prompt_text
FROM cands c JOIN texts t ON t.id = c.rejected_id
JOIN (SELECT prompt_id, text FROM prompts WHERE prompt_id BETWEEN $lo AND $hi) p ON p.prompt_id = c.prompt_id
ORDER BY c.prompt_id, chosen_id, rejected_id""")


def _norm(text: str | None) -> str:
    return " ".join((text or "").split()).lower()


def drop_reason(chosen: str | None, rejected: str | None) -> str | None:
    if not _norm(chosen) or not _norm(rejected):
        return "empty_response"
    if _norm(chosen) == _norm(rejected):
        return "identical_texts"
    return None


def build_pairs(ctx: Context, cfg: PipelineConfig) -> dict[str, int]:
    """Insert the run's pairs, page by page; returns counts: kept and each drop reason."""
    counts = {"kept": 0}
    _, pages = SPEC.pages(ctx, final=cfg.critique.rounds, intermediate=cfg.pairs.include_intermediate)
    for cands in pages:
        rows = []
        flagged = guard_flags.check(ctx, [(c["chosen_id"], "revisions", c["chosen_text"], c["prompt_text"])
                                          for c in cands]) if cfg.label.guard.enabled else {}
        for c in cands:
            reason = drop_reason(c["chosen_text"], c["rejected_text"])
            guarded = reason is None and c["chosen_id"] in flagged
            reason = "addresses_judge" if guarded else reason
            counts[reason or "kept"] = counts.get(reason or "kept", 0) + 1
            # A dropped pair has an id of its own: a run with the guard off keeps the pair under the usual id, and
            # neither run rewrites the other's row (reused stages adopt rows by id, factory/stages/reuse.py).
            pair_id = row_id("pair", c["chosen_id"], c["rejected_id"], *(("addresses_judge",) if guarded else ()))
            rows.append({"pair_id": pair_id, "run_id": ctx.run_id,
                         "prompt_id": c["prompt_id"], "source": c["source"], "chosen_id": c["chosen_id"],
                         "chosen_stage": "revision", "chosen_text": c["chosen_text"],
                         "rejected_id": c["rejected_id"], "rejected_stage": c["rejected_stage"],
                         "rejected_text": c["rejected_text"], "round": c["round"], "principle_id": c["principle_id"],
                         "constitution_id": c["constitution_id"], "constitution_version": c["constitution_version"],
                         "label": None, "margin": None, "dropped_reason": reason, "created_at": now()})
        ctx.store.add_members(ctx.run_id, SPEC.writes, [r["pair_id"] for r in rows])
        ctx.store.insert(SPEC.writes, rows)
    return counts
