"""Soft-label DPO against hard-label DPO, side by side, on the same pipeline, SFT model, pairs and settings.

Runs `factory recipe cai` (pipelines/cai.yaml: the shipped model on the CPU) with methods [dpo] (soft labels, as the
recipe file sets them) on a bigger prompt set than the quickstart's (the quickstart's 16 prompts and the 48 of
data/judge_eval_pairs*.jsonl, or --prompts), then trains a second DPO policy from the same SFT model with the same
settings and `dpo.soft_labels: false`, and evaluates sft, dpo-soft and dpo-hard against the SFT model on the
held-out prompts (the recipe's split). Printed per policy: held-out pair accuracy of the implicit reward (the
judge's labels as the truth), harmless and helpful win rates against the SFT model, KL to it; each rate with n and
its 95% interval. On a GPU, pass a bigger --prompts file and --steps.

    python benchmarks/soft_vs_hard_dpo.py --out outputs/soft-vs-hard --steps 24
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _prompts(out: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    rows = [json.loads(line) for line in (ROOT / "data" / "quickstart_prompts.jsonl").open()]
    for name in ("judge_eval_pairs.jsonl", "judge_eval_pairs_holdout.jsonl"):
        rows += [{"id": f"{name.split('.')[0]}-{r['id']}", "prompt": r["prompt"]}
                 for r in map(json.loads, (ROOT / "data" / name).open())]
    path = out / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": r["id"], "prompt": r["prompt"]}) + "\n" for r in rows))
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="outputs/soft-vs-hard")
    ap.add_argument("--prompts", default=None, help="JSONL with id and prompt (default: 64 shipped prompts)")
    ap.add_argument("--steps", type=int, default=24, help="DPO steps of each variant")
    ap.add_argument("--set-prompts", type=int, default=8, help="red-team / ordinary set prompts per policy")
    a = ap.parse_args()

    from factory.config import RecipeConfig, TrainConfig, read_yaml
    from factory.recipe import plan, run_recipe, step_dir
    from factory.train.dpo import train_dpo
    from factory.train.evaluate import evaluate

    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    raw = read_yaml(ROOT / "pipelines" / "cai.yaml")
    raw.update(output_root=str(out), methods=["dpo"])
    raw["pipeline"].update(store=str(out / "factory.duckdb"))
    raw["pipeline"]["prompts"] = {"path": str(_prompts(out, a.prompts)), "column": "prompt", "id_column": "id"}
    raw["steps"] = {k: v for k, v in raw.get("steps", {}).items() if k in ("sft", "reward")}
    raw["steps"]["dpo"] = {"optim": {"max_steps": a.steps}}
    raw["eval"] = {**raw.get("eval", {}), "max_prompts": 1000, "max_set_prompts": a.set_prompts}
    cfg = RecipeConfig.model_validate(raw)

    t0 = time.time()
    report = run_recipe(cfg, log=lambda m: print(m, flush=True))
    t_recipe = time.time() - t0
    p = plan(cfg, report["pipeline_run"])
    hard = p.steps["dpo"].model_dump(mode="json")
    hard.update(name="dpo-hard")
    hard["dpo"]["soft_labels"] = False
    t1 = time.time()
    train_dpo(TrainConfig.model_validate(hard))
    t_hard = time.time() - t1

    ev = p.eval.model_dump(mode="json")
    section = dict(ev["policies"]["sft"])
    ev["policies"] = {"sft": ev["policies"]["sft"], "dpo-soft": {**section, "path": str(step_dir(cfg, "dpo"))},
                      "dpo-hard": {**section, "path": str(out / "dpo-hard")}}
    ev["name"] = "eval-soft-vs-hard"
    from factory.config import EvalConfig

    t2 = time.time()
    figures = evaluate(EvalConfig.model_validate(ev), log=lambda m: print(m, flush=True))
    t_eval = time.time() - t2

    def fmt(m: dict, key: str) -> str:
        v, n, ci = m.get(key), m.get(f"{key}_n"), m.get(f"{key}_ci95")
        if v is None:
            return "-"
        return f"{v:.3f} [{ci[0]:.2f}, {ci[1]:.2f}] n={n}" if ci else f"{v:.3f}"

    print(f"\npipeline run {report['pipeline_run']}: pairs {report['pair_counts']}; held-out prompts "
          f"{figures['prompts']}, held-out pairs {figures['heldout_pairs']}")
    print(f"{'policy':<10} {'pair accuracy':<28} {'harmless win':<28} {'helpful win':<28} KL to SFT")
    for name, m in figures["policies"].items():
        kl = m.get("kl")
        print(f"{name:<10} {fmt(m, 'pair_accuracy'):<28} {fmt(m, 'harmless_win_rate'):<28} "
              f"{fmt(m, 'helpful_win_rate'):<28} {'-' if kl is None else f'{kl:.3f}'}")
    print(f"seconds: recipe (pipeline, sft, reward, dpo-soft, its eval) {t_recipe:.0f}, dpo-hard {t_hard:.0f}, "
          f"side-by-side eval {t_eval:.0f}")
    (out / "soft_vs_hard.json").write_text(json.dumps(figures, indent=2, default=float))


if __name__ == "__main__":
    main()
