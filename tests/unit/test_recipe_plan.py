"""`factory recipe cai`'s plan: every step's train config and the eval config, linked and validated before
anything runs (factory/recipe.py)."""

from pathlib import Path

import pytest
import yaml

from factory.config import ConfigError, RecipeConfig, load_recipe_config
from factory.recipe import plan, table

ROOT = Path(__file__).parents[2]


def recipe(tmp_path, **changes) -> RecipeConfig:
    data = yaml.safe_load((ROOT / "pipelines" / "cai.yaml").read_text())
    for key, value in changes.items():
        node = data
        *parents, last = key.split("__")
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
    path = tmp_path / "cai.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_recipe_config(path)


def test_plan_links_the_steps(tmp_path):
    cfg = recipe(tmp_path, output_root=str(tmp_path / "out"), methods=["dpo", "kto", "ppo"])
    p = plan(cfg, run_id="run-1")
    assert list(p.steps) == ["sft", "reward", "dpo", "kto", "ppo"]
    out = Path(cfg.output_root)
    assert p.steps["sft"].model == cfg.pipeline.models.policy.path  # SL-CAI starts from the pipeline's policy
    for step in ("reward", "dpo", "kto", "ppo"):  # everything else from the SFT model
        assert p.steps[step].model == str(out / "sft")
    for step, tc in p.steps.items():
        assert (tc.name, tc.output_root, tc.prompt_format) == (step, str(out), cfg.pipeline.models.policy.prompt_format)
        assert (tc.data.store, tc.data.runs) == (cfg.pipeline.store, ["run-1"])
    assert p.steps["ppo"].ppo.reward_model == str(out / "reward")
    # per-step settings are merged over the shared ones
    assert p.steps["sft"].optim.max_steps == cfg.steps["sft"]["optim"]["max_steps"]
    assert p.steps["dpo"].optim.max_steps == cfg.train["optim"]["max_steps"]
    assert p.steps["sft"].optim.batch_size == p.steps["dpo"].optim.batch_size == cfg.train["optim"]["batch_size"]
    # eval: each policy and the SFT model against the SFT model, the pipeline's judge, the same split
    ev = p.eval
    assert set(ev.policies) == {"sft", "dpo", "kto", "ppo"}
    assert ev.policies["dpo"].path == str(out / "dpo") and ev.reference.path == str(out / "sft")
    assert ev.judge.path == cfg.pipeline.judge.path and ev.reward_model == str(out / "reward")
    assert (ev.data.store, ev.data.runs, ev.data.eval_fraction, ev.seed) == (
        cfg.pipeline.store, ["run-1"], p.steps["sft"].data.eval_fraction, p.steps["sft"].seed)


@pytest.mark.parametrize("change, match", [
    ({"train__model": "x"}, r"train.model: set by the recipe"),
    ({"steps__dpo__data": {"store": "x.duckdb"}}, r"steps.dpo.data.store: set by the recipe"),
    ({"steps__dpo__data": {"eval_fraction": 0.5}}, r"steps.dpo: data.eval_fraction is 0.5 but 0.25 for sft"),
    ({"steps__kto": {"optim": {"max_steps": 3}}}, r"steps.kto is set but 'kto' is not in methods"),
    ({"steps__dpo__dpo": {"beta": -1}}, r"(?s)the dpo step.*dpo.beta"),
    ({"train__optim": {"max_step": 3}}, r"optim.max_step: unknown key"),
    ({"eval__reference": {"path": "x"}}, r"eval.reference: set by the recipe"),
    ({"pipeline__label": {"enabled": False}}, r"pipeline.label.enabled is false"),
    ({"methods": ["sft"]}, r"methods"),
])
def test_bad_recipe_settings_fail_before_anything_runs(tmp_path, change, match):
    with pytest.raises(ConfigError, match=match):
        plan(recipe(tmp_path, **change))


def test_table_has_a_row_per_policy_with_counts_and_intervals():
    ev = {"policies": {"sft": {"harmless_win_rate": 0.5, "harmless_win_rate_n": 4,
                               "harmless_win_rate_ci95": [0.2, 0.8], "kl": 0.0},
                       "dpo": {"harmless_win_rate": 0.75, "harmless_win_rate_n": 4,
                               "harmless_win_rate_ci95": [0.3, 0.95], "kl": 1.5}}}
    rows = table(ev)
    assert [r["policy"] for r in rows] == ["sft", "dpo"]
    assert rows[1]["harmless_win_rate"] == 0.75 and rows[1]["harmless_win_rate_n"] == 4
    assert rows[1]["harmless_win_rate_ci95"] == [0.3, 0.95] and rows[1]["kl"] == 1.5
    assert rows[0]["helpful_win_rate"] is None  # a figure not computed stays empty, never invented
