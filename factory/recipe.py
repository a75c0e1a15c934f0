"""`factory recipe cai`: the whole Constitutional AI recipe in one command (Bai et al. 2022; Lee et al. 2023).

1. the pipeline (pipeline.run_pipeline): responses, critiques, revisions, revision pairs and AI labels;
2. SL-CAI: `train sft` on the final revisions, from the pipeline's policy model;
3. a reward model (`train reward`) from the SFT model, on the AI-labelled pairs;
4. RL-CAI: each of `methods` from the SFT model: dpo, kto, ppo (against the reward model), grpo (the judge);
5. `factory eval`: every trained policy and the SFT model against the SFT model on the held-out prompts.

Reads: the recipe config (config.RecipeConfig). Writes: the pipeline's rows to its store, each step's model,
metrics.json and `train-<step>` run (`<output_root>/<step>/`), the evaluation (`<output_root>/eval/`) and
`<output_root>/recipe.json` with the final table.

Every step's config is built and validated before the pipeline starts, so a bad setting fails in seconds. The
steps share one split by prompt (`data.eval_fraction`, `seed`), so no policy is evaluated on a prompt any step
trained on. A step whose config and inputs are unchanged since it last finished is not run again
(`<output_root>/<step>/recipe-step.json` holds the key it finished with), so a killed recipe resumes at the step
that did not finish; the pipeline resumes by itself. The evaluation is reused the same way when neither its
config nor any policy changed, so a second run of a finished recipe only prints the table again.
"""

from __future__ import annotations

import copy
import importlib
import json
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from factory.config import (ConfigError, EvalConfig, RecipeConfig, TrainConfig, check_grpo_settings,
                            format_validation_error, inherit_model_section)
from factory.run_scope import scope_hash
from factory.store import row_id

TRAINERS = {"sft": ("factory.train.sft", "train_sft"), "reward": ("factory.train.reward", "train_reward"),
            "dpo": ("factory.train.dpo", "train_dpo"), "kto": ("factory.train.kto", "train_kto"),
            "ppo": ("factory.train.ppo", "train_ppo"), "grpo": ("factory.train.grpo", "train_grpo")}
# What the recipe decides for every step: setting one of these in `train` or `steps` would break the links
# between the steps (which model a step starts from, which rows it reads), so it is an error, not an override.
LINKS = ("name", "output_root", "model", "prompt_format")
DATA_LINKS = ("store", "runs")
# Data settings that decide the train/eval split: one value for every step, or a prompt could be trained on by
# one step and evaluated as held out.
SPLIT_KEYS = ("eval_fraction", "conflicts", "sources", "min_margin", "constitution_id")
MARKER = "recipe-step.json"


@dataclass
class Plan:
    cfg: RecipeConfig
    steps: dict[str, TrainConfig]  # in the order they run
    eval: EvalConfig


def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _check_links(section: dict, where: str) -> None:
    for key in LINKS:
        if key in section:
            raise ConfigError(f"{where}.{key}: set by the recipe (it links the steps); remove it")
    for key in DATA_LINKS:
        if key in (section.get("data") or {}):
            raise ConfigError(f"{where}.data.{key}: set by the recipe (the pipeline's store and run); remove it")


def step_dir(cfg: RecipeConfig, step: str) -> Path:
    return Path(cfg.output_root) / step


