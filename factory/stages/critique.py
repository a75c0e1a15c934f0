"""critique: responses (round 1) or revisions (later rounds) -> critiques against sampled principles.

Reads: the parent rows (status 'ok', non-empty text) and their prompts. Writes: `critiques`, one row per
(parent, principle, round) with the constitution id, version and principle id. Principles are sampled
as a pure function of (seed, parent id, round), so a resumed run samples the same ones
(Bai et al. 2022, arXiv 2212.08073, section 3)."""

from __future__ import annotations

from factory import templates
from factory.config import PipelineConfig
from factory.constitution import Constitution, sample_principles
from factory.conversation import turns_of, with_system
from factory.stages.common import Context, Job, job_seed, run_model_stage, stage_lineage
from factory.store import Store, row_id


def fetch_parents(store: Store, table: str, ids: list[str]) -> list[dict]:
    """Rows to critique: id, prompt and text; failed, skipped and empty rows are left out."""
    id_col = "response_id" if table == "responses" else "revision_id"
    root = "response_id"
    rows = store.fetch_by_ids(table, ids, where="t.status = 'ok' AND length(trim(t.text)) > 0")
    prompts = {r["prompt_id"]: turns_of(r["text"], r.get("messages"))
               for r in store.fetch_by_ids("prompts", [r["prompt_id"] for r in rows])}
    return [{"id": r[id_col], "response_id": r[root], "prompt_id": r["prompt_id"], "prompt": prompts[r["prompt_id"]],
             "text": r["text"]} for r in rows]


def critique(ctx: Context, cfg: PipelineConfig, constitution: Constitution, parents: list[dict], round_no: int,
             get_engine, info=None) -> list[str]:
    """Returns the ids of this round's critiques (finished before or now). `info`: the judge's ModelInfo."""
    from factory.model_info import load_model_info

    mcfg, sampling, few_shot, system = cfg.judge, cfg.critique.sampling, cfg.critique.few_shot, cfg.generate.system_prompt
    info = info or load_model_info(mcfg, "judge")
    lineage = stage_lineage(mcfg, info, sampling, "critique", constitution, few_shot, system)
    th, sp = lineage["template_hash"], info.special_tokens
    jobs = []
    for parent in parents:
        conv = with_system(parent["prompt"], system)  # the critique continues the conversation
        for pr in sample_principles(constitution, cfg.critique.principles_per_round, cfg.seed,
                                    f"{parent['id']}:{round_no}"):
            cid = row_id("critique", parent["id"], pr.id, round_no, constitution.id, constitution.version, info.key,
                         lineage["sampling"], cfg.seed, th)
            rendered = (templates.plain_critique(constitution, few_shot, pr, conv, parent["text"], sp)
                        if mcfg.prompt_format == "plain"
                        else templates.chat_critique(pr, conv, parent["text"], sp))
            fields = {"prompt_id": parent["prompt_id"], "response_id": parent["response_id"],
                      "parent_id": parent["id"], "round": round_no, "principle_id": pr.id}
            jobs.append(Job(cid, rendered, fields, job_seed(cfg.seed, cid), echo_of=pr.critique_request))
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    run_model_stage(ctx, table="critiques", stage="critique", get_engine=get_engine, model_cfg=mcfg,
                    sampling=sampling, stop=stop, jobs=jobs, lineage=lineage, clean=templates.clean_output,
                    allow_empty=False)
    return [j.row_id for j in jobs]
