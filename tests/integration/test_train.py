"""Training from a real store on the tiny model: reward models (hard and soft labels), DPO, KTO, SFT and LoRA each
run a few steps, change the weights, log finite losses, save a folder that loads back, write metrics.json
with eval figures, and record a `train-<method>` run with the data it used in the store. Each trainer's test also
shows it learned on its training data: the reward margin (hard labels), the BCE to the soft labels, DPO's and
KTO's log-ratio margins, the revisions' likelihood (SFT)."""

import json
import math
import os

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
RM_STEPS = 8  # reward models: enough steps to see every training pair about once (batch 2)


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
    # the conflicts policy and what it did (factory.train.data.resolve_conflicts)
    assert saved["conflicts_policy"] == cfg.data.conflicts
    assert saved["pairs_kept"] == saved["train_pairs"] + saved["eval_pairs"]
    # the run and the data it used, in the store
    with Store.open(cfg.data.store, read_only=True) as s:
        run = s.query("SELECT * FROM runs WHERE run_id = ?", [metrics["run_id"]])[0]
    assert run["kind"] == f"train-{method}" and run["status"] == "completed"
    used = json.loads(run["config"])["data_used"]
    assert used["train_pairs"] == metrics["train_pairs"] and used["eval_pairs"] == metrics["eval_pairs"]
    assert used["pair_ids_hash"] and json.loads(run["stats"])["train_loss"] == pytest.approx(metrics["train_loss"])
    return saved


@pytest.mark.parametrize("policy", ["judge_wins", "revision_wins", "drop_both"])
def test_training_data_has_no_contradictions(store, tiny_model_dir, tmp_path, policy):
    """The store holds revision pairs and the judge's pairs over the same texts; the random judge prefers the
    response about half the time, so some pairs contradict each other. Training sees each pair of texts once, in
    one direction, settled by the policy."""
    from factory.train.data import load_pairs

    cfg = train_cfg(store, tiny_model_dir, tmp_path, f"data-{policy}", data={"conflicts": policy})
    raw = {(r["prompt_id"], r["chosen"], r["rejected"]): r["source"] for r in load_pairs(cfg.data)}
    contradicted = {k for k in raw if (k[0], k[2], k[1]) in raw}
    assert contradicted  # the store really has conflicts
    data = load_data(cfg)
    rows = data.train + data.eval
    seen = {(r["prompt_id"], r["chosen"], r["rejected"]) for r in rows}
    assert len(seen) == len(rows) and not any((p, b, a) in seen for p, a, b in seen)
    won = {r["source"] == "ai_feedback" for r in rows if (r["prompt_id"], r["chosen"], r["rejected"]) in contradicted}
    assert won == {"judge_wins": {True}, "revision_wins": {False}, "drop_both": set()}[policy]
    assert data.info["conflicts"] == len(contradicted) // 2 and data.info["conflicts_policy"] == policy


def _train_pair_rewards(cfg: TrainConfig, model_dir, tokenizer_dir):
    """Rewards of the training pairs' chosen and rejected texts (tokenized as train_reward tokenizes them) under the
    reward model in `model_dir`, and their soft labels. For the initial model the new head is initialised as
    train_reward initialises it (the same seed just before loading), so 'before training' is that exact model."""
    from transformers import set_seed

    from factory.train import common
    from factory.train.reward import load_reward_model, pair_dataset, rewards_for

    tok = common.load_tokenizer(str(tokenizer_dir), cfg)
    ds = pair_dataset(load_data(cfg).train, tok, cfg.prompt_format, cfg.optim.max_length)
    set_seed(cfg.seed)
    model = load_reward_model(str(model_dir))
    model.config.pad_token_id = tok.pad_token_id
    r_c = torch.tensor(rewards_for(model, ds["chosen_ids"], tok.pad_token_id, 8))
    r_r = torch.tensor(rewards_for(model, ds["rejected_ids"], tok.pad_token_id, 8))
    return r_c, r_r, torch.tensor(ds["label_prob"])


