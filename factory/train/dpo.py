"""Direct Preference Optimization on the store's pairs with TRL's `DPOTrainer`.

The reference model is TRL's business: a frozen copy of the initial model for full fine-tuning, or the same
model with its LoRA adapters switched off when `lora.enabled`. `dpo.beta` and `dpo.loss_type` go straight to
`DPOConfig`. With `dpo.soft_labels` the target of each pair is its stored P(chosen) (factory/train/soft_dpo.py).
At the end the held-out pairs are evaluated with TRL's own metrics: eval loss, implicit-reward accuracy (beta * log-ratio of chosen
above rejected) and mean implicit-reward margin. The trained model (LoRA merged) is saved as a causal LM.
"""

from __future__ import annotations

from factory.config import TrainConfig
from factory.train import common, trl_utils
from factory.train.data import preference_dataset
from factory.train.soft_dpo import soft_dpo_trainer

COLUMNS = ["prompt", "chosen", "rejected"]


def train_dpo(cfg: TrainConfig) -> dict:
    from trl import DPOConfig, DPOTrainer

    data, out, path = common.load_data(cfg), common.output_dir(cfg), common.model_path(cfg)
    tok = common.load_tokenizer(path, cfg)
    args = DPOConfig(**common.trl_args(cfg, "dpo", out, max_length=cfg.optim.max_length,
                                       trust_remote_code=cfg.trust_remote_code))
    columns = COLUMNS + ["label_prob"] if cfg.dpo.soft_labels else COLUMNS
    train_ds = preference_dataset(data.train, cfg.prompt_format).select_columns(columns)
    eval_ds = preference_dataset(data.eval, cfg.prompt_format).select_columns(columns) if data.eval else None
    make = soft_dpo_trainer if cfg.dpo.soft_labels else DPOTrainer
    trainer = make(model=path, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                   peft_config=common.peft_config(cfg))
    result = trainer.train()
    metrics = {**trl_utils.base_metrics(cfg, "dpo", data, out), "beta": cfg.dpo.beta, "loss_type": cfg.dpo.loss_type,
               "soft_labels": cfg.dpo.soft_labels,
               **trl_utils.train_summary(trainer, result)}
    if data.eval:
        ev = trl_utils.float_metrics(trainer.evaluate())
        metrics.update(ev, eval_accuracy=ev.get("eval_rewards/accuracies"), eval_margin=ev.get("eval_rewards/margins"))
    metrics.update(trl_utils.save_trained(trainer, tok, out, path))
    return trl_utils.finish_run(cfg, "dpo", data, out, metrics)