def plan(cfg: RecipeConfig, run_id: str = "latest") -> Plan:
    """Every step's `factory train` config and the `factory eval` config, validated (ConfigError naming the
    recipe key). `run_id` is the pipeline run whose rows the steps read ('latest' until it has run)."""
    _check_links(cfg.train, "train")
    policy = cfg.pipeline.models.policy
    steps: dict[str, TrainConfig] = {}
    for step in ("sft", "reward", *cfg.methods):
        _check_links(cfg.steps.get(step, {}), f"steps.{step}")
        shared = cfg.train
        if step == "ppo":  # our PPO batches by ppo.*, and refuses these optim keys; shared ones do not apply to it
            from factory.train.ppo import PPO_UNUSED

            shared = {**shared, "optim": {k: v for k, v in (shared.get("optim") or {}).items() if k not in PPO_UNUSED}}
        data = _merge(shared, cfg.steps.get(step, {}))
        start = policy.path if step == "sft" else str(step_dir(cfg, "sft"))
        data.update(name=step, output_root=str(cfg.output_root), model=start, prompt_format=policy.prompt_format)
        data["data"] = {**data.get("data", {}), "store": cfg.pipeline.store, "runs": [run_id]}
        if step == "ppo":
            data["ppo"] = {**data.get("ppo", {}), "reward_model": str(step_dir(cfg, "reward"))}
        if step == "grpo":  # the judge that labelled the data scores the samples, against the same constitution
            data["grpo"] = {**data.get("grpo", {}), "judge": cfg.pipeline.judge.model_dump(mode="json"),
                            "constitution": cfg.pipeline.constitution}
        where = "train" + (f" + steps.{step}" if step in cfg.steps else "")
        try:
            steps[step] = TrainConfig.model_validate(data)
        except ValidationError as e:
            raise ConfigError(format_validation_error(e, f"recipe {where} (the {step} step)", TrainConfig)) from e
        if step in ("grpo", "ppo"):  # the checks each trainer makes before loading anything
            from factory.train.ppo import check_settings

            try:
                (check_grpo_settings if step == "grpo" else check_settings)(steps[step])
            except ConfigError as e:
                raise ConfigError(f"recipe {where} (the {step} step): {e}") from e
    first = steps["sft"]
    for step, tc in steps.items():
        for key in SPLIT_KEYS + ("seed",):
            a = getattr(first, key) if key == "seed" else getattr(first.data, key)
            b = getattr(tc, key) if key == "seed" else getattr(tc.data, key)
            if a != b:
                raise ConfigError(f"steps.{step}: {'' if key == 'seed' else 'data.'}{key} is {b!r} but {a!r} for "
                                  f"sft; every step must share the split by prompt, set it once in `train`")
    return Plan(cfg=cfg, steps=steps, eval=_eval_config(cfg, first, run_id))


def _eval_config(cfg: RecipeConfig, first: TrainConfig, run_id: str) -> EvalConfig:
    for key in ("policy", "policies", "reference", "judge", "reward_model", "constitution", "data", "name",
                "output_root"):
        if key in cfg.eval:
            raise ConfigError(f"eval.{key}: set by the recipe (the trained policies against the SFT model, judged "
                              f"by the pipeline's judge); remove it")
    policy = cfg.pipeline.models.policy

    def section(step: str) -> dict:
        return inherit_model_section(policy, {"path": str(step_dir(cfg, step))})

    data = {key: getattr(first.data, key) for key in SPLIT_KEYS}
    data.update(store=cfg.pipeline.store, runs=[run_id])
    fields = {"seed": first.seed, **cfg.eval, "name": "eval", "output_root": str(cfg.output_root),
              "policies": {step: section(step) for step in ("sft", *cfg.methods)}, "reference": section("sft"),
              "judge": cfg.pipeline.judge.model_dump(mode="json"), "reward_model": str(step_dir(cfg, "reward")),
              "constitution": cfg.pipeline.constitution, "data": data}
    if fields["seed"] != first.seed:
        raise ConfigError(f"eval.seed is {fields['seed']} but the training steps use seed {first.seed}: the seed "
                          "decides the split by prompt, so set it once in `train.seed`")
    try:
        return EvalConfig.model_validate(fields)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "recipe eval", EvalConfig)) from e


def _step_key(tc: TrainConfig, pipeline_scope: str, upstream: list[str]) -> str:
    """What a finished step depends on: its own config (the run id aside: a resumed pipeline run is a new run over
    the same rows), the pipeline's scope and the keys of the steps it starts from."""
    dumped = tc.model_dump(mode="json")
    dumped["data"].pop("runs")
    return row_id(json.dumps(dumped, sort_keys=True), pipeline_scope, *upstream)


