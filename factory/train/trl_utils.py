"""What the TRL-based trainers (SFT, reward, DPO, KTO, GRPO) share beyond factory.train.common: a summary of the
training log, eval figures as plain floats, saving the trained model (gathered when sharded; LoRA adapters merged
into the weights so every output folder loads with a plain `from_pretrained`, the adapter kept in
`<out>/adapter`), and the last step of every run: metrics.json plus the run in the store's `runs` table."""

from __future__ import annotations

import math
from pathlib import Path

from factory.config import TrainConfig
from factory.train.common import TrainData, record_training_run, write_metrics

ADAPTER_DIR = "adapter"


def logged_losses(trainer) -> list[float]:
    """The per-step training losses the trainer logged (every `optim.logging_steps` steps)."""
    return [float(h["loss"]) for h in trainer.state.log_history if "loss" in h]


def train_summary(trainer, result) -> dict:
    """Training figures from `trainer.train()`'s result and the trainer's log; for DPO the implicit-reward margin
    (beta * log-ratio of chosen minus rejected) of each logged step's training batch."""
    margins = [float(h["rewards/margins"]) for h in trainer.state.log_history if "rewards/margins" in h]
    return {"train_loss": float(result.training_loss), "train_losses": logged_losses(trainer), "train_margins": margins,
            "global_step": int(trainer.state.global_step),
            "train_runtime_s": round(float(result.metrics.get("train_runtime", 0.0)), 3)}


def float_metrics(metrics: dict, prefix: str = "eval_") -> dict:
    """Numeric entries of a `trainer.evaluate()` result, as floats (non-finite values become None)."""
    out = {}
    for key, value in metrics.items():
        if key.startswith(prefix) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = float(value) if math.isfinite(value) else None
    return out


def save_trained(trainer, tokenizer, out: Path, base_path: str) -> dict:
    """Save a trainer's model to `out` as one plain folder that `from_pretrained` loads, however it was trained.

    Every process calls it. `Trainer.save_model` gathers the weights where they are sharded (DeepSpeed ZeRO-3,
    FSDP, which is asked for a full state dict here) and only the main process writes. A peft model is saved as
    its adapter (`out/adapter`, small, for re-use with peft) and merged on the main process into a fresh copy of
    the base loaded from `base_path`, so PPO, evaluation and `from_pretrained` never need peft; merging the
    trained model in place would need every shard's weights on one process."""
    from accelerate import PartialState
    from accelerate.utils import is_peft_model

    state = PartialState()
    if getattr(trainer, "is_fsdp_enabled", False):  # a sharded state dict would not load with from_pretrained
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
    model = trainer.accelerator.unwrap_model(trainer.model)
    if not is_peft_model(model):
        trainer.save_model(str(out))
        if state.is_main_process:
            tokenizer.save_pretrained(out)
        state.wait_for_everyone()  # no process reads `out` before it is whole
        return {"lora": False}
    trainer.save_model(str(out / ADAPTER_DIR))
    if state.is_main_process:
        merge_adapter(type(model.get_base_model()), base_path, out / ADAPTER_DIR, model.config).save_pretrained(out)
        tokenizer.save_pretrained(out)
    state.wait_for_everyone()
    return {"lora": True, "lora_merged": True, "adapter_dir": str(out / ADAPTER_DIR)}


def merge_adapter(model_cls, base_path: str, adapter_dir: Path, config):
    """The base model (on the CPU, in its saved dtype, with the trained model's config, e.g. a reward model's
    num_labels and pad token) with a saved adapter merged into its weights."""
    from peft import PeftModel

    base = model_cls.from_pretrained(base_path, config=config, dtype=getattr(config, "dtype", None) or "auto")
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def finish_run(cfg: TrainConfig, method: str, data: TrainData, out: Path, metrics: dict) -> dict:
    """Record the run in the store, then write metrics.json (with the run id) to the output folder; under
    `accelerate launch` only the main process does (one writer of the store; the others return run_id None)."""
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return {**metrics, "run_id": None}
    run_id = record_training_run(cfg, method, data, out, metrics)
    metrics = {**metrics, "run_id": run_id}
    write_metrics(out, metrics)
    return metrics


def base_metrics(cfg: TrainConfig, method: str, data: TrainData, out: Path) -> dict:
    from accelerate import PartialState

    return {"method": method, "model": cfg.model, "output_dir": str(out), "processes": PartialState().num_processes,
            **data.info}
