"""RL from the judge (d-RLAIF, Lee et al. 2023): TRL's `GRPOTrainer` where factory's judge scores every sampled
response during training, instead of a reward model (`factory train ppo` stays the reward-model route).

Reads: the store's prompts that have a policy response in `data.runs` (and, with `data.constitution_id`, a revision
under that constitution), TRAIN side of the split by prompt every trainer uses (data.split_by_prompt with
`data.eval_fraction` and `seed`). Writes: the trained model to `<output_root>/<name>/` (LoRA merged), metrics.json
(`train_rewards` and `train_kl`: the mean judged reward and the KL to the initial model of each logged step) and a
`train-grpo` run in the store.

Prompts are rendered as the other trainers render them (data.render_prompt: "Human: ...\\n\\nAssistant:" for
plain, TRL's conversational messages built from the stored conversation for chat, a system turn folded into the
first user turn for templates without a system role). GRPO samples `grpo.num_generations` responses per prompt
(model.generate on CPU, no vLLM) and each one's advantage is its reward against its group's mean.

The reward (`judge_reward`): the judge compares the sampled response with a reference response of the same prompt,
under one principle of `grpo.constitution` sampled per prompt (the same principle for every response of the group,
so the group is ranked on one question), with the label stage's judge prompt, in both orders, averaged
(factory.train.judged). `pairwise`: P(sample better) from the answer log-probabilities; `rubric`: from 1-10 scores
in text. The reference is the policy's first response to the prompt in the store (the lowest `sample_index` that
parsed: Constitutional AI's "initial" response, before critique and revision), so the reward says "better than
what the pipeline's policy wrote", a fixed bar on the same scale for every prompt; the revision would be a higher
bar, but not every prompt has one.
"""

from __future__ import annotations

import json

from factory import templates
from factory.config import TrainConfig, check_grpo_settings
from factory.constitution import load_constitution, sample_principles
from factory.conversation import turns_of
from factory.store import row_id
from factory.train import common, trl_utils
from factory.train.data import render_prompt, split_by_prompt

# The first response of each prompt that parsed (its lowest sample_index), of the runs in data.runs.
PROMPTS_SQL = """
SELECT r.response_id, r.prompt_id, p.text AS prompt, p.messages, r.text AS reference
FROM responses r JOIN prompts p USING (prompt_id)
WHERE r.status = 'ok' AND length(trim(r.text)) > 0
  AND {responses_of_runs}  -- Store.run_scope: the runs' responses
  AND {uncontaminated}  -- the prompt not flagged by decontamination
  AND ($constitution IS NULL OR EXISTS (SELECT 1 FROM revisions v WHERE v.response_id = r.response_id
                                        AND v.constitution_id = $constitution))
QUALIFY row_number() OVER (PARTITION BY r.prompt_id ORDER BY r.sample_index, r.response_id) = 1
ORDER BY r.prompt_id
"""


def load_prompts(cfg: TrainConfig) -> list[dict]:
    """The store's prompts with their reference response (see PROMPTS_SQL), all of them (both sides of the split)."""
    from factory.store import Store

    d = cfg.data
    with Store.open(d.store, read_only=True) as store:
        scope = store.run_scope(d.runs, kind="pipeline")
        from factory.decontam import clean_sql

        rows = store.query(PROMPTS_SQL.format(responses_of_runs=scope.sql("responses", "r"),
                                              uncontaminated=clean_sql(store, "r.prompt_id")),
                           {"constitution": d.constitution_id})
    if not rows:
        raise ValueError(f"no responses in {d.store} for data.runs={d.runs}, data.constitution_id={d.constitution_id}; "
                         "run a pipeline first (factory run ...) or relax the filters")
    return rows


def dataset_rows(rows: list[dict], fmt: str) -> list[dict]:
    """TRL's prompt-only format plus what the reward needs: the conversation the judge is shown (JSON of its
    turns) and the reference response."""
    out = []
    for r in rows:
        turns = turns_of(r["prompt"], r["messages"])
        out.append({"prompt": render_prompt("", fmt, turns), "prompt_id": r["prompt_id"],
                    "conversation": json.dumps(turns), "reference": r["reference"]})
    return out


def completion_text(completion) -> str:
    """The answer in a sampled completion: the assistant message's content (chat), or the text cut at the first
    role marker the model wrote anyway, as the pipeline parses its policy's outputs (templates.clean_output)."""
    if isinstance(completion, list):
        completion = completion[-1]["content"] if completion else ""
    return templates.clean_output(completion)


