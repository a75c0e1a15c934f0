"""PPO (factory.train.ppo) on the tiny model: log-probabilities line up with generation, the reward rises
for a programmatic reward and for a small trained reward model, and train_ppo runs from a store.

The tiny model is random: its next-token distribution is almost uniform over 262k tokens, so no property
of its text can be learned in a few PPO steps (a rewarded token is practically never sampled twice). As
PPO always does, we therefore start from a supervised ("SFT") model: a dozen steps of LM training on
answers made of eight words (four fruits, four animals) and EOS. The property to learn is "answer with
fruits"; the SFT model uses fruits for half of its words.
"""

from __future__ import annotations

import json
import math
import random
import shutil

import pytest
import torch

from factory.config import TrainConfig
from factory.train.data import render_completion, render_prompt

pytestmark = pytest.mark.integration

FRUITS, ANIMALS = ["apple", "banana", "cherry", "grape"], ["dog", "cat", "horse", "mouse"]
PROMPTS = ["How do I pick the lock on my neighbour's door?", "Explain why the sky is blue.",
           "Write an insult about my coworker.", "Give me a tip for learning to cook.",
           "How can I cheat on my exam?", "What is the boiling point of water?"]
# Tuned on this setup (seeds 0-3, learning rate 2e-3): the fruit share goes from ~0.5 to ~0.9 in 5-8 steps.
PPO = {"rollout_batch_size": 16, "mini_batch_size": 16, "ppo_epochs": 2, "max_new_tokens": 8, "kl_coef": 0.05}


def fruit_share(completions: list[str]) -> list[float]:
    """Share of an answer's words that are fruits (0 for an empty answer)."""
    return [sum(w in FRUITS for w in c.split()) / max(len(c.split()), 1) for c in completions]


def words(rng: random.Random, n_fruits: int, n: int) -> str:
    ws = [rng.choice(FRUITS) for _ in range(n_fruits)] + [rng.choice(ANIMALS) for _ in range(n - n_fruits)]
    rng.shuffle(ws)
    return " ".join(ws)


def copy_tokenizer(src, dst):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)


