"""The `factory train`, `factory eval` and `factory recipe cai` commands; cli.py registers them on its app."""

from __future__ import annotations

import typer

from factory.cli_tables import err, fail, out, print_metrics, print_policy_table, recipe_table
from factory.config import ConfigError
from factory.recipe import TRAINERS  # method -> (module, function), shared with the recipe's steps



def train(
    method: str = typer.Argument(..., help="sft, reward, dpo, kto, ppo or grpo."),
    config: str = typer.Option(..., "--config", "-c", help="Training YAML, e.g. pipelines/train/dpo.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key: --set optim.max_steps=10 (repeatable)."),
):
    """Train from the store: SL-CAI on the final revisions (TRL's SFT), a reward model (TRL, hard or soft
    labels), DPO or KTO (TRL) from the preference pairs, PPO (ours) against a trained reward model, or GRPO (TRL)
    with the judge scoring each sampled response (d-RLAIF). Outputs go
    to outputs/NAME/ (NAME from the config).

    Examples:

        factory train sft --config pipelines/train/sft.yaml

        factory train reward --config pipelines/train/reward.yaml

        factory train dpo --config pipelines/train/dpo.yaml --set optim.max_steps=20

        factory train ppo --config pipelines/train/ppo.yaml --set ppo.reward_model=outputs/reward

        factory train grpo --config pipelines/train/grpo.yaml
    """
    import importlib

    from factory.config import load_train_config

    if method not in TRAINERS:
        fail(f"unknown method {method!r}; choose one of {', '.join(TRAINERS)}", 2)
    try:
        cfg = load_train_config(config, set_)
    except ConfigError as e:
        fail(str(e), 2)
    module, func = TRAINERS[method]
    try:
        metrics = getattr(importlib.import_module(module), func)(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    print_metrics(f"{method} training: {cfg.name}", metrics)


def eval_(
    config: str = typer.Option(..., "--config", "-c", help="Evaluation YAML, e.g. pipelines/train/eval.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key (repeatable)."),
):
    """Evaluate trained policies side by side against their reference on held-out prompts: harmlessness and
    helpfulness win rates judged by the AI-feedback judge (both orders), held-out pair accuracy, KL to the
    reference, harmless rate on red-team prompts, over-refusal rate on ordinary prompts, reward-model figures.

    Example: factory eval --config pipelines/train/eval.yaml --set policies.dpo.path=outputs/dpo
    """
    from factory.config import load_eval_config
    from factory.train.evaluate import evaluate

    try:
        cfg = load_eval_config(config, set_)
    except ConfigError as e:
        fail(str(e), 2)
    try:
        metrics = evaluate(cfg)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    print_metrics(f"evaluation: {cfg.name}", metrics)
    print_policy_table(metrics)
    for name, fig in metrics["policies"].items():
        for ex in fig.get("examples", [])[:1]:
            out.print(f"\n[{name}] prompt: {ex['prompt'][:200]}\n  policy:    {ex['policy'][:200]}\n"
                      f"  reference: {ex['reference'][:200]}", highlight=False)


def recipe_cai(
    config: str = typer.Option("pipelines/cai.yaml", "--config", "-c", help="Recipe YAML, e.g. pipelines/cai.yaml."),
    set_: list[str] = typer.Option([], "--set", help="Override a key: --set pipeline.prompts.limit=8 (repeatable)."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log each step to stderr."),
):
    """Constitutional AI end to end: generate -> critique/revise -> label -> SFT -> reward model -> DPO/KTO/PPO/GRPO
    -> eval, ending with one table: each policy's harmlessness and helpfulness win rates against the SFT model,
    harmless and over-refusal rates, KL to the SFT model, and the reward model's held-out accuracy.

    Running it again resumes: finished pipeline rows and unchanged finished steps are reused.

    Example: factory recipe cai --config pipelines/cai.yaml
    """
    from factory.config import load_recipe_config
    from factory.recipe import plan, run_recipe

    try:
        cfg = load_recipe_config(config, set_)
        plan(cfg)
    except ConfigError as e:
        fail(str(e), 2)
    log = (lambda m: err.print(f"[dim]\\[recipe][/] {m}", highlight=False)) if verbose else (lambda m: None)
    try:
        report = run_recipe(cfg, log=log)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        fail(str(e), 2)
    out.print(recipe_table(report))
    out.print(f"everything is in {cfg.output_root}/ (recipe.json: this table)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add train, eval and the recipe group to APP."""
    app.command()(train)
    app.command("eval")(eval_)
    recipe_app = typer.Typer(help="Whole recipes in one command.", no_args_is_help=True)
    recipe_app.command("cai")(recipe_cai)
    app.add_typer(recipe_app, name="recipe")