def test_reward_hard_labels(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from factory.train.reward import bradley_terry_loss, score_texts, train_reward

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm", optim={"max_steps": RM_STEPS})
    c0, r0, _ = _train_pair_rewards(cfg, tiny_model_dir, tiny_model_dir)
    metrics = check_run(cfg, train_reward(cfg), "reward", tiny_model_dir, AutoModelForSequenceClassification)
    out = f"{cfg.output_root}/{cfg.name}"
    # learning: on the training pairs the chosen text's reward pulls ahead of the rejected one's
    c1, r1, _ = _train_pair_rewards(cfg, out, tiny_model_dir)
    before, after = (c0 - r0).mean().item(), (c1 - r1).mean().item()
    print(f"rm hard: margin {before:.3f} -> {after:.3f}, acc {(c0 > r0).float().mean():.2f} -> "
          f"{(c1 > r1).float().mean():.2f}, bt {bradley_terry_loss(c0, r0):.3f} -> {bradley_terry_loss(c1, r1):.3f}")
    assert after > before + 0.5 and (c1 > r1).float().mean() > (c0 > r0).float().mean(), (before, after)
    assert bradley_terry_loss(c1, r1) < bradley_terry_loss(c0, r0)
    assert metrics["label_mode"] == "hard" and 0.0 <= metrics["eval_accuracy"] <= 1.0
    assert metrics["eval_loss"] == metrics["eval_bt_loss"] and math.isfinite(metrics["eval_margin"])
    # score_texts reads rewards exactly as training and evaluation did
    evals = load_data(cfg).eval
    rewards = score_texts(out, [r["prompt"] for r in evals] * 2, [r["chosen"] for r in evals] +
                          [r["rejected"] for r in evals], "plain", batch_size=3)
    r_c, r_r = rewards[:len(evals)], rewards[len(evals):]
    assert sum(c > r for c, r in zip(r_c, r_r)) / len(evals) == pytest.approx(metrics["eval_accuracy"])
    assert sum(c - r for c, r in zip(r_c, r_r)) / len(evals) == pytest.approx(metrics["eval_margin"], abs=1e-4)


def test_reward_soft_labels(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from factory.train.reward import soft_label_loss, train_reward

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm-soft", reward={"soft_labels": True},
                    optim={"max_steps": RM_STEPS})
    assert any(r["label"] < 1.0 for r in load_data(cfg).train)  # soft labels really reach the loss
    c0, r0, p = _train_pair_rewards(cfg, tiny_model_dir, tiny_model_dir)
    metrics = check_run(cfg, train_reward(cfg), "reward", tiny_model_dir, AutoModelForSequenceClassification)
    # learning: the BCE between sigmoid(r_chosen - r_rejected) and the soft labels falls on the training pairs
    c1, r1, _ = _train_pair_rewards(cfg, f"{cfg.output_root}/{cfg.name}", tiny_model_dir)
    # The random judge's labels are all near 0.5, so the BCE cannot fall far: its floor is the labels' entropy,
    # reached at r_chosen - r_rejected = logit(p). What is above the floor (the KL to the labels) must halve.
    floor = -(p * p.log() + (1 - p) * (1 - p).log()).mean().item()
    before, after = soft_label_loss(c0, r0, p).item(), soft_label_loss(c1, r1, p).item()
    print(f"rm soft: bce {before:.5f} -> {after:.5f} (floor {floor:.5f})")
    assert after < before and after - floor < 0.5 * (before - floor), (before, after, floor)
    assert metrics["label_mode"] == "soft" and metrics["eval_loss"] == metrics["eval_soft_loss"]
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_margin"])


def test_dpo(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from factory.train.dpo import train_dpo

    # any DPOConfig setting goes to TRL (config.TRL_CONFIG_CLASSES): here a checkpoint every 2 steps
    cfg = train_cfg(store, tiny_model_dir, tmp_path, "dpo",
                    dpo={"beta": 0.2, "lr_scheduler_type": "constant", "save_strategy": "steps", "save_steps": 2})
    metrics = check_run(cfg, train_dpo(cfg), "dpo", tiny_model_dir, AutoModelForCausalLM)
    assert (tmp_path / "out" / "dpo" / "checkpoint-2").is_dir()
    assert metrics["train_losses"][0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at step 1
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_margin"])
    assert metrics["eval_rewards/accuracies"] == metrics["eval_accuracy"] and metrics["beta"] == 0.2
    # learning: the first batch's margin is 0 (policy == reference); the training batches' margins then grow
    margins = metrics["train_margins"]
    assert len(margins) == 3 and margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 0.0


def test_soft_dpo_loss_is_trl_dpo_at_labels_1_and_0(store, tiny_model_dir, tmp_path):
    """factory's soft-label loss on TRL's DPOTrainer, against TRL's own sigmoid loss on the same batch: equal at
    label 1, equal to the swapped pairs at label 0, conservative DPO at 1 - eps, and neither in between. The
    reference is a perturbed copy, so the log-ratio margins are not 0 (at 0 every label gives log 2)."""
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from factory.train import common
    from factory.train.data import preference_dataset
    from factory.train.soft_dpo import soft_dpo_trainer

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "soft-dpo-loss", dpo={"beta": 0.5, "soft_labels": True})
    rows = load_data(cfg).train[:4]
    tok = common.load_tokenizer(str(tiny_model_dir), cfg)
    ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in ref.model.layers[0].parameters():
            p.add_(torch.randn_like(p) * 0.05)

    def loss(make, pairs, label=None):
        cols = ["prompt", "chosen", "rejected"] + (["label_prob"] if label is not None else [])
        ds = preference_dataset([{**r, "label": 1.0 if label is None else label} for r in pairs]).select_columns(cols)
        args = DPOConfig(**{**common.trl_common_args(cfg, tmp_path / "x"), "per_device_train_batch_size": len(pairs)},
                         beta=0.5, max_length=128)
        trainer = make(model=str(tiny_model_dir), ref_model=ref, args=args, train_dataset=ds, processing_class=tok)
        batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        with torch.no_grad():
            return trainer.compute_loss(trainer.model, batch).item()

    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    hard, hard_swapped = loss(DPOTrainer, rows), loss(DPOTrainer, swapped)
    assert abs(hard - math.log(2)) > 1e-3 and abs(hard - hard_swapped) > 1e-3  # the margins are not 0
    assert loss(soft_dpo_trainer, rows, 1.0) == pytest.approx(hard, rel=1e-5)
    assert loss(soft_dpo_trainer, rows, 0.0) == pytest.approx(hard_swapped, rel=1e-5)
    # one global label 1 - eps: conservative DPO, (1 - eps) * loss(pairs) + eps * loss(swapped pairs)
    assert loss(soft_dpo_trainer, rows, 0.8) == pytest.approx(0.8 * hard + 0.2 * hard_swapped, rel=1e-5)


def test_soft_dpo_trains(store, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from factory.train.dpo import train_dpo

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "dpo-soft", dpo={"beta": 0.2, "soft_labels": True})
    assert any(r["label"] < 1.0 for r in load_data(cfg).train)  # soft labels really reach the loss
    metrics = check_run(cfg, train_dpo(cfg), "dpo", tiny_model_dir, AutoModelForCausalLM)
    assert metrics["soft_labels"] and metrics["train_losses"][0] == pytest.approx(math.log(2), abs=1e-4)
    margins = metrics["train_margins"]  # the soft targets (>= 0.5 for the chosen side) still push the margin up
    assert margins[0] == pytest.approx(0.0, abs=1e-6) and margins[-1] > 0.0
    assert 0.0 <= metrics["eval_accuracy"] <= 1.0 and math.isfinite(metrics["eval_margin"])


def test_kto(store, tiny_model_dir, tmp_path):
    """KTO runs, and learns: on the training rows the KL-relative reward log pi(y|x) - log pi_ref(y|x) (0 for every
    row before training, the policy starting as its reference) rises for the desirable completions above the
    undesirable ones."""
    from transformers import AutoModelForCausalLM

    from factory.train.data import unpaired_dataset
    from factory.train.kto import train_kto

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "kto", kto={"desirable_weight": 1.0, "undesirable_weight": 1.5})
    metrics = check_run(cfg, train_kto(cfg), "kto", tiny_model_dir, AutoModelForCausalLM)
    for key in ("eval_kl", "eval_rewards/chosen", "eval_rewards/rejected", "eval_margin"):
        assert math.isfinite(metrics[key]), key
    assert metrics["undesirable_weight"] == 1.5
    rows = unpaired_dataset(load_data(cfg).train, "plain")[0].to_list()
    ratio = [a - b for a, b in zip(_completion_logps(f"{cfg.output_root}/kto", rows)[0],
                                   _completion_logps(tiny_model_dir, rows)[0])]
    good = [r for r, row in zip(ratio, rows) if row["label"]]
    bad = [r for r, row in zip(ratio, rows) if not row["label"]]
    margin = sum(good) / len(good) - sum(bad) / len(bad)
    print(f"kto: {len(good)} desirable, {len(bad)} undesirable, log-ratio margin 0 -> {margin:.3f}")
    assert good and bad and margin > 1.0, (margin, good, bad)


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


def test_dpo_under_accelerate_launch_with_two_processes_writes_once(store, tiny_model_dir, tmp_path):
    """Two processes under `accelerate launch` on the CPU (DDP over gloo): both train; only the main one saves the
    model and writes metrics.json and the store (a second writer would wait on the store's lock or fail).
    `--multi_gpu` is accelerate's torchrun launcher; on a machine without GPUs the trainer's `use_cpu` makes it
    gloo. (`--cpu --num_processes 2` starts one process unless MPI is installed.)"""
    import subprocess
    import sys

    import yaml

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "dpo-ddp", optim={"max_steps": 2})
    path = tmp_path / "dpo-ddp.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    with Store.open(store, read_only=True) as s:
        before = s.query("SELECT count(*) AS n FROM runs WHERE name = 'dpo-ddp'")[0]["n"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "factory.cli", "train", "dpo", "--config", str(path)],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with Store.open(store, read_only=True) as s:
        runs = s.query("SELECT * FROM runs WHERE name = 'dpo-ddp' AND kind = 'train-dpo'")
    assert len(runs) - before == 1 and runs[-1]["status"] == "completed"
    out = tmp_path / "out" / "dpo-ddp"
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["run_id"] == runs[-1]["run_id"] and saved["global_step"] == 2 and saved["processes"] == 2
    after = load_file(out / "model.safetensors")[WEIGHT]
    assert not torch.equal(load_file(tiny_model_dir / "model.safetensors")[WEIGHT], after)


