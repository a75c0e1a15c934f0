"""Training on the families users run, in chat format: a pipeline on a tiny random Llama 3 / Mistral policy
with a different, bigger judge of the same family (tests/families.py), label enabled, then SFT, soft-label DPO and
a reward model for a few steps on the policy with `prompt_format: chat`. The trainers see the chat template's
rendering (SFT masks exactly the templated prompt, ends the answer with the template's end-of-turn token), a
system prompt is folded into the first user turn for Mistral (whose template refuses a system role), and each run
saves a model that loads back and records itself in the store."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import ROOT
from factory.config import PipelineConfig, TrainConfig
from factory.store import Store

pytestmark = pytest.mark.integration
FAMILIES = ["llama3", "mistral"]  # qwen2 chat: test_family_chat (pipeline) and test_ppo_forward (training forward)
CONVERSATIONS = [
    [{"role": "user", "content": "How do I pick the lock on my neighbour's door?"}],
    [{"role": "system", "content": "Answer in one sentence."}, {"role": "user", "content": "Explain why the sky is blue."}],
    [{"role": "user", "content": "Hi! Can you help with chemistry?"}, {"role": "assistant", "content": "Sure."},
     {"role": "user", "content": "How do I make a toxic gas at home?"}],
    [{"role": "user", "content": "Write an insult about my coworker."}],
]


def _model(path):
    return {"path": str(path), "engine": "transformers", "prompt_format": "chat", "max_model_len": 1024, "batch_size": 8}


@pytest.fixture(scope="module", params=FAMILIES)
def family_store(request, family_models, tmp_path_factory):
    """(family, FamilyModels, store path): one labelled chat pipeline run, policy and judge of the family."""
    from factory.pipeline import Engines, run_pipeline

    family = request.param
    fam = family_models[family]
    tmp = tmp_path_factory.mktemp(f"train-{family}")
    prompts = tmp / "conversations.jsonl"
    prompts.write_text("".join(json.dumps({"messages": c}) + "\n" for c in CONVERSATIONS))
    short = {"max_tokens": 8, "min_tokens": 3, "temperature": 1.0}  # random weights: sample, not greedy
    cfg = PipelineConfig.model_validate({
        "name": family, "store": str(tmp / "store.duckdb"), "constitution": str(ROOT / "constitutions" / "harmless.yaml"),
        "prompts": {"path": str(prompts), "column": "messages"},
        "models": {"policy": _model(fam.policy), "judge": _model(fam.judge)},
        "generate": {"sampling": short}, "critique": {"sampling": short}, "revise": {"sampling": short},
        "label": {"enabled": True, "tie_threshold": 0.0}})
    engines = Engines(seed=0, log=lambda m: None)
    try:
        assert run_pipeline(cfg, engines=engines).status == "completed"
    finally:
        engines.close()
    return family, fam, cfg.store


def _train_cfg(store, model_dir, out, name, **sections) -> TrainConfig:
    return TrainConfig.model_validate({
        "name": name, "output_root": str(out), "model": str(model_dir), "prompt_format": "chat",
        "data": {"store": store, "eval_fraction": 0.0},
        "optim": {"max_steps": 2, "batch_size": 2, "max_length": 512, "learning_rate": 1e-3, "logging_steps": 1},
        **sections})


def _recorded(store, metrics, method):
    with Store.open(store, read_only=True) as s:
        run = s.query("SELECT kind, status FROM runs WHERE run_id = ?", [metrics["run_id"]])[0]
    assert run == {"kind": f"train-{method}", "status": "completed"}


def test_sft_dpo_and_reward_train_on_the_chat_template(family_store, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from factory.conversation import turns_of
    from factory.train.common import load_data
    from factory.train.dpo import train_dpo
    from factory.train.reward import pair_dataset, train_reward
    from factory.train.sft import load_revisions, sft_trainer, train_sft

    family, fam, store = family_store
    tok = AutoTokenizer.from_pretrained(fam.policy)

    # ---- SFT: the templated prompt is masked, the answer ends with the template's end of turn ----
    cfg = _train_cfg(store, fam.policy, tmp_path, "sft")
    trainer, data = sft_trainer(cfg)
    by_completion = {r["completion"]: r for r in data.train}
    checked = folded = 0
    stored = {r["pair_id"]: r["messages"] for r in load_revisions(cfg)}  # the conversations as stored, unfolded
    for ex in trainer.train_dataset:
        ids, labels = ex["input_ids"], ex["labels"]
        text = tok.decode([t for t, lab in zip(ids, labels) if lab != -100], skip_special_tokens=True)
        row = next((r for c, r in by_completion.items() if c.strip() and c.strip() in text), None)
        if row is None:
            continue
        turns = turns_of(row["prompt"], row["messages"])
        if fam.system_role == "refused" and turns[0]["role"] == "system":
            raise AssertionError("a system turn reached Mistral's template")  # fold_unsupported_system folds it
        if any(t["role"] == "system" for t in json.loads(stored[row["pair_id"]] or "[]")) and turns[0]["role"] == "user":
            assert turns[0]["content"].startswith("Answer in one sentence.")  # the system prompt, folded
            folded += 1
        prompt_ids = tok.apply_chat_template(turns, add_generation_prompt=True, tokenize=True,
                                             return_dict=True)["input_ids"]
        full = tok.apply_chat_template(turns + [{"role": "assistant", "content": row["completion"]}], tokenize=True,
                                       return_dict=True)["input_ids"]
        n = len(prompt_ids)
        assert ids[:n] == list(prompt_ids) and labels[:n] == [-100] * n, family  # exactly the templated prompt, masked
        # the answer is learned
        assert list(full) == ids[:len(full)] and labels[n:len(full)] == ids[n:len(full)], family
        eot = fam.eos_token_ids  # the template's end of turn: <|eot_id|>, <|im_end|>, </s>
        end = max(i for i in range(n, len(full)) if full[i] in eot)
        assert ids[end] in eot and labels[end] == ids[end], family  # ... up to and including the end of turn
        checked += 1
    assert checked >= 2, (family, checked)
    if fam.system_role == "refused":
        assert folded >= 1  # the conversation with its own system message trained, folded into the user turn
    metrics = train_sft(cfg)
    assert metrics["global_step"] == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "sft")
    _recorded(store, metrics, "sft")

    # ---- DPO with soft labels, and a reward model, on the chat rendering ----
    metrics = train_dpo(_train_cfg(store, fam.policy, tmp_path, "dpo", dpo={"soft_labels": True}))
    assert metrics["global_step"] == 2 and metrics["soft_labels"] and len(metrics["train_margins"]) == 2
    AutoModelForCausalLM.from_pretrained(tmp_path / "dpo")
    _recorded(store, metrics, "dpo")

    rm_cfg = _train_cfg(store, fam.policy, tmp_path, "rm")
    rows = load_data(rm_cfg).train
    ds = pair_dataset(rows, tok, "chat", 512)
    for r, chosen in zip(rows, ds["chosen_ids"]):
        answered = turns_of(r["prompt"], r["messages"]) + [{"role": "assistant", "content": r["chosen"]}]
        full = tok.apply_chat_template(answered, tokenize=True, return_dict=True)["input_ids"]
        assert chosen == list(full) and any(t in fam.eos_token_ids for t in chosen[-2:]), family
    metrics = train_reward(rm_cfg)
    assert metrics["global_step"] == 2 and metrics["label_mode"] == "hard"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm")
    _recorded(store, metrics, "reward")
