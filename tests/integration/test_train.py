"""Training from a real store on the tiny model: reward models (hard and soft labels), DPO, KTO and LoRA each
run a few steps, change the weights, log finite losses, save a folder that loads back, write metrics.json
with eval figures, and record a `train-<method>` run with the data it used in the store."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_pipeline_cfg
from factory.config import TrainConfig
from factory.pipeline import run_pipeline
from factory.store import Store
from factory.train.common import load_data

pytestmark = pytest.mark.integration
WEIGHT = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, engines):
    """A store with revision pairs and AI-labelled pairs; tie_threshold 0 keeps the random judge's labels
    (all near 0.5), so soft-label training sees labels below 1."""
    tmp = tmp_path_factory.mktemp("train-store")
    cfg = tiny_pipeline_cfg(tmp, tiny_model_dir, "vllm", label={"enabled": True, "tie_threshold": 0.0})
    assert run_pipeline(cfg, engines=engines).status == "completed"
    with Store.open(cfg.store, read_only=True) as s:
        kept = s.query("SELECT source, count(*) AS n FROM preference_pairs WHERE dropped_reason IS NULL GROUP BY source")
    assert sum(r["n"] for r in kept) >= 6, kept
    return cfg.store


def train_cfg(store, model_dir, tmp_path, name, **sections) -> TrainConfig:
    data = {"name": name, "output_root": str(tmp_path / "out"), "model": str(model_dir),
            "data": {"store": store, "eval_fraction": 0.2},
            "optim": {"max_steps": 3, "batch_size": 2, "max_length": 128, "learning_rate": 1e-3, "logging_steps": 1}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return TrainConfig.model_validate(data)


def check_run(cfg: TrainConfig, metrics: dict, method: str, model_dir, auto_cls):
    out = f"{cfg.output_root}/{cfg.name}"
    # losses: one per step, all finite
    assert len(metrics["train_losses"]) == cfg.optim.max_steps and metrics["global_step"] == cfg.optim.max_steps
    assert all(math.isfinite(x) for x in metrics["train_losses"] + [metrics["train_loss"], metrics["eval_loss"]])
    # weights changed
    before, after = load_file(model_dir / "model.safetensors")[WEIGHT], load_file(f"{out}/model.safetensors")[WEIGHT]
    assert before.shape == after.shape and not torch.equal(before, after)
    # the artefact loads back and runs
    model = auto_cls.from_pretrained(out)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, 236787, 5631, 1]])).logits
    assert torch.isfinite(logits).all()
    # metrics.json with eval figures
    saved = json.loads(open(f"{out}/metrics.json").read())
    assert saved == json.loads(json.dumps(metrics)) and saved["eval_pairs"] > 0 and saved["train_pairs"] > 0
    # the run and the data it used, in the store
    with Store.open(cfg.data.store, read_only=True) as s:
        run = s.query("SELECT * FROM runs WHERE run_id = ?", [metrics["run_id"]])[0]
    assert run["kind"] == f"train-{method}" and run["status"] == "completed"
    used = json.loads(run["config"])["data_used"]
    assert used["train_pairs"] == metrics["train_pairs"] and used["eval_pairs"] == metrics["eval_pairs"]
    assert used["pair_ids_hash"] and json.loads(run["stats"])["train_loss"] == pytest.approx(metrics["train_loss"])
    return saved


def test_reward_hard_labels(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from factory.train.reward import score_texts, train_reward

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm")
    metrics = check_run(cfg, train_reward(cfg), "reward", tiny_model_dir, AutoModelForSequenceClassification)
    assert metrics["label_mode"] == "hard" and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_loss"] == metrics["eval_bt_loss"] and math.isfinite(metrics["eval_margin"])
    # score_texts reads rewards exactly as training and evaluation did
    evals = load_data(cfg).eval
    out = f"{cfg.output_root}/{cfg.name}"
    rewards = score_texts(out, [r["prompt"] for r in evals] * 2, [r["chosen"] for r in evals] +
                          [r["rejected"] for r in evals], "plain", batch_size=3)
    r_c, r_r = rewards[:len(evals)], rewards[len(evals):]
    assert sum(c > r for c, r in zip(r_c, r_r)) / len(evals) == pytest.approx(metrics["eval_accuracy"])
    assert sum(c - r for c, r in zip(r_c, r_r)) / len(evals) == pytest.approx(metrics["eval_margin"], abs=1e-4)


def test_reward_soft_labels(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from factory.train.reward import train_reward

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm-soft", reward={"soft_labels": True})
    assert any(r["label"] < 1.0 for r in load_data(cfg).train)  # soft labels really reach the loss
    metrics = check_run(cfg, train_reward(cfg), "reward", tiny_model_dir, AutoModelForSequenceClassification)
    assert metrics["label_mode"] == "soft" and metrics["eval_loss"] == metrics["eval_soft_loss"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_margin"])


def test_dpo(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from factory.train.dpo import train_dpo

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "dpo", dpo={"beta": 0.2})
    metrics = check_run(cfg, train_dpo(cfg), "dpo", tiny_model_dir, AutoModelForCausalLM)
    assert metrics["train_losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_margin"])
    assert metrics["eval_rewards/accuracies"] == metrics["eval_accuracy"] and metrics["beta"] == 0.2


def test_kto(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from factory.train.kto import train_kto

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "kto", kto={"desirable_weight": 1.0, "undesirable_weight": 1.5})
    metrics = check_run(cfg, train_kto(cfg), "kto", tiny_model_dir, AutoModelForCausalLM)
    for key in ("eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_margin"):
        assert math.isfinite(metrics[key]), key
    assert metrics["undesirable_weight"] == 1.5


def test_reward_with_lora_trains_adapters_and_saves_a_merged_model(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from factory.train.reward import train_reward

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm-lora", lora={"enabled": True, "r": 4, "alpha": 8})
    metrics = check_run(cfg, train_reward(cfg), "reward", tiny_model_dir, AutoModelForSequenceClassification)
    assert metrics["lora"] and metrics["lora_merged"]
    adapter = load_file(f"{metrics['adapter_dir']}/adapter_model.safetensors")
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: non-zero means trained
    assert any(k.endswith("score.weight") for k in adapter)  # the new reward head is trained and saved too


def test_eval_policy_against_reference_with_judge_and_reward_model(store, tiny_model_dir, tmp_path):
    """`factory eval`: win rate judged in both orders, reward-model scores and held-out accuracy, recorded."""
    from factory.config import EvalConfig
    from factory.train.dpo import train_dpo
    from factory.train.evaluate import evaluate
    from factory.train.reward import train_reward

    rm_cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm-for-eval")
    train_reward(rm_cfg)
    pol_cfg = train_cfg(store, tiny_model_dir, tmp_path, "dpo-for-eval")
    train_dpo(pol_cfg)
    model = {"engine": "transformers", "max_model_len": 1024, "batch_size": 4}
    cfg = EvalConfig.model_validate({
        "name": "eval", "output_root": str(tmp_path / "out"),
        "policy": {**model, "path": f"{pol_cfg.output_root}/{pol_cfg.name}"},
        "reference": {**model, "path": str(tiny_model_dir)},
        "reward_model": f"{rm_cfg.output_root}/{rm_cfg.name}",
        "data": {"store": store, "eval_fraction": 0.2}, "sampling": {"max_tokens": 8}})
    m = evaluate(cfg)
    assert m["prompts"] >= 1 and len(m["p_policy_better"]) == m["prompts"]
    assert all(0.0 <= p <= 1.0 for p in m["p_policy_better"]) and 0.0 <= m["win_rate"] <= 1.0
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and m["heldout_pairs"] >= 1
    assert math.isfinite(m["policy_reward_mean"]) and math.isfinite(m["reference_reward_mean"])
    assert (tmp_path / "out" / "eval" / "metrics.json").is_file()
    with Store.open(store, read_only=True) as s:
        assert s.query("SELECT status FROM runs WHERE run_id = ?", [m["run_id"]])[0]["status"] == "completed"
