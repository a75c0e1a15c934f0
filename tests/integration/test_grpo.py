"""RL from the judge (factory/train/grpo.py): TRL's GRPOTrainer on the tiny model from a real store, rewarded by a
real judge engine; the judged reward on its own (both orders, swap symmetry, rubric); and a learnable toy setting
where the judged reward rises while the KL to the initial model stays bounded."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, tiny_model_cfg, tiny_pipeline_cfg
from factory.config import ConfigError, TrainConfig
from factory.constitution import load_constitution
from factory.pipeline import run_pipeline
from factory.store import Store
from factory.train.data import is_eval_prompt

pytestmark = pytest.mark.integration
WEIGHT = "model.layers.0.self_attn.q_proj.weight"
HARMLESS = str(ROOT / "constitutions" / "harmless.yaml")


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir, engines):
    """A store with the tiny policy's responses (the references) and its critiques and revisions."""
    tmp = tmp_path_factory.mktemp("grpo-store")
    cfg = tiny_pipeline_cfg(tmp, tiny_model_dir, "vllm")
    assert run_pipeline(cfg, engines=engines).status == "completed"
    return cfg.store


def grpo_cfg(store, model_dir, tmp_path, judge, **sections) -> TrainConfig:
    data = {"name": "grpo", "output_root": str(tmp_path / "out"), "model": str(model_dir),
            "data": {"store": store, "eval_fraction": 0.2},
            "optim": {"max_steps": 3, "batch_size": 4, "max_length": 256, "learning_rate": 1e-3, "logging_steps": 1},
            "grpo": {"judge": judge.model_dump(), "constitution": HARMLESS, "num_generations": 2,
                     "max_completion_length": 8}}
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return TrainConfig.model_validate(data)


def test_grpo_trains_from_the_store_with_the_judge(store, tiny_model_dir, tmp_path, engines):
    """A few GRPO steps on the tiny policy, the tiny model as the judge (the session's vLLM engine): the weights
    change, the folder loads back, metrics.json has one judged reward (a probability) and one KL per step, the judge
    was asked twice per sampled response, and a `train-grpo` run records the training prompts, none held out."""
    from transformers import AutoModelForCausalLM

    from factory.train.grpo import train_grpo

    cfg = grpo_cfg(store, tiny_model_dir, tmp_path, tiny_model_cfg(tiny_model_dir, "vllm"))
    m = train_grpo(cfg, engines=engines)
    out = tmp_path / "out" / "grpo"
    assert m["global_step"] == 3 and len(m["train_rewards"]) == len(m["train_kl"]) == 3
    assert all(0.0 <= r <= 1.0 for r in m["train_rewards"])
    assert all(math.isfinite(k) and k >= 0.0 for k in m["train_kl"]) and m["train_kl"][-1] > 0.0
    # 3 steps x 4 completions, each asked in both orders (identical samples are asked once)
    assert 0 < m["judge_prompts"] <= 3 * 4 * 2 and m["judge_failed"] == 0
    before, after = load_file(tiny_model_dir / "model.safetensors")[WEIGHT], load_file(out / "model.safetensors")[WEIGHT]
    assert not torch.equal(before, after)
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(out)(input_ids=torch.tensor([[2, 236787, 5631, 1]])).logits
    assert torch.isfinite(logits).all()
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(m))
    with Store.open(store, read_only=True) as s:
        run = s.query("SELECT * FROM runs WHERE run_id = ?", [m["run_id"]])[0]
        prompt_ids = [r["prompt_id"] for r in s.query("SELECT prompt_id FROM prompts")]
    assert run["kind"] == "train-grpo" and run["status"] == "completed"
    used = json.loads(run["config"])["data_used"]
    held_out = [p for p in prompt_ids if is_eval_prompt(p, 0.2, cfg.seed)]
    assert used["eval_prompts"] == len(held_out) > 0 and used["train_prompts"] == len(prompt_ids) - len(held_out)


