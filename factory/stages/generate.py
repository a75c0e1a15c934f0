"""generate: prompts -> initial responses from the policy model.

Reads: the run's prompts (a prompt is one user turn or a conversation ending with the user's, see
factory/conversation.py). Writes: `responses`, one row per (prompt, sample index), status 'ok', 'failed' (e.g. an
unfinished reasoning trace) or 'skipped' (prompt too long for the context); a reasoning trace (<think>...</think>)
goes to `reasoning`, apart from the answer in `text`."""

from __future__ import annotations

from functools import partial

from factory import templates
from factory.config import PipelineConfig
from factory.conversation import turns_of, with_system
from factory.stages.common import Context, Job, ModelStage, StageSpec, job_seed, members, stage_lineage
from factory.store import row_id

SPEC = StageSpec(
    name="generate", reads=("prompts",), writes="responses",
    keys=f"SELECT DISTINCT id, id AS prompt_id FROM ({members('prompts')}) ORDER BY id",
    rows="""SELECT p.prompt_id, p.text, p.messages FROM prompts p SEMI JOIN _chunk c ON c.id = p.prompt_id
            WHERE p.prompt_id BETWEEN $lo AND $hi ORDER BY p.prompt_id""")


def generate(ctx: Context, cfg: PipelineConfig, get_engine, info=None) -> None:
    """`info` is the policy's factory.model_info.ModelInfo (loaded here when not given)."""
    from factory.model_info import load_model_info

    mcfg, sampling, system = cfg.models.policy, cfg.generate.sampling, cfg.generate.system_prompt
    info = info or load_model_info(mcfg, "policy")
    lineage = stage_lineage(mcfg, info, sampling, "generate", system_prompt=system)
    th, sp = lineage["template_hash"], info.special_tokens
    render = templates.plain_generate if mcfg.prompt_format == "plain" else templates.chat_generate
    stop = templates.PLAIN_STOPS + sampling.stop if mcfg.prompt_format == "plain" else sampling.stop
    n, pages = SPEC.pages(ctx)
    stage = ModelStage(ctx, table=SPEC.writes, stage=SPEC.name, get_engine=get_engine, model_cfg=mcfg,
                       sampling=sampling, stop=stop, lineage=lineage, clean=templates.clean_output,
                       expected=n * cfg.generate.samples_per_prompt)
    for page in pages:
        jobs = []
        for p in page:
            turns = turns_of(p["text"], p["messages"])
            # user text is quoted against this model's control strings when rendered
            rendered = partial(render, with_system(turns, system), sp)
            for k in range(cfg.generate.samples_per_prompt):
                rid = row_id("response", p["prompt_id"], k, info.key, lineage["sampling"], cfg.seed, th)
                jobs.append(Job(rid, rendered, {"prompt_id": p["prompt_id"], "sample_index": k},
                                job_seed(cfg.seed, rid), echo_of=turns[-1]["content"]))
        stage.run(jobs)
    stage.finish()