def judge_reward(engine, constitution, mode: str = "pairwise", prompt_format: str = "plain", seed: int = 0,
                 sampling=None, stats: dict | None = None):
    """A TRL reward function: P(each completion better than its prompt's reference), judged by `engine` (a factory
    engine) in both orders under one principle per prompt. `prompt_format` is the judge's. `stats`, when given,
    accumulates the judge prompts sent and the rubric replies that did not parse."""
    from factory.train.judged import Comparison, p_x_better

    judge_mode = "logprob" if mode == "pairwise" else "rubric"

    def judge(prompts, completions, prompt_id, conversation, reference, **kwargs) -> list[float]:
        comparisons = [Comparison(sample_principles(constitution, 1, seed, f"grpo:{pid}")[0].comparison,
                                  json.loads(conv), completion_text(c), ref)
                       for pid, conv, c, ref in zip(prompt_id, conversation, completions, reference)]
        judged = p_x_better(engine, comparisons, judge_mode, prompt_format, sampling=sampling, seed=seed)
        if stats is not None:
            stats["judge_prompts"] = stats.get("judge_prompts", 0) + judged.prompts
            stats["judge_failed"] = stats.get("judge_failed", 0) + judged.failed
        return judged.p_x

    judge.__name__ = f"judge_{mode}"  # TRL logs rewards/<name>/mean
    return judge


def train_grpo(cfg: TrainConfig, engines=None, log=lambda m: None) -> dict:
    """GRPO on the training prompts, rewarded by `cfg.grpo.judge`; `engines` (factory.pipeline.Engines) may be a
    caller's shared engines (tests), else the judge's engine is started here and closed at the end."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from factory.model_info import check_chat_template, check_judge_answers, load_model_info

    check_grpo_settings(cfg)  # before any model loads
    g = cfg.grpo
    constitution = load_constitution(g.constitution)
    info = load_model_info(g.judge, "judge")  # tokenizer only: a judge that cannot answer fails before any model loads
    check_chat_template(info, g.judge.prompt_format)
    if g.reward_mode == "pairwise":
        from factory import judge as judge_text

        check_judge_answers(info, judge_text.ANSWER_CUE, "grpo.judge (reward_mode pairwise)")
    rows = load_prompts(cfg)
    out, path = common.output_dir(cfg), common.model_path(cfg)
    tok = common.load_tokenizer(path, cfg)
    if cfg.prompt_format == "chat":
        common.fold_unsupported_system(rows, tok)
    train_rows, eval_rows = split_by_prompt(rows, cfg.data.eval_fraction, cfg.seed)
    data = common.TrainData(train=train_rows, eval=eval_rows,
                            pair_ids_hash=row_id(*sorted(r["response_id"] for r in train_rows)),
                            info={"train_prompts": len(train_rows), "eval_prompts": len(eval_rows),
                                  "reference": "first policy response"})

    own = engines is None
    if own:
        from factory.pipeline import Engines

        engines = Engines(cfg.seed, log)
    stats: dict = {}
    try:
        engine = engines.getter(g.judge)()
        reward = judge_reward(engine, constitution, g.reward_mode, g.judge.prompt_format, cfg.seed,
                              g.rubric_sampling, stats)
        # num_generations, max_completion_length, beta, temperature and any other GRPOConfig setting of the section
        args = GRPOConfig(**common.trl_args(cfg, "grpo", out,
                                            model_init_kwargs={"trust_remote_code": cfg.trust_remote_code}))
        trainer = GRPOTrainer(model=path, reward_funcs=reward, args=args, processing_class=tok,
                              train_dataset=Dataset.from_list(dataset_rows(train_rows, cfg.prompt_format)),
                              peft_config=common.peft_config(cfg))
        result = trainer.train()
    finally:
        if own:
            engines.close()
    history = trainer.state.log_history
    rewards = [float(h["reward"]) for h in history if h.get("reward") is not None]
    kls = [float(h["kl"]) for h in history if h.get("kl") is not None]
    metrics = {**trl_utils.base_metrics(cfg, "grpo", data, out), "reward_mode": g.reward_mode,
               "judge": g.judge.path, "beta": g.beta, "num_generations": g.num_generations,
               **trl_utils.train_summary(trainer, result), "train_rewards": rewards, "train_kl": kls, **stats}
    metrics.update(trl_utils.save_trained(trainer, tok, out, common.model_path(cfg)))
    return trl_utils.finish_run(cfg, "grpo", data, out, metrics)
