"""critique: responses (round 1) or revisions (later rounds) -> critiques against sampled principles.

Reads: the run's parent rows (responses for round 1, the previous round's revisions after; status 'ok', non-empty
text) and their prompts. Writes: `critiques`, one row per (parent, principle, round) with the constitution id,
version and principle id. Principles are sampled as a pure function of (seed, parent id, round), so a resumed run
samples the same ones (Bai et al. 2022, arXiv 2212.08073, section 3)."""

from __future__ import annotations

from functools import partial

from factory import templates
from factory.config import PipelineConfig
from factory.constitution import Constitution, sample_principles
from factory.conversation import turns_of, with_system
from factory.stages.common import Context, Job, ModelStage, StageSpec, job_seed, members, stage_lineage
from factory.store import row_id

# The parents of round r: the run's responses (r = 1) or its revisions of round r - 1, with text to critique.
_PARENTS = """
    SELECT response_id AS id, response_id, prompt_id, text, 0 AS round FROM responses
    WHERE $round = 1 AND status = 'ok' AND length(trim(text)) > 0{range}
    UNION ALL
    SELECT revision_id, response_id, prompt_id, text, round FROM revisions
    WHERE $round > 1 AND round = $round - 1 AND status = 'ok' AND length(trim(text)) > 0{range}"""
_PAGE = " AND prompt_id BETWEEN $lo AND $hi"

SPEC = StageSpec(
    name="critique", reads=("responses", "revisions", "prompts"), writes="critiques",
    owns=(("critiques", "t.round = $round"),),
    keys=f"""SELECT DISTINCT t.id, t.prompt_id FROM ({_PARENTS.format(range="")}) t
             SEMI JOIN ({members('responses')} UNION ALL {members('revisions')}) m ON m.id = t.id
             ORDER BY t.prompt_id, t.id""",
    rows=f"""SELECT t.id, t.response_id, t.prompt_id, t.text, p.text AS prompt, p.messages
             FROM ({_PARENTS.format(range=_PAGE)}) t SEMI JOIN _chunk c ON c.id = t.id
             JOIN prompts p ON p.prompt_id = t.prompt_id WHERE p.prompt_id BETWEEN $lo AND $hi
             ORDER BY t.prompt_id, t.id""")


def critique(ctx: Context, cfg: PipelineConfig, constitution: Constitution, round_no: int, get_engine,
             info=None) -> None:
    """Critique round `round_no` of the run's parents. `info`: the judge's ModelInfo."""
    from factory.model_info import load_model_info

    mcfg, sampling, few_shot, system = cfg.judge, cfg.critique.sampling, cfg.critique.few_shot, cfg.generate.system_prompt
    info = info or load_model_info(mcfg, "judge")
    lineage = stage_lineage(mcfg, info, sampling, "critique", constitution, few_shot, system)
    th, sp = lineage["template_hash"], info.special_tokens
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    n, pages = SPEC.pages(ctx, round=round_no)
    stage = ModelStage(ctx, table=SPEC.writes, stage=SPEC.name, get_engine=get_engine, model_cfg=mcfg,
                       sampling=sampling, stop=stop, lineage=lineage, clean=templates.clean_output,
                       allow_empty=False, label=f"critique r{round_no}",
                       expected=n * cfg.critique.principles_per_round)
    for page in pages:
        jobs = []
        for parent in page:
            conv = with_system(turns_of(parent["prompt"], parent["messages"]), system)  # it continues the conversation
            for pr in sample_principles(constitution, cfg.critique.principles_per_round, cfg.seed,
                                        f"{parent['id']}:{round_no}"):
                cid = row_id("critique", parent["id"], pr.id, round_no, constitution.id, constitution.version,
                             info.key, lineage["sampling"], cfg.seed, th)
                rendered = (partial(templates.plain_critique, constitution, few_shot, pr, conv, parent["text"], sp)
                            if mcfg.prompt_format == "plain"
                            else partial(templates.chat_critique, pr, conv, parent["text"], sp))
                fields = {"prompt_id": parent["prompt_id"], "response_id": parent["response_id"],
                          "parent_id": parent["id"], "round": round_no, "principle_id": pr.id}
                jobs.append(Job(cid, rendered, fields, job_seed(cfg.seed, cid), echo_of=pr.critique_request))
        stage.run(jobs)
    stage.finish()