def test_eval_policies_side_by_side_with_judge_logratios_sets_and_reward_model(store, tiny_model_dir, tmp_path):
    """`factory eval` with two policies (a DPO-trained copy and the reference itself): per policy, harmlessness and
    helpfulness win rates judged in both orders, held-out pair accuracy, KL to the reference, harmless and
    over-refusal rates on the shipped sets, reward-model score; every rate with its count and 95% interval; no
    evaluated prompt on the training side; recorded in the store."""
    from factory.config import EvalConfig
    from factory.train.dpo import train_dpo
    from factory.train.evaluate import evaluate
    from factory.train.reward import train_reward

    rm_cfg = train_cfg(store, tiny_model_dir, tmp_path, "rm-for-eval")
    train_reward(rm_cfg)
    pol_cfg = train_cfg(store, tiny_model_dir, tmp_path, "dpo-for-eval")
    dpo_metrics = train_dpo(pol_cfg)
    model = {"engine": "transformers", "max_model_len": 1024, "batch_size": 4}
    reference = {**model, "path": str(tiny_model_dir)}
    cfg = EvalConfig.model_validate({
        "name": "eval", "output_root": str(tmp_path / "out"),
        "policies": {"dpo": {**model, "path": f"{pol_cfg.output_root}/{pol_cfg.name}"}, "base": reference},
        "reference": reference, "reward_model": f"{rm_cfg.output_root}/{rm_cfg.name}", "max_set_prompts": 3,
        "data": {"store": store, "eval_fraction": 0.2}, "sampling": {"max_tokens": 8}})
    m = evaluate(cfg)
    assert set(m["policies"]) == {"dpo", "base"} and m["prompts"] >= 1 and m["heldout_pairs"] >= 1
    assert m["sets"] == {"redteam_set": {"path": "data/eval_redteam.jsonl", "prompts": 3},
                         "ordinary_set": {"path": "data/eval_ordinary.jsonl", "prompts": 3}}
    rates = {"harmless_win_rate": m["prompts"], "helpful_win_rate": m["prompts"], "pair_accuracy": m["heldout_pairs"],
             "harmless_rate": 3, "over_refusal_rate": 3}
    for name, f in m["policies"].items():
        for key, n in rates.items():  # every rate with its count and 95% interval
            assert f[f"{key}_n"] == n and f[key] is not None, (name, key)
            assert 0.0 <= f[f"{key}_ci95"][0] <= f[key] <= f[f"{key}_ci95"][1] <= 1.0, (name, key)
        assert len(f["harmless_win_rate_p_policy_better"]) == m["prompts"] == len(f["helpful_win_rate_p_policy_better"])
        assert f["kl_n"] == m["prompts"] and math.isfinite(f["kl"]) and math.isfinite(f["reward_mean"])
        assert all(0.0 <= p <= 1.0 for p in f["harmless_p_harmful"] + f["over_refusal_p_refusal"])
    base, dpo = m["policies"]["base"], m["policies"]["dpo"]
    # the reference against itself: no KL, no implicit reward (no pair ranked), identical completions tie
    assert base["kl"] == 0.0 and base["kl_se"] == 0.0 and base["pair_margin"] == 0.0 and base["pair_accuracy"] == 0.0
    assert all(p == pytest.approx(0.5) for p in base["harmless_win_rate_p_policy_better"])
    # DPO moved away from the reference: its implicit reward and KL are not zero; its held-out pair accuracy is
    # the one TRL's DPOTrainer reported at the end of training on the same pairs (rewards/accuracies)
    assert dpo["kl"] != 0.0 and dpo["pair_margin"] != 0.0
    if m["heldout_pairs"] == dpo_metrics["eval_pairs"]:
        assert dpo["pair_accuracy"] == pytest.approx(dpo_metrics["eval_accuracy"], abs=1e-6)
    # the split is training's: no evaluated prompt is on the training side
    trained_on = {r["prompt_id"] for r in load_data(pol_cfg).train}
    assert m["prompt_ids"] and not trained_on & set(m["prompt_ids"])
    assert 0.0 <= m["reward_accuracy"] <= 1.0 and m["reward_accuracy_n"] == m["heldout_pairs"]
    assert m["reward_accuracy_ci95"][0] <= m["reward_accuracy"] <= m["reward_accuracy_ci95"][1]
    assert math.isfinite(m["reference_reward_mean"])
    saved = json.loads((tmp_path / "out" / "eval" / "metrics.json").read_text())
    assert saved["policies"]["dpo"]["pair_accuracy"] == dpo["pair_accuracy"]
    with Store.open(store, read_only=True) as s:
        run = s.query("SELECT status, stats FROM runs WHERE run_id = ?", [m["run_id"]])[0]
    assert run["status"] == "completed" and json.loads(run["stats"])["policies"]["base"]["kl"] == 0.0


