"""Kahneman-Tversky Optimization with TRL's `KTOTrainer` on unpaired data: every stored pair gives one
desirable (chosen) and one undesirable (rejected) completion (`data.unpaired_dataset`).

`kto.beta`, `kto.desirable_weight` and `kto.undesirable_weight` go to `KTOConfig`; the reference model is
TRL's (a frozen copy, or adapters off with LoRA). KTO estimates its KL term from mismatched (prompt,
completion) pairs made by rotating completions inside each batch of a sequential sampler, so the training
rows are shuffled once (seeded) first: unshuffled, a batch would hold the two halves of one pair, and the
"mismatched" completion would belong to the same prompt. KTO needs `optim.batch_size` >= 2 for that term.
Evaluation on the held-out rows reports TRL's eval loss, KL and implicit rewards of desirable and
undesirable completions (`eval_margin`: the difference of their means). The trained model (LoRA merged) is saved as a causal LM.
"""

from __future__ import annotations

from factory.config import TrainConfig
from factory.train import common, trl_utils
from factory.train.data import unpaired_dataset

COLUMNS = ["prompt", "completion", "label"]


def train_kto(cfg: TrainConfig) -> dict:
    from trl import KTOConfig, KTOTrainer

    data, out, path = common.load_data(cfg), common.output_dir(cfg), common.model_path(cfg)
    tok = common.load_tokenizer(path, cfg)
    args = KTOConfig(**common.trl_args(cfg, "kto", out, max_length=cfg.optim.max_length,
                                       trust_remote_code=cfg.trust_remote_code))
    train_ds, unpaired = unpaired_dataset(data.train, cfg.prompt_format)
    train_ds = train_ds.shuffle(seed=cfg.seed).select_columns(COLUMNS)
    eval_ds = (unpaired_dataset(data.eval, cfg.prompt_format)[0].shuffle(seed=cfg.seed).select_columns(COLUMNS)
               if data.eval else None)
    trainer = KTOTrainer(model=path, args=args, train_dataset=train_ds, eval_dataset=eval_ds, processing_class=tok,
                         peft_config=common.peft_config(cfg))
    result = trainer.train()
    metrics = {**trl_utils.base_metrics(cfg, "kto", data, out), "beta": cfg.kto.beta,
               "desirable_weight": cfg.kto.desirable_weight, "undesirable_weight": cfg.kto.undesirable_weight,
               "unpaired": unpaired, **trl_utils.train_summary(trainer, result)}
    if data.eval:
        ev = trl_utils.float_metrics(trainer.evaluate())
        chosen, rejected = ev.get("eval_rewards/chosen"), ev.get("eval_rewards/rejected")
        # TRL logs a margin only for batches holding both kinds; the difference of the two means always exists
        metrics.update(ev, eval_margin=None if chosen is None or rejected is None else chosen - rejected)
    metrics.update(trl_utils.save_trained(trainer, tok, out, path))
    return trl_utils.finish_run(cfg, "kto", data, out, metrics)
