"""What every trainer shares: the output folder, loading the base model and tokenizer from a local path,
LoRA settings for peft, TRL's common arguments from our config, metrics JSON, and the record of the
training run in the store (what data it used)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from factory.config import TrainConfig
from factory.models import resolve_model
from factory.store import Store, row_id


@dataclass
class TrainData:
    train: list[dict]
    eval: list[dict]
    pair_ids_hash: str = ""
    info: dict = field(default_factory=dict)


def output_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.output_root) / cfg.name
    out.mkdir(parents=True, exist_ok=True)
    return out


def model_path(cfg: TrainConfig) -> str:
    return str(resolve_model(cfg.model))


def load_tokenizer(path: str, cfg: TrainConfig):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # The shipped Gemma tokenizer does not add <bos> by itself, and the model needs it.
    if tok.bos_token_id is not None and hasattr(tok, "add_bos_token"):
        tok.add_bos_token = True
    return tok


def on_gpu() -> bool:
    return torch.cuda.is_available()


def peft_config(cfg: TrainConfig, task_type: str = "CAUSAL_LM"):
    if not cfg.lora.enabled:
        return None
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                      target_modules=cfg.lora.target_modules, task_type=task_type)


def trl_common_args(cfg: TrainConfig, out: Path) -> dict:
    """Keyword arguments every TRL config class accepts, from our one config."""
    o = cfg.optim
    return dict(output_dir=str(out), max_steps=o.max_steps, learning_rate=o.learning_rate,
                per_device_train_batch_size=o.batch_size, per_device_eval_batch_size=o.batch_size,
                gradient_accumulation_steps=o.gradient_accumulation_steps,
                # transformers 5 dropped warmup_ratio; a float below 1 in warmup_steps is read as a share
                warmup_steps=o.warmup_ratio,
                logging_steps=o.logging_steps, report_to=o.report_to, seed=cfg.seed,
                bf16=o.bf16 and on_gpu(), gradient_checkpointing=o.gradient_checkpointing,
                save_strategy="no", eval_strategy="no", remove_unused_columns=False, use_cpu=not on_gpu(),
                dataloader_num_workers=0)


def trl_args(cfg: TrainConfig, method: str, out: Path, **fixed) -> dict:
    """Keyword arguments of `method`'s TRL config class: the common ones, what the trainer fixes, then the
    method section's TRL settings (config.trl_settings), which win over factory's defaults (save_strategy ...)."""
    from factory.config import trl_settings

    settings = trl_settings(method, getattr(cfg, method))
    if isinstance(settings.get("model_init_kwargs"), dict) and "model_init_kwargs" in fixed:  # e.g. attn_implementation
        settings["model_init_kwargs"] = {**settings["model_init_kwargs"], **fixed["model_init_kwargs"]}
    return {**trl_common_args(cfg, out), **fixed, **settings}


def load_data(cfg: TrainConfig) -> TrainData:
    from factory.train.data import load_pairs, resolve_conflicts, split_by_prompt

    rows, conflicts = resolve_conflicts(load_pairs(cfg.data), cfg.data.conflicts)
    if not rows:
        raise ValueError(f"every pair in {cfg.data.store} matching the filters conflicts with another and "
                         f"data.conflicts={cfg.data.conflicts!r} dropped them all ({conflicts}); try judge_wins")
    if cfg.prompt_format == "chat":
        fold_unsupported_system(rows, load_tokenizer(model_path(cfg), cfg))
    train, evals = split_by_prompt(rows, cfg.data.eval_fraction, cfg.seed)
    if cfg.data.max_pairs:
        train = train[: cfg.data.max_pairs]
    ids = sorted(r["pair_id"] for r in train)
    return TrainData(train=train, eval=evals, pair_ids_hash=row_id(*ids),
                     info={"train_pairs": len(train), "eval_pairs": len(evals),
                           "train_prompts": len({r["prompt_id"] for r in train}),
                           "eval_prompts": len({r["prompt_id"] for r in evals}), "conflicts_policy":
                           cfg.data.conflicts, **conflicts})


def fold_unsupported_system(rows: list[dict], tok) -> None:
    """Conversations with a system message, for a chat template without a system role (Mistral v0.1 refuses
    one, older Phi-3 drops it): the system prompt becomes the first paragraph of the first user turn, as the
    pipeline rendered it for such a model (factory.engines.base.encode_prompt)."""
    from factory.engines.base import fold_system, template_keeps_system

    if template_keeps_system(tok, {}):
        return
    for r in rows:
        turns = json.loads(r["messages"]) if r.get("messages") else None
        if turns and turns[0]["role"] == "system":
            r["messages"] = json.dumps(fold_system(turns))


def write_metrics(out: Path, metrics: dict) -> Path:
    path = out / "metrics.json"
    path.write_text(json.dumps(metrics, indent=2, default=float))
    return path


def record_training_run(cfg: TrainConfig, method: str, data: TrainData, out: Path, metrics: dict,
                        status: str = "completed") -> str:
    """Write the training run into the store's `runs` table: config, data used, output folder, metrics."""
    with Store.open(cfg.data.store) as store:
        config = {**cfg.model_dump(mode="json"), "method": method, "output_dir": str(out),
                  "data_used": {**data.info, "pair_ids_hash": data.pair_ids_hash}}
        run_id = store.start_run(cfg.name, f"train-{method}", config, None)
        store.finish_run(run_id, status, "", metrics)
    return run_id