def _completion_logps(model_dir, examples) -> tuple[list[float], list[int]]:
    """Log-likelihood of each plain prompt-completion example's completion tokens under a model, and their counts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    logps, counts = [], []
    with torch.no_grad():
        for ex in examples:
            p = tok(ex["prompt"], add_special_tokens=False)["input_ids"]
            c = tok(ex["completion"], add_special_tokens=False)["input_ids"]
            ids = torch.tensor([[tok.bos_token_id] + p + c])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1)
            tok_lp = logp.gather(1, ids[0, 1:, None])[:, 0][-len(c):]
            logps.append(float(tok_lp.sum()))
            counts.append(len(c))
    return logps, counts


def _completion_nll(model_dir, examples) -> float:
    """Mean negative log-likelihood per completion token of plain prompt-completion examples under a model."""
    logps, counts = _completion_logps(model_dir, examples)
    return -sum(logps) / sum(counts)


def test_sft_on_final_revisions_masks_the_prompt_and_learns(store, tiny_model_dir, tmp_path):
    """SL-CAI: TRL's SFT on the last revision of each response. The prompt is masked from the loss (labels -100
    up to the completion), the held-out prompts are DPO's, and the revisions' likelihood rises."""
    from transformers import AutoModelForCausalLM

    from factory.train.data import render_prompt, split_by_prompt
    from factory.train.sft import _example, load_revisions, sft_trainer, train_sft

    cfg = train_cfg(store, tiny_model_dir, tmp_path, "sft", optim={"max_steps": 12, "learning_rate": 3e-3})
    rows = load_revisions(cfg)
    with Store.open(store, read_only=True) as s:  # the final round of each response that parsed, deduplicated
        final = s.query("SELECT DISTINCT prompt_id, text FROM revisions v WHERE status = 'ok' AND round = "
                        "(SELECT max(round) FROM revisions w WHERE w.response_id = v.response_id AND w.status = 'ok')")
    assert sorted((r["prompt_id"], r["completion"]) for r in rows) == sorted((f["prompt_id"], f["text"]) for f in final)
    # the split by prompt is the one DPO uses: no held-out prompt of DPO is trained on here
    train_rows, _ = split_by_prompt(rows, cfg.data.eval_fraction, cfg.seed)
    dpo_eval = {r["prompt_id"] for r in load_data(train_cfg(store, tiny_model_dir, tmp_path, "d")).eval}
    assert dpo_eval and not dpo_eval & {r["prompt_id"] for r in train_rows}

    examples = [_example(render_prompt(r["prompt"], "chat", r["messages"]), r["completion"], "plain")
                for r in train_rows]
    trainer, data = sft_trainer(cfg)
    tok = trainer.processing_class
    for ex, raw in zip(trainer.train_dataset.select(range(3)), examples):
        n_prompt = 1 + len(tok(raw["prompt"], add_special_tokens=False)["input_ids"])  # <bos> + the prompt
        ids, labels = ex["input_ids"], ex["labels"]
        assert n_prompt > 5 and labels[:n_prompt] == [-100] * n_prompt  # the prompt is not learned
        assert labels[n_prompt:] == ids[n_prompt:] and len(ids) > n_prompt  # the revision is

    before = _completion_nll(tiny_model_dir, examples)
    metrics = train_sft(cfg)
    after = _completion_nll(f"{cfg.output_root}/sft", examples)
    assert after < before - 0.1, (before, after)  # learning: the training revisions became likelier
    assert metrics["global_step"] == 12 and math.isfinite(metrics["eval_loss"])
    assert metrics["train_revisions"] == len(train_rows) > 0 and metrics["eval_revisions"] == len(rows) - len(train_rows)
    AutoModelForCausalLM.from_pretrained(f"{cfg.output_root}/sft")  # loads back as a plain causal LM
    with Store.open(store, read_only=True) as s:
        run = s.query("SELECT kind, status FROM runs WHERE run_id = ?", [metrics["run_id"]])[0]
    assert run == {"kind": "train-sft", "status": "completed"}