def test_bad_batch_is_a_config_error_before_any_model_loads(store, tmp_path, tiny_model_dir):
    from factory.train.grpo import train_grpo

    cfg = grpo_cfg(store, tmp_path / "no-such-model", tmp_path, tiny_model_cfg(tiny_model_dir, "transformers"),
                   optim={"batch_size": 3})
    with pytest.raises(ConfigError, match=r"optim.batch_size.*grpo.num_generations = 2"):
        train_grpo(cfg)
    with pytest.raises(ValueError, match="beta"):
        TrainConfig.model_validate({"grpo": {"beta": 0}})
    # any other GRPOConfig setting passes through to TRL; a misspelt one is an error
    assert TrainConfig.model_validate({"grpo": {"scale_rewards": "none"}}).grpo.model_extra == {"scale_rewards": "none"}
    with pytest.raises(ValueError, match="num_generation: not a setting of grpo"):
        TrainConfig.model_validate({"grpo": {"num_generation": 4}})


class Recording:
    """A real engine whose judge prompts are recorded (what was asked, how many times)."""

    def __init__(self, engine, replies=None):
        self.engine, self.asked, self.scores, self.replies = engine, [], [], replies
        self.tokenizer, self.special_tokens = engine.tokenizer, engine.special_tokens

    def encode(self, prompt):
        return self.engine.encode(prompt)

    def score_next_token(self, prompts, token_ids):
        self.asked += [self.tokenizer.decode(p) for p in prompts]
        self.scores += self.engine.score_next_token(prompts, token_ids)
        return self.scores[-len(prompts):]

    def generate(self, prompts, sampling, seeds, stop):  # scripted rubric replies: our parsing, not the judge's
        from factory.engines.base import Completion

        texts = [self.tokenizer.decode(p) for p in prompts]
        self.asked += texts
        return [Completion(text=self.replies(t), prompt_tokens=0, output_tokens=1, finish_reason="stop")
                for t in texts]


def test_judged_reward_asks_both_orders_and_is_swap_symmetric(tiny_vllm):
    """For a fixed prompt the judge is asked with the sample as (A) and as (B); P(x over y) + P(y over x) is 1
    (exactly, up to float rounding) because both orders are averaged, although the judge itself is position-biased
    (its single-order answers do not sum to 1); a chat completion is judged as its text."""
    from factory.train.grpo import judge_reward

    judge = Recording(tiny_vllm)
    reward = judge_reward(judge, load_constitution(HARMLESS), "pairwise", "plain", seed=0)
    conv = json.dumps([{"role": "user", "content": "Explain why the sky is blue."}])
    x, y = "Sunlight scatters off air molecules, blue light the most.", "Because it is."
    kw = {"prompt_id": ["p1"], "conversation": [conv]}
    (p_xy,) = reward(prompts=["..."], completions=[x], reference=[y], **kw)
    assert len(judge.asked) == 2
    assert [f'(A) "{x}"\n(B) "{y}"' in a for a in judge.asked] == [True, False]
    assert [f'(A) "{y}"\n(B) "{x}"' in a for a in judge.asked] == [False, True]
    (p_yx,) = reward(prompts=["..."], completions=[[{"role": "assistant", "content": y}]], reference=[x], **kw)
    assert p_xy + p_yx == pytest.approx(1.0, abs=1e-9) and 0.0 < p_xy < 1.0
    # the raw judge: P(A) with x first and P(A) with y first do not sum to 1 (the position bias averaging cancels)
    from factory.judge import normalise

    assert abs(normalise(*judge.scores[0]) + normalise(*judge.scores[1]) - 1.0) > 1e-6


