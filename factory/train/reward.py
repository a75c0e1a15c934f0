"""Reward models from the store's preference pairs: a sequence-classification head (one output, the reward)
on the base model, trained on (prompt + chosen, prompt + rejected).

Hard labels (default): TRL's `RewardTrainer`, the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected).
Our `margin` column is dropped before it reaches TRL: TRL would read it as a required reward gap
(-log sigmoid(r_c - r_r - margin)), which is not what our margin (the judge's agreement, 2p - 1) means.

Soft labels (`reward.soft_labels`): the stored P(chosen) is the target,
    soft_label_loss = BCE_with_logits(r_chosen - r_rejected, p).
This loss is written by hand because TRL's trainer has only hard labels plus a margin. It runs on plain
`transformers.Trainer` with its `compute_loss_func` hook and a collator that stacks chosen over rejected and
passes p as `labels`: no subclass, and the optimiser, schedule, gradient accumulation, logging, bf16 and
LoRA handling stay the same as in hard mode (an explicit torch loop would have to re-implement all of them).
With p = 1 the soft loss is exactly the Bradley-Terry loss.

Both modes tokenize with `encode` (prompt + completion + EOS, or the chat template), the same function
`score_texts` uses, so rewards at PPO / evaluation time are read from the same token positions as in training.
Evaluation on the held-out pairs: accuracy (reward(chosen) > reward(rejected)), mean margin, eval loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from factory.config import TrainConfig
from factory.train import common, trl_utils
from factory.train.data import preference_dataset, render_completion, render_prompt


def soft_label_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, p: torch.Tensor,
                    reduction: str = "mean") -> torch.Tensor:
    """BCE between sigmoid(r_chosen - r_rejected) and the soft label p = P(chosen is better)."""
    diff = r_chosen - r_rejected
    return F.binary_cross_entropy_with_logits(diff, p.to(diff.dtype), reduction=reduction)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """The hard-label loss TRL's RewardTrainer uses (without margin)."""
    return -F.logsigmoid(r_chosen - r_rejected).mean()


def encode(tokenizer, prompt, completion) -> list[int]:
    """Token ids of an already rendered prompt + completion, exactly as TRL's RewardTrainer builds them."""
    if isinstance(prompt, list):  # chat format: messages
        return list(tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"])
    text = prompt + completion
    return tokenizer(text if text.endswith(tokenizer.eos_token) else text + tokenizer.eos_token)["input_ids"]


def pad_batch(seqs: list[list[int]], pad_id: int) -> dict:
    ids = [torch.tensor(s, dtype=torch.long) for s in seqs]
    return {"input_ids": torch.nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=pad_id),
            "attention_mask": torch.nn.utils.rnn.pad_sequence([torch.ones_like(i) for i in ids], batch_first=True)}


def pair_dataset(rows: list[dict], tokenizer, fmt: str, max_length: int):
    """Tokenized pairs (chosen_ids, rejected_ids, label_prob); pairs longer than max_length are dropped, as TRL does."""
    ds = preference_dataset(rows, fmt)
    # Tokenized here rather than in `ds.map`: datasets would hash the whole tokenizer to fingerprint the map
    # (seconds for Gemma's 262k vocabulary).
    for key in ("chosen", "rejected"):
        ds = ds.add_column(f"{key}_ids", [encode(tokenizer, p, c) for p, c in zip(ds["prompt"], ds[key])])
    ds = ds.filter(lambda ex: max(len(ex["chosen_ids"]), len(ex["rejected_ids"])) <= max_length)
    return ds.select_columns(["chosen_ids", "rejected_ids", "label_prob"])


def soft_collator(pad_id: int):
    def collate(examples: list[dict]) -> dict:
        batch = pad_batch([e["chosen_ids"] for e in examples] + [e["rejected_ids"] for e in examples], pad_id)
        batch["labels"] = torch.tensor([e["label_prob"] for e in examples], dtype=torch.float32)
        return batch
    return collate


def soft_loss_for_trainer(outputs, labels, num_items_in_batch=None):
    """`compute_loss_func` for transformers.Trainer: it divides by the pairs in the whole accumulated batch
    (Trainer treats a loss from compute_loss_func as already scaled for gradient accumulation)."""
    r_chosen, r_rejected = outputs.logits.squeeze(-1).float().chunk(2)
    loss = soft_label_loss(r_chosen, r_rejected, labels, reduction="sum")
    return loss / (num_items_in_batch if num_items_in_batch is not None else labels.numel())


@torch.no_grad()
def rewards_for(model, seqs: list[list[int]], pad_id: int, batch_size: int) -> list[float]:
    """Rewards of token sequences, batched by similar length, in input order."""
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
    out = [0.0] * len(seqs)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = {k: v.to(device) for k, v in pad_batch([seqs[i] for i in idx], pad_id).items()}
        for i, r in zip(idx, model(**batch, use_cache=False).logits[:, 0].float().tolist()):
            out[i] = r
    return out


