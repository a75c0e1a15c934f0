"""revise: critiques -> revisions of the critiqued text, following the principle's revision request.

Reads: `critiques` (status 'ok'), the text they critique (`responses` or `revisions`) and the prompts.
Writes: `revisions`, one per critique, carrying the critique id, parent id, round and principle."""

from __future__ import annotations

from factory import templates
from factory.config import PipelineConfig
from factory.constitution import Constitution
from factory.conversation import turns_of, with_system
from factory.stages.common import Context, Job, job_seed, run_model_stage, stage_lineage
from factory.store import Store, row_id


def fetch_critiques(store: Store, ids: list[str]) -> list[dict]:
    """Critiques with the text they critique and the prompt, in one query."""
    if not ids:
        return []
    import pyarrow as pa

    store.con.register("_crit", pa.table({"id": ids}))
    try:
        return store.query("""
            WITH texts AS (SELECT response_id AS id, text FROM responses
                           UNION ALL SELECT revision_id AS id, text FROM revisions)
            SELECT c.critique_id, c.prompt_id, c.response_id, c.parent_id, c.round, c.principle_id,
                   c.text AS critique, t.text AS parent_text, p.text AS prompt, p.messages
            FROM critiques c SEMI JOIN _crit w ON c.critique_id = w.id
            JOIN texts t ON t.id = c.parent_id JOIN prompts p ON p.prompt_id = c.prompt_id
            WHERE c.status = 'ok' ORDER BY c.critique_id""")
    finally:
        store.con.unregister("_crit")


def revise(ctx: Context, cfg: PipelineConfig, constitution: Constitution, critique_ids: list[str],
           get_engine, info=None) -> list[str]:
    """Returns the ids of the revisions for these critiques (finished before or now). `info`: the judge's
    ModelInfo."""
    from factory.model_info import load_model_info

    mcfg, sampling, few_shot, system = cfg.judge, cfg.revise.sampling, cfg.critique.few_shot, cfg.generate.system_prompt
    info = info or load_model_info(mcfg, "judge")
    lineage = stage_lineage(mcfg, info, sampling, "revise", constitution, few_shot, system)
    th, sp = lineage["template_hash"], info.special_tokens
    jobs = []
    for c in fetch_critiques(ctx.store, critique_ids):
        pr = constitution.principle(c["principle_id"])
        conv = with_system(turns_of(c["prompt"], c["messages"]), system)
        rid = row_id("revision", c["critique_id"], info.key, lineage["sampling"], cfg.seed, th)
        rendered = (templates.plain_revision(constitution, few_shot, pr, conv, c["parent_text"], c["critique"], sp)
                    if mcfg.prompt_format == "plain"
                    else templates.chat_revision(pr, conv, c["parent_text"], c["critique"], sp))
        fields = {"prompt_id": c["prompt_id"], "response_id": c["response_id"], "parent_id": c["parent_id"],
                  "critique_id": c["critique_id"], "round": c["round"], "principle_id": c["principle_id"]}
        jobs.append(Job(rid, rendered, fields, job_seed(cfg.seed, rid), echo_of=pr.revision_request))
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    run_model_stage(ctx, table="revisions", stage="revise", get_engine=get_engine, model_cfg=mcfg,
                    sampling=sampling, stop=stop, jobs=jobs, lineage=lineage, clean=templates.clean_output)
    return [j.row_id for j in jobs]