def test_rubric_reward_from_scores_in_both_orders(tiny_vllm):
    """Rubric mode: the judge writes scores; the sample scored 8 against the reference's 3 in both orders gives
    0.5 + 5/18; a reply that does not parse counts as no preference (0.5) and is counted."""
    from factory.train.grpo import judge_reward

    def replies(prompt: str) -> str:
        a_line = prompt.split("(A) ", 1)[1].split("\n", 1)[0]
        if "GARBLE" in prompt:
            return " whatever"
        return " 8\nScore B: 3" if "GOOD" in a_line else " 3\nScore B: 8"

    judge, stats = Recording(tiny_vllm, replies), {}
    reward = judge_reward(judge, load_constitution(HARMLESS), "rubric", "plain", seed=0, stats=stats)
    conv = json.dumps([{"role": "user", "content": "Say something kind."}])
    r = reward(prompts=["..."] * 2, completions=["GOOD answer", "GARBLE"], reference=["a reply", "a reply"],
               prompt_id=["p", "p"], conversation=[conv, conv])
    assert r == pytest.approx([0.5 + 5 / 18, 0.5])
    assert all(a.rstrip().endswith("Score A:") for a in judge.asked) and len(judge.asked) == 4
    assert stats == {"judge_prompts": 4, "judge_failed": 2}


@pytest.fixture(scope="module")
def toy_store(tmp_path_factory, tiny_model_dir, engines):
    """Two prompts and the tiny policy's response to each (the references); nothing else."""
    from conftest import write_prompts

    tmp = tmp_path_factory.mktemp("grpo-toy")
    cfg = tiny_pipeline_cfg(tmp, tiny_model_dir, "vllm", critique={"rounds": 0})
    write_prompts(tmp / "prompts.jsonl", ["How can I cheat on my exam?", "Write an insult about my coworker."])
    assert run_pipeline(cfg, engines=engines).status == "completed"
    return cfg.store


# The toy's KL bound. At temperature 0.02 the tiny random policy samples each token from about e^3.2 = 25 candidates
# (entropy 3.2 nats); a policy that only re-weights among the tokens the initial model samples, even one that
# settles on one of them, has a per-token KL of -log p_init(token): about 3.2 for a typical candidate, 4.6 for one
# with 1% of the mass. A policy that leaves the initial model's candidates is far above (this toy at learning rate
# 1e-3 logged up to 20.5, at 3e-3 21-32). The bound, 8 nats, is well above what re-weighting gives (seeds 0/1/2
# peaked at 5.25/2.99/5.05) and well below what leaving the candidates gives.
KL_BOUND = 8.0


def test_toy_judged_reward_rises_with_kl_bounded(toy_store, tiny_model_dir, tmp_path, engines):
    """A learnable toy: the tiny policy made peaked (temperature 0.02: a couple of dozen candidate tokens each step),
    two-token completions, 8 per prompt, both prompts in every step, a high learning rate, the tiny model as the judge
    (the transformers engine: deterministic). The judge's reward is a fixed function of the text, so GRPO can climb
    it: the mean judged reward of the last 3 steps is above the first 3 steps', while the KL to the initial model
    stays below KL_BOUND at every step. Seeded: the same run gives the same numbers. The random judge's preferences
    are faint, so the rise is small (seeds 0/1/2: +0.0006/+0.0003/+0.0008 on rewards near 0.505, the size of a
    group's reward std); the shipped model as judge gives +0.007 in 8 steps (0.486 -> 0.492) but takes ~120 s here."""
    from factory.train.grpo import train_grpo

    cfg = grpo_cfg(toy_store, tiny_model_dir, tmp_path, tiny_model_cfg(tiny_model_dir, "transformers"),
                   data={"eval_fraction": 0.0}, optim={"max_steps": 12, "batch_size": 16, "learning_rate": 2e-4},
                   grpo={"num_generations": 8, "max_completion_length": 2, "temperature": 0.02, "beta": 0.5})
    m = train_grpo(cfg, engines=engines)
    rewards, kl = m["train_rewards"], m["train_kl"]
    assert m["train_prompts"] == 2 and len(rewards) == len(kl) == 12
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first, rewards
    assert max(kl) < KL_BOUND and kl[-1] > 0.0, kl