def evaluate_pairs(model, ds, pad_id: int, batch_size: int, soft: bool) -> dict:
    if ds is None or len(ds) == 0:
        return {"eval_pairs_used": 0}
    r_c = torch.tensor(rewards_for(model, ds["chosen_ids"], pad_id, batch_size))
    r_r = torch.tensor(rewards_for(model, ds["rejected_ids"], pad_id, batch_size))
    p = torch.tensor(ds["label_prob"])
    bt, sl = bradley_terry_loss(r_c, r_r).item(), soft_label_loss(r_c, r_r, p).item()
    return {"eval_pairs_used": len(ds), "eval_accuracy": (r_c > r_r).float().mean().item(),
            "eval_margin": (r_c - r_r).mean().item(), "eval_loss": sl if soft else bt,
            "eval_bt_loss": bt, "eval_soft_loss": sl, "eval_reward_mean": torch.cat([r_c, r_r]).mean().item()}


def load_reward_model(path: str, trust_remote_code: bool = False):
    from transformers import AutoModelForSequenceClassification
    from trl.trainer.reward_trainer import suppress_seqcls_warning  # hides "score.weight newly initialized"

    with suppress_seqcls_warning():
        return AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, dtype=torch.float32,
                                                                  trust_remote_code=trust_remote_code)


def train_reward(cfg: TrainConfig) -> dict:
    from transformers import Trainer, set_seed
    from trl import RewardConfig, RewardTrainer

    data, out, path = common.load_data(cfg), common.output_dir(cfg), common.model_path(cfg)
    tok = common.load_tokenizer(path, cfg)
    train_ds = pair_dataset(data.train, tok, cfg.prompt_format, cfg.optim.max_length)
    eval_ds = pair_dataset(data.eval, tok, cfg.prompt_format, cfg.optim.max_length) if data.eval else None
    if len(train_ds) == 0:
        raise ValueError(f"every training pair is longer than optim.max_length={cfg.optim.max_length} tokens")
    set_seed(cfg.seed)  # the new reward head is initialised randomly
    model = load_reward_model(path, cfg.trust_remote_code)
    model.config.pad_token_id = tok.pad_token_id  # the head reads the reward at the last non-pad token
    peft_cfg = common.peft_config(cfg, "SEQ_CLS")
    # RewardConfig in both paths: the soft-label path's plain Trainer reads its TrainingArguments part
    args = RewardConfig(**common.trl_args(cfg, "reward", out, max_length=cfg.optim.max_length))
    if cfg.reward.soft_labels:
        from peft import get_peft_model
        from trl.trainer.utils import disable_dropout_in_model

        if peft_cfg is not None:
            model = get_peft_model(model, peft_cfg)
            if cfg.optim.gradient_checkpointing:
                model.enable_input_require_grads()
        disable_dropout_in_model(model)  # as TRL's trainers do (RewardConfig.disable_dropout)
        trainer = Trainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                          data_collator=soft_collator(tok.pad_token_id), processing_class=tok,
                          compute_loss_func=soft_loss_for_trainer)
    else:
        pairs = ["chosen_ids", "rejected_ids"]
        trainer = RewardTrainer(model=model, args=args, train_dataset=train_ds.select_columns(pairs),
                                eval_dataset=eval_ds.select_columns(pairs) if eval_ds else None,
                                processing_class=tok, peft_config=peft_cfg)
    result = trainer.train()
    metrics = {**trl_utils.base_metrics(cfg, "reward", data, out),
               "label_mode": "soft" if cfg.reward.soft_labels else "hard", "train_pairs_used": len(train_ds),
               **trl_utils.train_summary(trainer, result),
               **evaluate_pairs(trainer.model, eval_ds, tok.pad_token_id, cfg.optim.batch_size, cfg.reward.soft_labels)}
    metrics.update(trl_utils.save_trained(trainer, tok, out, path))
    return trl_utils.finish_run(cfg, "reward", data, out, metrics)


def load_scorer(model_dir: str, prompt_format: str = "plain", batch_size: int = 8, max_length: int | None = None,
                trust_remote_code: bool = False):
    """Load a reward model trained with `train_reward` once; returns `score(prompts, completions) -> rewards`
    for raw (unrendered) prompts and completions. Sequences longer than max_length keep their last
    max_length tokens (the reward is read at the end). `score.model` / `score.tokenizer` are the loaded pair."""
    tok = common.load_tokenizer(str(model_dir), TrainConfig(trust_remote_code=trust_remote_code))
    model = load_reward_model(str(model_dir), trust_remote_code)
    model.config.pad_token_id = tok.pad_token_id
    if torch.cuda.is_available():
        model = model.cuda()

    def score(prompts: list[str], completions: list[str]) -> list[float]:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        seqs = [encode(tok, render_prompt(p, prompt_format), render_completion(c, prompt_format))
                for p, c in zip(prompts, completions)]
        if max_length:
            seqs = [s[-max_length:] for s in seqs]
        return rewards_for(model, seqs, tok.pad_token_id, batch_size)

    score.model, score.tokenizer = model, tok
    return score


def score_texts(model_dir: str, prompts: list[str], completions: list[str], prompt_format: str = "plain",
                batch_size: int = 8, max_length: int | None = None, trust_remote_code: bool = False) -> list[float]:
    """One-off scoring (loads the model each call; use `load_scorer` to score repeatedly, e.g. in PPO)."""
    return load_scorer(model_dir, prompt_format, batch_size, max_length, trust_remote_code)(prompts, completions)