def _finished(out: Path, key: str) -> bool:
    marker = out / MARKER
    return (out / "metrics.json").is_file() and marker.is_file() and json.loads(marker.read_text()).get("key") == key


def run_recipe(cfg: RecipeConfig, log=lambda m: None, engines=None) -> dict:
    """Run the recipe (module docstring); returns the pipeline run, each step's figures and the final table."""
    from factory.pipeline import run_pipeline
    from factory.train.evaluate import evaluate

    plan(cfg)  # every step validated before the pipeline starts
    log("pipeline: generate, critique, revise, pairs, label")
    result = run_pipeline(cfg.pipeline, log=log, engines=engines)
    if result.status != "completed":
        raise RuntimeError(f"the pipeline run {result.run_id} ended {result.status}: {result.message}; fix it and "
                           "run the recipe again (finished rows are kept)")
    final = plan(cfg, result.run_id)
    pipeline_scope = scope_hash("pipeline", cfg.pipeline.model_dump(mode="json"))
    keys: dict[str, str] = {}
    summary: dict[str, dict] = {}
    for step, tc in final.steps.items():
        upstream = [keys["sft"]] if step != "sft" else []
        if step == "ppo":
            upstream.append(keys["reward"])
        keys[step] = _step_key(tc, pipeline_scope, upstream)
        out = step_dir(cfg, step)
        if _finished(out, keys[step]):
            log(f"{step}: unchanged since it finished, reusing {out}")
            metrics, reused = json.loads((out / "metrics.json").read_text()), True
        else:
            log(f"{step}: training from {tc.model}")
            module, func = TRAINERS[step]
            metrics, reused = getattr(importlib.import_module(module), func)(tc), False
            (out / MARKER).write_text(json.dumps({"key": keys[step]}))
        summary[step] = {"reused": reused, "output_dir": str(out),
                         **{k: metrics.get(k) for k in ("run_id", "train_loss", "global_step", "eval_accuracy")
                            if k in metrics}}
    eval_out = Path(final.eval.output_root, final.eval.name)
    dumped = final.eval.model_dump(mode="json")
    dumped["data"].pop("runs")
    keys["eval"] = row_id(json.dumps(dumped, sort_keys=True), pipeline_scope, *(keys[s] for s in final.steps))
    if _finished(eval_out, keys["eval"]):  # nothing it reads changed: the same policies on the same prompts
        log(f"eval: unchanged since it finished, reusing {eval_out}")
        ev, eval_reused = json.loads((eval_out / "metrics.json").read_text()), True
        ev["run_id"] = json.loads((eval_out / MARKER).read_text()).get("run_id")
    else:
        log("eval: every policy against the SFT model on the held-out prompts")
        ev, eval_reused = evaluate(final.eval, log=log), False
        (eval_out / MARKER).write_text(json.dumps({"key": keys["eval"], "run_id": ev.get("run_id")}))
    summary["eval"] = {"reused": eval_reused, "output_dir": str(eval_out)}
    report = {"name": cfg.name, "pipeline_run": result.run_id, "pair_counts": result.pair_counts, "steps": summary,
              "eval_run": ev.get("run_id"), "table": table(ev), "reward_accuracy": ev.get("reward_accuracy"),
              "reward_accuracy_n": ev.get("reward_accuracy_n"), "reward_accuracy_ci95": ev.get("reward_accuracy_ci95")}
    Path(cfg.output_root, "recipe.json").write_text(json.dumps(report, indent=2, default=float))
    return report


TABLE_COLUMNS = ("harmless_win_rate", "helpful_win_rate", "harmless_rate", "over_refusal_rate", "kl",
                 "pair_accuracy")


def table(ev: dict) -> list[dict]:
    """One row per evaluated policy: each rate with its count and 95% interval, the KL to the reference."""
    rows = []
    for name, m in ev.get("policies", {}).items():
        row = {"policy": name}
        for col in TABLE_COLUMNS:
            row[col] = m.get(col)
            row[f"{col}_n"] = m.get(f"{col}_n")
            row[f"{col}_ci95"] = m.get(f"{col}_ci95")
        rows.append(row)
    return rows
