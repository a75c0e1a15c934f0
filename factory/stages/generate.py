"""generate: prompts -> initial responses from the policy model.

Reads: the pipeline's prompts (already in the `prompts` table; a prompt is one user turn or a conversation
ending with the user's, see factory/conversation.py). Writes: `responses`, one row per (prompt, sample index),
status 'ok', 'failed' (e.g. an unfinished reasoning trace) or 'skipped' (prompt too long for the context);
a reasoning trace (<think>...</think>) goes to `reasoning`, apart from the answer in `text`."""

from __future__ import annotations

from factory import templates
from factory.config import PipelineConfig
from factory.conversation import turns_of, with_system
from factory.stages.common import Context, Job, job_seed, run_model_stage, stage_lineage
from factory.store import row_id


def generate(ctx: Context, cfg: PipelineConfig, prompts: list[dict], get_engine, info=None) -> list[str]:
    """Returns the ids of this pipeline's responses (finished before or now). `info` is the policy's
    factory.model_info.ModelInfo (loaded here when not given)."""
    from factory.model_info import load_model_info

    mcfg, sampling, system = cfg.models.policy, cfg.generate.sampling, cfg.generate.system_prompt
    info = info or load_model_info(mcfg, "policy")
    lineage = stage_lineage(mcfg, info, sampling, "generate", system_prompt=system)
    th, sp = lineage["template_hash"], info.special_tokens
    render = templates.plain_generate if mcfg.prompt_format == "plain" else templates.chat_generate
    jobs = []
    for p in prompts:
        turns = turns_of(p["text"], p.get("messages"))
        rendered = render(with_system(turns, system), sp)  # user text is quoted against this model's control strings
        for k in range(cfg.generate.samples_per_prompt):
            rid = row_id("response", p["prompt_id"], k, info.key, lineage["sampling"], cfg.seed, th)
            jobs.append(Job(rid, rendered, {"prompt_id": p["prompt_id"], "sample_index": k}, job_seed(cfg.seed, rid),
                            echo_of=turns[-1]["content"]))
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    run_model_stage(ctx, table="responses", stage="generate", get_engine=get_engine, model_cfg=mcfg,
                    sampling=sampling, stop=stop, jobs=jobs, lineage=lineage, clean=templates.clean_output)
    return [j.row_id for j in jobs]
