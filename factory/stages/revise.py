"""revise: critiques -> revisions of the critiqued text, following the principle's revision request.

Reads: the run's critiques of the round (status 'ok'), the text they critique (`responses` or `revisions`) and the
prompts. Writes: `revisions`, one per critique, carrying the critique id, parent id, round and principle."""

from __future__ import annotations

from functools import partial

from factory import templates
from factory.config import PipelineConfig
from factory.constitution import Constitution
from factory.conversation import turns_of, with_system
from factory.stages.common import Context, Job, ModelStage, StageSpec, job_seed, members, stage_lineage
from factory.store import row_id

SPEC = StageSpec(
    name="revise", reads=("critiques", "responses", "revisions", "prompts"), writes="revisions",
    owns=(("revisions", "t.round = $round"),),
    keys=f"""SELECT DISTINCT c.critique_id AS id, c.prompt_id FROM critiques c SEMI JOIN ({members('critiques')}) m
             ON m.id = c.critique_id WHERE c.round = $round AND c.status = 'ok' ORDER BY c.prompt_id, c.critique_id""",
    rows="""WITH texts AS (SELECT response_id AS id, text FROM responses WHERE prompt_id BETWEEN $lo AND $hi
                           UNION ALL
                           SELECT revision_id AS id, text FROM revisions WHERE prompt_id BETWEEN $lo AND $hi)
            SELECT c.critique_id, c.prompt_id, c.response_id, c.parent_id, c.round, c.principle_id,
                   c.text AS critique, t.text AS parent_text, p.text AS prompt, p.messages
            FROM critiques c SEMI JOIN _chunk w ON c.critique_id = w.id
            JOIN texts t ON t.id = c.parent_id JOIN prompts p ON p.prompt_id = c.prompt_id
            WHERE c.prompt_id BETWEEN $lo AND $hi AND p.prompt_id BETWEEN $lo AND $hi
            ORDER BY c.prompt_id, c.critique_id""")


def revise(ctx: Context, cfg: PipelineConfig, constitution: Constitution, round_no: int, get_engine,
           info=None) -> None:
    """Revise the texts critiqued in round `round_no`. `info`: the judge's ModelInfo."""
    from factory.model_info import load_model_info

    mcfg, sampling, few_shot, system = cfg.judge, cfg.revise.sampling, cfg.critique.few_shot, cfg.generate.system_prompt
    info = info or load_model_info(mcfg, "judge")
    lineage = stage_lineage(mcfg, info, sampling, "revise", constitution, few_shot, system)
    th, sp = lineage["template_hash"], info.special_tokens
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    n, pages = SPEC.pages(ctx, round=round_no)
    stage = ModelStage(ctx, table=SPEC.writes, stage=SPEC.name, get_engine=get_engine, model_cfg=mcfg,
                       sampling=sampling, stop=stop, lineage=lineage, clean=templates.clean_output,
                       label=f"revise r{round_no}", expected=n)
    for page in pages:
        jobs = []
        for c in page:
            pr = constitution.principle(c["principle_id"])
            conv = with_system(turns_of(c["prompt"], c["messages"]), system)
            rid = row_id("revision", c["critique_id"], info.key, lineage["sampling"], cfg.seed, th)
            rendered = (partial(templates.plain_revision, constitution, few_shot, pr, conv, c["parent_text"],
                                c["critique"], sp)
                        if mcfg.prompt_format == "plain"
                        else partial(templates.chat_revision, pr, conv, c["parent_text"], c["critique"], sp))
            fields = {"prompt_id": c["prompt_id"], "response_id": c["response_id"], "parent_id": c["parent_id"],
                      "critique_id": c["critique_id"], "round": c["round"], "principle_id": c["principle_id"]}
            jobs.append(Job(rid, rendered, fields, job_seed(cfg.seed, rid), echo_of=pr.revision_request))
        stage.run(jobs)
    stage.finish()
