"""generate: prompts -> initial responses from the policy model.

Reads: the pipeline's prompts (already in the `prompts` table). Writes: `responses`, one row per
(prompt, sample index), status 'ok' or 'skipped' (prompt too long for the context)."""

from __future__ import annotations

from factory import templates
from factory.config import PipelineConfig
from factory.stages.common import Context, Job, job_seed, run_model_stage, stage_lineage
from factory.store import row_id


def generate(ctx: Context, cfg: PipelineConfig, prompts: list[dict], get_engine) -> list[str]:
    """Returns the ids of this pipeline's responses (finished before or now)."""
    mcfg, sampling = cfg.models.policy, cfg.generate.sampling
    lineage = stage_lineage(mcfg, sampling, "generate")
    model, th = lineage["model_id"], lineage["template_hash"]
    jobs = []
    for p in prompts:
        for k in range(cfg.generate.samples_per_prompt):
            rid = row_id("response", p["prompt_id"], k, model, lineage["sampling"], cfg.seed, th)
            # Special-token strings are broken inside templates.quote; the tokenizer's list is only known
            # once the engine exists, so the common Gemma/Llama/ChatML markers are covered up front.
            rendered = (templates.plain_generate(p["text"], templates.COMMON_SPECIAL_TOKENS)
                        if mcfg.prompt_format == "plain"
                        else templates.chat_generate(p["text"], templates.COMMON_SPECIAL_TOKENS))
            jobs.append(Job(rid, rendered, {"prompt_id": p["prompt_id"], "sample_index": k}, job_seed(cfg.seed, rid),
                            echo_of=p["text"]))
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    run_model_stage(ctx, table="responses", stage="generate", get_engine=get_engine, model_cfg=mcfg,
                    sampling=sampling, stop=stop, jobs=jobs, lineage=lineage, clean=templates.clean_output)
    return [j.row_id for j in jobs]
