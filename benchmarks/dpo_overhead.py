"""DPO steps/s through `factory train dpo` against a plain TRL script on the same data, model and settings.

Both sides train on the pairs factory reads from the store (same rows, same rendering, same DPOConfig
arguments); the plain side builds its dataset and DPOTrainer by hand, as a TRL user would. Printed: the
training steps/s of each (from the trainers' own train_runtime), the wall time of each whole call, and the
ratio factory / plain (target: close to 1, the wrapper must add nothing to the training loop).

    python benchmarks/dpo_overhead.py --store outputs/factory.duckdb --steps 10
"""

from __future__ import annotations

import argparse
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--store", default="outputs/factory.duckdb", help="a store with preference pairs (run the quickstart)")
    ap.add_argument("--model", default="default", help="'default' (shipped Gemma 3 270M) or a local folder")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-length", type=int, default=256)
    a = ap.parse_args()

    from trl import DPOConfig, DPOTrainer

    from factory.config import TrainConfig
    from factory.train import common
    from factory.train.data import preference_dataset
    from factory.train.dpo import COLUMNS, train_dpo

    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.model_validate({
            "name": "bench-dpo", "output_root": tmp, "model": a.model, "data": {"store": a.store},
            "optim": {"max_steps": a.steps, "batch_size": a.batch_size, "max_length": a.max_length,
                      "learning_rate": 1e-6, "logging_steps": a.steps}})

        # plain TRL, as a user would write it, on the same rows
        t0 = time.perf_counter()
        data, path = common.load_data(cfg), common.model_path(cfg)
        tok = common.load_tokenizer(path, cfg)
        args = DPOConfig(**common.trl_common_args(cfg, common.output_dir(cfg)), beta=cfg.dpo.beta,
                         loss_type=cfg.dpo.loss_type, max_length=cfg.optim.max_length)
        trainer = DPOTrainer(model=path, args=args, processing_class=tok,
                             train_dataset=preference_dataset(data.train, cfg.prompt_format).select_columns(COLUMNS))
        plain = trainer.train().metrics["train_runtime"]
        plain_wall = time.perf_counter() - t0
        del trainer

        t0 = time.perf_counter()
        metrics = train_dpo(cfg)
        ours_wall = time.perf_counter() - t0
        ours = metrics["train_runtime_s"]

    print(f"\nDPO, {a.steps} steps, batch {a.batch_size}, max_length {a.max_length}, model {a.model}, "
          f"{metrics['train_pairs']} training pairs")
    print(f"{'path':<22}{'train s':>10}{'steps/s':>10}{'whole call s':>15}")
    print(f"{'plain TRL script':<22}{plain:>10.2f}{a.steps / plain:>10.3f}{plain_wall:>15.1f}")
    print(f"{'factory train dpo':<22}{ours:>10.2f}{a.steps / ours:>10.3f}{ours_wall:>15.1f}")
    print(f"factory / plain steps/s: {plain / ours:.3f} (target: close to 1)")
    print("the whole call of factory also evaluates held-out pairs, saves the model and records the run")


if __name__ == "__main__":
    main()
