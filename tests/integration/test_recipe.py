"""`factory recipe cai` end to end on the tiny model: pipeline -> SFT -> reward model -> DPO and PPO from the SFT
model -> eval against the SFT model, one table; a second run reuses every finished step."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from conftest import tiny_pipeline_cfg
from factory.cli import app
from factory.store import Store

pytestmark = pytest.mark.integration


def test_recipe_cai_runs_every_step_and_prints_its_table(tmp_path, tiny_model_dir):
    pipeline = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "transformers",
                                 label={"enabled": True, "tie_threshold": 0.0}).model_dump(mode="json")
    out = tmp_path / "cai"
    recipe = {
        "name": "cai-test", "output_root": str(out), "pipeline": pipeline, "methods": ["dpo", "ppo"],
        "train": {"data": {"eval_fraction": 0.34},
                  "optim": {"max_steps": 2, "batch_size": 2, "max_length": 128, "learning_rate": 1e-3,
                            "logging_steps": 1},
                  "dpo": {"soft_labels": True},
                  "ppo": {"rollout_batch_size": 2, "mini_batch_size": 2, "max_new_tokens": 6}},
        "eval": {"max_prompts": 2, "max_set_prompts": 3, "sampling": {"max_tokens": 8}},
    }
    path = tmp_path / "cai.yaml"
    path.write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["recipe", "cai", "--config", str(path)])
    assert result.exit_code == 0, result.output
    for col in ("harmless win", "helpful win", "KL to SFT", "reward model accuracy"):
        assert col in result.output.replace("\n", " ") or col.split()[0] in result.output
    report = json.loads((out / "recipe.json").read_text())
    assert [r["policy"] for r in report["table"]] == ["sft", "dpo", "ppo"]
    sft_row = report["table"][0]
    assert sft_row["kl"] == 0.0  # the SFT model against itself
    for row in report["table"]:
        assert row["harmless_win_rate_n"] == row["helpful_win_rate_n"] > 0 and row["harmless_win_rate_ci95"]
    with Store.open(pipeline["store"], read_only=True) as s:
        runs = {r["kind"]: r for r in s.query("SELECT * FROM runs")}
    assert {"pipeline", "train-sft", "train-reward", "train-dpo", "train-ppo", "eval"} <= set(runs)
    configs = {k: json.loads(r["config"]) for k, r in runs.items() if k.startswith("train-")}
    assert configs["train-sft"]["model"] == str(tiny_model_dir)  # SL-CAI starts from the pipeline's policy
    for kind in ("train-reward", "train-dpo", "train-ppo"):  # the rest from the SFT model, on the pipeline's rows
        assert configs[kind]["model"] == str(out / "sft")
        assert configs[kind]["data"]["runs"] == [report["pipeline_run"]]
    assert configs["train-ppo"]["ppo"]["reward_model"] == str(out / "reward")

    # again: the pipeline adopts its finished stages, every step and the evaluation are reused, same table
    again = CliRunner().invoke(app, ["recipe", "cai", "--config", str(path)])
    assert again.exit_code == 0, again.output
    report2 = json.loads((out / "recipe.json").read_text())
    assert set(report2["steps"]) == {"sft", "reward", "dpo", "ppo", "eval"}
    assert all(s["reused"] for s in report2["steps"].values()) and not any(s["reused"] for s in report["steps"].values())
    assert report2["table"] == report["table"]
    with Store.open(pipeline["store"], read_only=True) as s:
        kinds = [r["kind"] for r in s.query("SELECT kind FROM runs")]
    assert kinds.count("train-sft") == 1 and kinds.count("eval") == 1


def test_recipe_with_a_bad_setting_exits_2_before_anything_runs(tmp_path, tiny_model_dir):
    pipeline = tiny_pipeline_cfg(tmp_path, tiny_model_dir, "transformers",
                                 label={"enabled": True}).model_dump(mode="json")
    path = tmp_path / "cai.yaml"
    path.write_text(yaml.safe_dump({"pipeline": pipeline, "output_root": str(tmp_path / "o"),
                                    "steps": {"sft": {"optim": {"max_steps": 0}}}}))
    result = CliRunner().invoke(app, ["recipe", "cai", "--config", str(path)])
    assert result.exit_code == 2 and "optim.max_steps" in result.output, result.output
    assert not (tmp_path / "store.duckdb").exists() and not (tmp_path / "o").exists()
