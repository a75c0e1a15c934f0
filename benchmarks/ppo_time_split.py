"""PPO's time split on this machine: generation vs scoring (logprobs, reference, reward) vs optimisation.

Runs factory's PPO (`factory.train.ppo.run_ppo`) on the shipped Gemma 3 270M for a few steps with a
cheap programmatic reward (so the reward model's cost is not mixed in) and prints the share of each phase,
measured side by side in one run. Generation is the cost to watch: on GPUs it is the part vLLM-backed
rollouts would speed up.

    python benchmarks/ppo_time_split.py --steps 3 --rollouts 4 --new-tokens 24
"""

from __future__ import annotations

import argparse
import tempfile


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rollouts", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    a = ap.parse_args()

    from factory.config import TrainConfig
    from factory.train.ppo import run_ppo

    prompts = ["How do I make tea?", "Explain why the sky is blue.", "Give me a tip for sleeping better.",
               "What is a good name for a cat?", "How can I learn to cook?", "Why do leaves change colour?"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = TrainConfig.model_validate({
            "name": "bench-ppo", "output_root": tmp, "model": a.model,
            "optim": {"max_steps": a.steps, "learning_rate": 1e-6},
            "ppo": {"rollout_batch_size": a.rollouts, "mini_batch_size": a.rollouts, "ppo_epochs": 1,
                    "max_new_tokens": a.new_tokens}})
        # reward: shorter answers score higher (cheap, so timing is PPO's own)
        result = run_ppo(cfg, prompts, lambda ps, cs: [-len(c.split()) / 10 for c in cs], log=lambda m: None)
    hist = result["history"]
    gen = sum(h["time_generate"] for h in hist)
    score = sum(h["time_rollout"] - h["time_generate"] for h in hist)
    opt = sum(h["time_optimise"] for h in hist)
    total = gen + score + opt
    print(f"\nPPO on {a.model}: {a.steps} steps x {a.rollouts} rollouts x {a.new_tokens} new tokens")
    print(f"{'phase':<40}{'seconds':>10}{'share':>8}")
    for name, t in (("generation (policy.generate)", gen), ("scoring (logprobs, reference, reward, GAE)", score),
                    ("optimisation (PPO epochs)", opt)):
        print(f"{name:<40}{t:>10.1f}{100 * t / total:>7.0f}%")
    print(f"{'total':<40}{total:>10.1f}")


if __name__ == "__main__":
    main()
