"""What the reward, DPO and KTO trainers share beyond factory.train.common: a summary of the training log,
eval figures as plain floats, saving the trained model (LoRA adapters are merged into the weights so every
output folder loads with a plain `from_pretrained`; the adapter itself is kept in `<out>/adapter`), and the
last step of every run: metrics.json plus the run in the store's `runs` table."""

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


def save_model(model, tokenizer, out: Path) -> dict:
    """Save model and tokenizer to `out`. A peft model is saved twice: the adapter alone in `out/adapter`
    (small, for inspection or re-use with peft) and merged into the base weights in `out` itself, so that
    PPO, evaluation and `from_pretrained` never need peft to load the result. Under `accelerate launch` every
    process holds the same weights (DDP) and only the main one writes."""
    from accelerate import PartialState
    from accelerate.utils import is_peft_model

    state = PartialState()
    state.wait_for_everyone()  # every process has finished training
    info: dict = {"lora": False}
    if is_peft_model(model):
        if state.is_main_process:
            model.save_pretrained(out / ADAPTER_DIR)
        model = model.merge_and_unload()
        info = {"lora": True, "lora_merged": True, "adapter_dir": str(out / ADAPTER_DIR)}
    if state.is_main_process:
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)
    state.wait_for_everyone()  # no process reads `out` before it is whole
    return info


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