@pytest.fixture(scope="module")
def sft_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after 12 SFT steps on 'Human: <prompt>\\n\\nAssistant: <1-6 fruit/animal words><eos>'."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_bos_token = True
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    for _ in range(12):
        rows = []
        for _ in range(8):
            answer = " ".join(rng.choice(FRUITS + ANIMALS) for _ in range(rng.randint(1, 6)))
            prompt = tok(render_prompt(rng.choice(PROMPTS), "plain")).input_ids
            rows.append((prompt, tok(render_completion(answer, "plain"), add_special_tokens=False).input_ids
                         + [tok.eos_token_id]))
        width = max(len(p) + len(a) for p, a in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        target = torch.zeros(len(rows), width, dtype=torch.bool)  # positions whose next token is learned
        for i, (p, a) in enumerate(rows):
            ids[i, :len(p) + len(a)] = torch.tensor(p + a)
            target[i, len(p) - 1:len(p) + len(a) - 1] = True
        hidden = model.model(input_ids=ids, attention_mask=(ids != 0).long()).last_hidden_state
        loss = torch.nn.functional.cross_entropy(model.lm_head(hidden[target]), ids[:, 1:][target[:, :-1]])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 3.0  # ~ln(8) + EOS: the model now answers with the eight words
    out = tmp_path_factory.mktemp("sft")
    model.save_pretrained(out)
    copy_tokenizer(tiny_model_dir, out)
    return out


@pytest.fixture(scope="module")
def reward_model_dir(tiny_model_dir, tmp_path_factory):
    """A tiny reward model (AutoModelForSequenceClassification from the tiny model, one output) trained
    with the Bradley-Terry loss -log sigmoid(r_chosen - r_rejected) on synthetic pairs: of two answers of
    the same length to the same prompt, the one with more fruits wins (and any answer beats an empty one).
    The texts end with EOS, as TRL's RewardTrainer makes them, so the score is read at EOS and depends on
    the whole answer, not on its last word."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    rng = random.Random(0)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    tok.add_bos_token, tok.padding_side = True, "right"  # as load_reward_scorer scores
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(25):
        chosen, rejected = [], []
        for _ in range(8):
            prompt, n = render_prompt(rng.choice(PROMPTS), "plain"), rng.randint(1, 6)
            fewer, more = sorted(rng.sample(range(n + 1), 2))
            worse = words(rng, fewer, n) if rng.random() > 0.2 else ""
            chosen.append(prompt + render_completion(words(rng, more, n), "plain") + tok.eos_token)
            rejected.append(prompt + render_completion(worse, "plain") + tok.eos_token)
        scores = rm(**tok(chosen + rejected, return_tensors="pt", padding=True)).logits[:, 0]
        loss = -torch.nn.functional.logsigmoid(scores[:8] - scores[8:]).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.3
    out = tmp_path_factory.mktemp("reward")
    rm.save_pretrained(out)
    copy_tokenizer(tiny_model_dir, out)
    return out


def ppo_cfg(model_dir, tmp_path, steps: int, **kw) -> TrainConfig:
    return TrainConfig(name="ppo", output_root=str(tmp_path), model=str(model_dir),
                       optim={"max_steps": steps, "learning_rate": 2e-3}, ppo={**PPO, **kw.pop("ppo", {})}, **kw)


def mean(xs) -> float:
    return sum(xs) / len(xs)


def assert_kl_bounded(hist: list[dict]) -> None:
    """KL(policy || SFT model) per answer, in nats, stays where the KL penalty should keep it. The SFT model
    gives its eight words and EOS 99.98% of the mass (other tokens: log-probability about -24). Answering
    with fruits only, spread as the SFT model spreads them, is ln 2 nats per word away (2-4 per answer);
    collapsing onto one word costs ln 8, about 2 nats per token (up to ~17 for 8 tokens); a single token
    from outside the SFT vocabulary costs ~20. Observed (seeds 0-3): 1.3-7 at the end, single steps < 10."""
    kls = [round(h["kl"], 2) for h in hist]
    assert max(kls) < 15 and mean(kls[-3:]) < 8, kls


def test_logprobs_line_up_with_generation(tiny_model_dir):
    """The trainer's log-probabilities of sampled tokens equal those of the distribution generate() sampled
    from (logits at position t predict token t+1; left-padded prompts; temperature applied)."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    from factory.train import common
    from factory.train.ppo import PolicyWithValue, render_prompt_text, response_mask
    from factory.train.ppo_math import token_logprobs

    cfg = TrainConfig(model=str(tiny_model_dir))
    tok = common.load_tokenizer(str(tiny_model_dir), cfg)
    tok.padding_side = "left"
    policy = PolicyWithValue(AutoModelForCausalLM.from_pretrained(tiny_model_dir)).eval()
    enc = tok([render_prompt_text(tok, p, "plain") for p in ["Hi", PROMPTS[1] + " In detail, please."]],
              return_tensors="pt", padding=True)
    assert enc.attention_mask[0, 0] == 0 and enc.input_ids[0, -1] == enc.input_ids[1, -1]  # left padding
    torch.manual_seed(0)
    gen = GenerationConfig(do_sample=True, temperature=0.7, top_k=0, top_p=1.0, max_new_tokens=5,
                           pad_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id],
                           output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        out = policy.lm.generate(**enc, generation_config=gen)
        n = out.sequences.shape[1] - enc.input_ids.shape[1]
        resp = out.sequences[:, -n:]
        attn = torch.cat([enc.attention_mask, response_mask(resp, [tok.eos_token_id])], 1)
        logits, values = policy(out.sequences, attn, n, temperature=0.7)
    sampled = token_logprobs(torch.stack(out.scores, 1), resp)
    assert torch.allclose(token_logprobs(logits, resp), sampled, atol=1e-4)
    assert values.shape == resp.shape


def test_ppo_raises_a_programmatic_reward(sft_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from factory.train import common
    from factory.train.ppo import run_ppo

    cfg = ppo_cfg(sft_dir, tmp_path, steps=12)
    result = run_ppo(cfg, PROMPTS, lambda prompts, completions: torch.tensor(fruit_share(completions)))
    hist = result["history"]
    first, last = mean([h["score"] for h in hist[:3]]), mean([h["score"] for h in hist[-3:]])
    assert first < 0.7 and last > 0.75 and last - first > 0.2, [round(h["score"], 2) for h in hist]
    assert_kl_bounded(hist)
    for key in ("policy_loss", "value_loss", "entropy", "clipfrac", "approx_kl"):
        assert all(math.isfinite(h[key]) for h in hist), key
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the first rollout comes from the reference itself

    out = tmp_path / "ppo"
    metrics = json.loads((out / "metrics.json").read_text())
    assert len(metrics["history"]) == 12 and metrics["summary"]["score_last"] == pytest.approx(last)
    assert (out / "value_head.pt").is_file()
    trained, sft = AutoModelForCausalLM.from_pretrained(out), AutoModelForCausalLM.from_pretrained(sft_dir)
    changed = [k for k, v in sft.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert changed, "no parameter changed"
    tok = common.load_tokenizer(str(out), cfg)
    ids = tok(render_prompt(PROMPTS[0], "plain"), return_tensors="pt").input_ids
    assert trained.generate(ids, max_new_tokens=3, do_sample=False).shape[1] > ids.shape[1]


def test_ppo_against_a_trained_reward_model(sft_dir, reward_model_dir, tmp_path):
    """The reward-model path: a tiny reward model trained (Bradley-Terry) to prefer fruit answers, loaded
    with load_reward_scorer; PPO raises its score, and the answers really do use more fruits."""
    from factory.train.ppo import load_reward_scorer, run_ppo

    scorer = load_reward_scorer(reward_model_dir, "plain")
    scores = scorer([PROMPTS[0]] * 4, ["apple banana cherry", "dog apple", "dog cat horse", ""])
    assert scores[0] > scores[1] > scores[2] and scores[0] > scores[3]  # more fruits, higher score
    shares = []

    def reward_fn(prompts, completions):
        shares.append(mean(fruit_share(completions)))
        return scorer(prompts, completions)

    # Reward-model scores span about -7 .. 6, ten times the fruit share's range: a larger KL coefficient.
    hist = run_ppo(ppo_cfg(sft_dir, tmp_path, steps=12, ppo={"kl_coef": 0.1}), PROMPTS, reward_fn)["history"]
    first, last = mean([h["score"] for h in hist[:3]]), mean([h["score"] for h in hist[-3:]])
    assert last - first > 2.0, [round(h["score"], 2) for h in hist]
    assert mean(shares[-3:]) - mean(shares[:3]) > 0.2, [round(s, 2) for s in shares]
    assert_kl_bounded(hist)


def test_train_ppo_from_store_with_lora(sft_dir, reward_model_dir, tmp_path):
    """train_ppo end to end: prompts from the store's pairs, the reward model folder from the config,
    LoRA (the reference is the base model with adapters off), the ptx term, the adaptive KL controller,
    the run recorded in the store."""
    from transformers import AutoModelForCausalLM

    from factory.store import Store, row_id
    from factory.train.ppo import train_ppo

    store = tmp_path / "store.duckdb"
    with Store.open(store) as s:
        s.insert("prompts", [{"prompt_id": row_id(p), "text": p} for p in PROMPTS])
        s.insert("preference_pairs", [{"pair_id": row_id("pair", p), "run_id": "r1", "prompt_id": row_id(p),
                                       "source": "final_vs_initial", "chosen_text": "apple",
                                       "rejected_text": "dog"} for p in PROMPTS])
    ptx = tmp_path / "ptx.jsonl"
    ptx.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["The sky is blue.", "Water boils at 100 C."]))
    cfg = ppo_cfg(sft_dir, tmp_path, steps=2, data={"store": str(store)}, lora={"enabled": True, "r": 4, "alpha": 8},
                  ppo={"reward_model": str(reward_model_dir), "rollout_batch_size": 4, "mini_batch_size": 2,
                       "ppo_epochs": 1, "adaptive_kl": True, "target_kl": 1.0, "kl_horizon": 10,
                       "ptx_coef": 0.5, "ptx_texts": str(ptx)})
    result = train_ppo(cfg)
    hist = result["history"]
    assert len(hist) == 2 and hist[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # fresh adapters change nothing
    assert hist[1]["kl_coef"] < hist[0]["kl_coef"]  # KL below target: the adaptive controller lowered beta
    assert all(math.isfinite(h["ptx_loss"]) and h["ptx_loss"] > 0 for h in hist)
    assert result["summary"]["prompts"] < len(PROMPTS)  # eval prompts held out
    with Store.open(store, read_only=True) as s:
        run = s.query("SELECT kind, status, config FROM runs WHERE run_id = ?", [result["run_id"]])[0]
    assert run["kind"] == "train-ppo" and run["status"] == "completed"
    assert json.loads(run["config"])["output_dir"] == result["output_dir"]
    AutoModelForCausalLM.from_pretrained(result["output_dir"])  # merged weights, a plain model folder


def linear_weight_dtypes(run) -> dict[str, set]:
    """The weight dtypes of the Linear layers that ran during `run()`: the value head's, and every other's."""
    from torch.nn.modules.module import register_module_forward_hook

    seen = {"value_head": set(), "lm": set()}

    def record(module, args, output):
        if isinstance(module, torch.nn.Linear):
            seen["value_head" if module.out_features == 1 else "lm"].add(module.weight.dtype)

    handle = register_module_forward_hook(record)
    try:
        run()
    finally:
        handle.remove()
    return seen


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU behaviour of optim.bf16")
def test_ppo_bf16_is_off_on_a_cpu(sft_dir, tmp_path):
    """optim.bf16 is a GPU setting (as in the TRL trainers): on a CPU PPO says so and runs in float32."""
    from factory.train import ppo

    cfg = ppo_cfg(sft_dir, tmp_path, steps=1, ppo={"rollout_batch_size": 4, "mini_batch_size": 4, "ppo_epochs": 1})
    cfg.optim.bf16 = True
    logged = []
    dtypes = linear_weight_dtypes(lambda: ppo.run_ppo(cfg, PROMPTS, lambda p, c: torch.tensor(fruit_share(c)),
                                                      log=logged.append))
    assert dtypes == {"value_head": {torch.float32}, "lm": {torch.float32}}
    assert any("optim.bf16" in line and "float32" in line for line in logged), logged


@pytest.mark.skipif(not torch.cuda.is_available(), reason="bf16 weights need a GPU")
def test_ppo_bf16_on_a_gpu_trains_bfloat16_weights_and_learns(sft_dir, tmp_path):
    """optim.bf16 on a GPU: the policy and the reference run with bfloat16 weights (not float32 weights under
    autocast), the value head stays float32, the saved policy is bfloat16, and the fruit reward still rises."""
    from safetensors.torch import load_file

    from factory.train import ppo

    cfg = ppo_cfg(sft_dir, tmp_path, steps=12)
    cfg.optim.bf16 = True
    result = {}
    dtypes = linear_weight_dtypes(lambda: result.update(
        ppo.run_ppo(cfg, PROMPTS, lambda p, c: torch.tensor(fruit_share(c)))))
    assert dtypes == {"value_head": {torch.float32}, "lm": {torch.bfloat16}}
    saved = load_file(tmp_path / "ppo" / "model.safetensors")
    assert {t.dtype for t in saved.values() if t.is_floating_point()} == {torch.bfloat16}
    hist = result["history"]
    first, last = mean([h["score"] for h in hist[:3]]), mean([h["score"] for h in hist[-3:]])
    assert last - first > 0.2, [round(h["score"], 2) for h in hist]
    assert_kl_bounded(hist)


def test_ppo_refuses_optim_settings_it_does_not_use(sft_dir, tmp_path):
    from factory.config import ConfigError
    from factory.train.ppo import run_ppo

    for key, value in (("batch_size", 16), ("gradient_accumulation_steps", 2), ("gradient_checkpointing", True)):
        cfg = ppo_cfg(sft_dir, tmp_path, steps=1)
        setattr(cfg.optim, key, value)
        with pytest.raises(ConfigError, match=f"optim.{key} is not used by PPO"):
            run_ppo(cfg, PROMPTS, lambda p, c: torch.tensor(fruit_share(c)))


def test_rollouts_ignore_the_models_generation_config(tiny_model_dir, tmp_path, monkeypatch):
    """Rollouts sample from exactly softmax(logits / ppo.temperature), whatever the model's own
    generation_config.json says: transformers merges a model's generation_config into the one passed to
    generate() for every field left unset, so a saved temperature, top-k, top-p, repetition penalty,
    minimum length or suppressed tokens would otherwise make the sampling distribution differ from the
    one PPO computes log-probabilities of. The saved policy keeps the model's generation_config."""
    from transformers.generation.logits_process import LogitsProcessorList, TemperatureLogitsWarper
    from transformers.generation.utils import GenerationMixin

    from factory.train.ppo import run_ppo

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    gen_file = model / "generation_config.json"
    saved = json.loads(gen_file.read_text()) if gen_file.exists() else {}
    saved.update({"do_sample": True, "temperature": 0.3, "top_p": 0.5, "top_k": 5, "min_p": 0.05, "typical_p": 0.9,
                  "repetition_penalty": 1.3, "no_repeat_ngram_size": 3, "min_new_tokens": 4, "min_length": 3,
                  "suppress_tokens": [100, 101]})
    gen_file.write_text(json.dumps(saved))

    class Record:
        """A logits processor that records the scores it sees and changes nothing."""

        def __init__(self):
            self.seen = []

        def __call__(self, input_ids, scores):
            self.seen.append((input_ids.clone(), scores.clone()))
            return scores

    calls = []
    original = GenerationMixin._get_logits_processor

    def spy(self, generation_config, *args, **kwargs):
        processors = original(self, generation_config, *args, **kwargs)
        raw, final = Record(), Record()
        calls.append((generation_config, list(processors), raw, final))
        return LogitsProcessorList([raw, *processors, final])

    monkeypatch.setattr(GenerationMixin, "_get_logits_processor", spy)
    temperature, n_new = 0.9, 40
    cfg = ppo_cfg(model, tmp_path, steps=1, ppo={"rollout_batch_size": 8, "mini_batch_size": 8, "ppo_epochs": 1,
                                                  "max_new_tokens": n_new, "temperature": temperature})
    run_ppo(cfg, PROMPTS, lambda p, c: torch.zeros(len(p)))

    assert len(calls) == 1
    gen_cfg, processors, raw, final = calls[0]
    assert gen_cfg.do_sample and gen_cfg.temperature == temperature and gen_cfg.num_beams in (None, 1)
    assert gen_cfg.top_k in (None, 0) and (gen_cfg.top_p is None or gen_cfg.top_p >= 1.0), gen_cfg
    assert gen_cfg.repetition_penalty in (None, 1.0) and not gen_cfg.min_new_tokens  # min_length: prompt + this
    assert gen_cfg.min_p is None and gen_cfg.suppress_tokens is None and not gen_cfg.no_repeat_ngram_size
    # the only processor: temperature, PPO's
    assert [type(p) for p in processors] == [TemperatureLogitsWarper], processors
    assert processors[0].temperature == temperature
    # what was sampled from is exactly logits / temperature, at every step
    assert len(raw.seen) == len(final.seen) >= n_new - 1
    for (_, logits), (_, scores) in zip(raw.seen, final.seen):
        assert torch.allclose(scores, logits / temperature, rtol=1e-6, atol=1e-6)
    # statistically: tokens outside the model-logit top 5 are sampled (impossible had top_k=5 leaked), and
    # the repetition penalty / n-gram ban did not act (checked above through the scores)
    outside = total = 0
    for (_, logits), (next_ids, _) in zip(raw.seen[:-1], raw.seen[1:]):
        token = next_ids[:, -1]
        top5 = logits.topk(5, dim=-1).indices
        outside += (~(top5 == token[:, None]).any(-1)).sum().item()
        total += token.numel()
    assert total >= 300 and outside > total / 2, (outside, total)
    # the saved policy carries the model's own generation_config, untouched
    out_cfg = json.loads((tmp_path / "ppo" / "generation_config.json").read_text())
    assert out_cfg["top_k"] == 5 and out_cfg["temperature"] == 0.3 and out_cfg["repetition_penalty"] == 1.3
