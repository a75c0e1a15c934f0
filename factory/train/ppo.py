"""PPO from a reward model (RLHF / RLAIF), hand-written: TRL no longer ships a PPO trainer, so this is
a compact one of our own, with the maths in `factory.train.ppo_math`.

Sources: Ouyang et al. 2022 (InstructGPT: per-token KL penalty against the frozen SFT model, the reward
model's score on the last token, the ptx pretraining-mix term); Ziegler et al. 2019 (fine-tuning LMs from
human preferences: the KL-penalised reward and the adaptive KL controller); Schulman et al. 2017 (PPO:
clipped surrogate and clipped value loss); Schulman et al. 2016 (generalized advantage estimation).

One iteration: sample `rollout_batch_size` prompts, generate responses with the policy (sampling at
`temperature`, no top-k/top-p so that the sampling distribution is the one we compute log-probabilities
of), score prompt + response with the reward model, build per-token rewards r_t = -beta * log(pi/pi_ref)
(+ score on the last token), advantages by GAE, then `ppo_epochs` passes over mini-batches minimising
policy_loss + vf_coef * value_loss (+ ptx_coef * LM loss). The value function is a linear head on the
policy's last hidden state. Dropout is off throughout (the model stays in eval mode), so a fresh
policy's ratio is exactly 1. `run_ppo` needs no store (tests use it); `train_ppo` reads prompts from it.
Of the `optim` settings PPO uses max_steps (PPO iterations), learning_rate, warmup_ratio, max_length and bf16;
its batch sizes are the `ppo` ones, and setting optim.batch_size, gradient_accumulation_steps or
gradient_checkpointing is an error rather than ignored. With optim.bf16 on a GPU the policy and the frozen
reference are loaded in bfloat16 weights (half the memory of float32 weights, gradients and AdamW moments under
autocast); on a CPU bf16 is off, as in the TRL trainers (common.trl_common_args). The value head reads the
decoder's last hidden state through a forward hook, so no forward keeps every layer's hidden states.
"""

from __future__ import annotations

import copy
import json
import random
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from factory.config import ConfigError, OptimSettings, TrainConfig
from factory.train import common
from factory.train.data import render_prompt
from factory.train.ppo_math import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, masked_mean,
                                    per_token_rewards, policy_loss, token_logprobs, value_loss, whiten)

RewardFn = Callable[[list[str], list[str]], torch.Tensor]


# ---- text ------------------------------------------------------------------------------------------------

def render_prompt_text(tok, prompt: str, fmt: str) -> str:
    """The prompt as the policy sees it (data.render_prompt; the chat template for 'chat')."""
    rendered = render_prompt(prompt, fmt)
    if fmt == "chat":
        return tok.apply_chat_template(rendered, add_generation_prompt=True, tokenize=False)
    return rendered


def load_reward_scorer(path: str | Path, prompt_format: str = "plain", trust_remote_code: bool = False,
                       batch_size: int = 8, max_length: int = 1024) -> RewardFn:
    """A reward model folder trained by `factory train reward` as a reward_fn. Scoring goes through
    reward.load_scorer, so texts are encoded exactly as in reward training (EOS appended, score read there)."""
    from factory.train.reward import load_scorer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise ConfigError(f"ppo.reward_model: {path} is not a model folder; train one first (factory train reward)")
    score = load_scorer(str(path), prompt_format, batch_size, max_length, trust_remote_code)
    return lambda prompts, completions: torch.tensor(score(prompts, completions), dtype=torch.float32)


def read_ptx_texts(path: str | Path) -> list[str]:
    """Pretraining texts for the ptx term: JSONL with a "text" field, or plain text, one per line."""
    lines = [ln for ln in Path(path).read_text(encoding="utf-8").splitlines() if ln.strip()]
    if str(path).endswith(".jsonl"):
        return [json.loads(ln)["text"] for ln in lines]
    return lines


# ---- model -----------------------------------------------------------------------------------------------

def weights_dtype(bf16: bool, gpu: bool) -> torch.dtype:
    """The dtype PPO loads the policy and the reference in: bfloat16 for optim.bf16 on a GPU, float32 otherwise
    (optim.bf16 is a GPU setting in every trainer, common.trl_common_args; CPU bf16 matmuls are slow)."""
    return torch.bfloat16 if bf16 and gpu else torch.float32


def decoder_of(lm: nn.Module) -> nn.Module:
    """The causal LM's decoder (the module whose output.last_hidden_state is the final normed hidden state
    lm_head reads): `get_decoder()` of the model, or of the base model under a peft wrapper."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    decoder = base.get_decoder()
    if decoder is base:
        raise ValueError(f"PPO's value head needs the decoder of {type(base).__name__}; get_decoder() found none")
    return decoder


class PolicyWithValue(nn.Module):
    """The causal LM plus a scalar value head on its last (normed) hidden state. The value head's weights stay
    float32 even when the LM is bfloat16: it is hidden_size + 1 numbers, and regressing returns in bfloat16 (8 bits
    of mantissa) would round the targets and lose small updates."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm
        self.value_head = nn.Linear(lm.config.get_text_config().hidden_size, 1, dtype=torch.float32)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids, attention_mask, n_resp: int, temperature: float = 1.0, lm: nn.Module | None = None):
        """Logits (float32, already divided by temperature) that predict the last `n_resp` tokens, and the value
        of the state before each of them: position t's output predicts token t+1. The last hidden state comes from
        a hook on the decoder's output: output_hidden_states=True would keep every layer's hidden states, and
        running the decoder and lm_head by hand would skip what a model's own forward does to its logits
        (Gemma's final soft-capping, logit scales)."""
        model = lm or self.lm
        hidden: list[torch.Tensor] = []

        def keep_last(module, args, output):
            last = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
            hidden.append(last[:, -n_resp - 1:-1])

        handle = decoder_of(model).register_forward_hook(keep_last)
        try:
            out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids(attention_mask),
                        logits_to_keep=n_resp + 1, use_cache=False)
        finally:
            handle.remove()
        # float32 from here on, whatever the weights: the log-softmax over the vocabulary, the ratios
        # exp(new - old) and the KL penalty are differences of log-probabilities that bfloat16 would round to
        # ~1e-2; GAE, whitening and the value loss then run on float32 values.
        logits = out.logits[:, :-1].float() / temperature
        values = self.value_head(hidden[-1].float()).squeeze(-1)
        return logits, values


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that count only real tokens (left padding shifts them), as generate() uses."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def response_mask(resp: torch.Tensor, eos_ids: list[int]) -> torch.Tensor:
    """1 on response tokens up to and including the first EOS, 0 after it."""
    is_eos = torch.isin(resp, torch.tensor(eos_ids, device=resp.device)).long()
    return ((is_eos.cumsum(1) - is_eos) == 0).long()


def eos_token_ids(tok, lm) -> list[int]:
    ids = {tok.eos_token_id}
    gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def rollout_generation_config(temperature: float, max_new_tokens: int, pad_token_id, eos_token_id, bos_token_id):
    """Generation settings under which generate() samples from exactly softmax(logits / temperature), the
    distribution PPO computes log-probabilities of. Every field that adds a logits processor or warper is set
    to its neutral value explicitly: transformers fills any field left unset from the model's own
    generation_config (and then from global defaults, which include top_k=50). Fields whose neutral value is
    None (min_new_tokens, suppress_tokens, bad_words_ids, min_p, ...) cannot be pinned this way (min_new_tokens=0
    would still add a minimum-length processor): `neutral_generation_config`
    also swaps the model's own generation_config out during rollouts."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=temperature, top_k=0, top_p=1.0, typical_p=1.0, epsilon_cutoff=0.0,
        eta_cutoff=0.0, repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0,
        encoder_no_repeat_ngram_size=0, min_length=0, num_beams=1, num_return_sequences=1,
        guidance_scale=1.0, renormalize_logits=False, remove_invalid_values=False,
        max_new_tokens=max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
        bos_token_id=bos_token_id)


def neutral_generation_config(lm: nn.Module):
    """Replace the (base) model's own generation_config by one that carries only its special-token ids, so that
    generate() merges nothing from it (temperature, top-k/top-p/min-p, repetition penalty, minimum lengths,
    suppressed tokens...). Returns the original, to put back before saving."""
    from transformers import GenerationConfig

    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    original = base.generation_config
    base.generation_config = GenerationConfig(
        **{k: getattr(original, k, None) for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return original


# ---- training --------------------------------------------------------------------------------------------

# optim settings PPO has no use for: its batches are ppo.rollout_batch_size / ppo.mini_batch_size, and
# gradient checkpointing needs train mode, which turns dropout on and breaks PPO's exact old/new ratios.
PPO_UNUSED = {"batch_size": "ppo.rollout_batch_size and ppo.mini_batch_size",
              "gradient_accumulation_steps": "ppo.mini_batch_size", "gradient_checkpointing": "LoRA (lora.enabled)"}


def check_settings(cfg: TrainConfig) -> None:
    """Refuse, rather than silently ignore, optim settings PPO does not use."""
    for key, instead in PPO_UNUSED.items():
        if getattr(cfg.optim, key) != OptimSettings.model_fields[key].default:
            raise ConfigError(f"optim.{key} is not used by PPO; remove it (PPO's counterpart: {instead})")

def run_ppo(cfg: TrainConfig, prompts: list[str], reward_fn: RewardFn, *, ptx_texts: list[str] | None = None,
            out: Path | None = None, log: Callable[[str], None] = print) -> dict:
    """PPO on `prompts` (raw prompt texts) against `reward_fn`, from the model cfg.model; saves the policy,
    value head, tokenizer and metrics.json to `out` (default common.output_dir(cfg)). No store needed."""
    from transformers import AutoModelForCausalLM

    if not prompts:
        raise ValueError("PPO needs at least one prompt")
    check_settings(cfg)
    s, o = cfg.ppo, cfg.optim
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    path, device = common.model_path(cfg), "cuda" if common.on_gpu() else "cpu"
    tok = common.load_tokenizer(path, cfg)
    saved_sides = tok.padding_side, tok.truncation_side
    tok.padding_side, tok.truncation_side = "left", "left"
    dtype = weights_dtype(o.bf16, device == "cuda")
    if o.bf16 and dtype != torch.bfloat16:
        log("optim.bf16 is a GPU setting and there is no GPU: PPO runs in float32")
    # bf16: the weights themselves (and so the reference, a copy, and AdamW's moments) are bfloat16, not float32
    # weights under autocast; LoRA adapters stay float32 (peft's autocast_adapter_dtype)
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    lm = lm.to(device)
    # rollouts must sample exactly what PPO scores: nothing from the model's generation_config (restored on save)
    model_gen_cfg = neutral_generation_config(lm)
    lora = common.peft_config(cfg)
    if lora is not None:
        from peft import get_peft_model

        lm, ref = get_peft_model(lm, lora), None  # the reference is the base model: adapters disabled
    else:
        ref = copy.deepcopy(lm).eval().requires_grad_(False)
    policy = PolicyWithValue(lm).to(device).eval()  # eval: no dropout, so ratios are exact
    params = [p for p in policy.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=o.learning_rate, weight_decay=0.0, fused=True)  # fused: ~10x faster on CPU
    n_updates = o.max_steps * s.ppo_epochs * -(-s.rollout_batch_size // s.mini_batch_size)
    warmup = max(1, round(o.warmup_ratio * n_updates))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: min(1.0, (i + 1) / warmup))
    kl_ctl = (AdaptiveKLController(s.kl_coef, s.target_kl, s.kl_horizon) if s.adaptive_kl
              else FixedKLController(s.kl_coef))
    eos_ids = eos_token_ids(tok, lm)
    gen_cfg = rollout_generation_config(s.temperature, s.max_new_tokens, tok.pad_token_id, eos_ids, tok.bos_token_id)
    rendered = [render_prompt_text(tok, p, cfg.prompt_format) for p in prompts]
    max_prompt = max(o.max_length - s.max_new_tokens, 8)
    use_ptx = s.ptx_coef > 0 and bool(ptx_texts)
    order: list[int] = []
    history: list[dict] = []
    t_start = time.time()

    def ref_logprobs(ids, attn, n):
        if ref is not None:
            return token_logprobs(policy(ids, attn, n, s.temperature, lm=ref)[0], ids[:, -n:])
        with lm.disable_adapter():
            return token_logprobs(policy(ids, attn, n, s.temperature)[0], ids[:, -n:])

    for step in range(1, o.max_steps + 1):
        # ---- rollout ----
        t0 = time.time()
        batch = []
        while len(batch) < s.rollout_batch_size:
            if not order:
                order = list(range(len(prompts)))
                rng.shuffle(order)
            batch.append(order.pop())
        enc = tok([rendered[i] for i in batch], return_tensors="pt", padding=True, truncation=True,
                  max_length=max_prompt, add_special_tokens=cfg.prompt_format != "chat").to(device)
        with torch.no_grad():
            seq = lm.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, generation_config=gen_cfg)
        t_gen = time.time() - t0
        n = seq.shape[1] - enc.input_ids.shape[1]
        resp = seq[:, -n:]
        mask = response_mask(resp, eos_ids)
        resp = torch.where(mask.bool(), resp, tok.pad_token_id)
        ids = torch.cat([enc.input_ids, resp], 1)
        attn = torch.cat([enc.attention_mask, mask], 1)
        with torch.no_grad():
            logits, values = policy(ids, attn, n, s.temperature)
            old_lp = token_logprobs(logits, resp)
            entropy = entropy_from_logits(logits, mask).item()
            del logits
            ref_lp = ref_logprobs(ids, attn, n)
        texts = tok.batch_decode(resp, skip_special_tokens=True)
        completions = [t[1:] if cfg.prompt_format == "plain" and t.startswith(" ") else t for t in texts]
        scores = torch.as_tensor(reward_fn([prompts[i] for i in batch], completions), dtype=torch.float32)
        if scores.shape != (len(batch),):
            raise ValueError(f"reward_fn returned shape {tuple(scores.shape)}, expected ({len(batch)},)")
        scores = scores.to(device)
        rewards, kl = per_token_rewards(old_lp, ref_lp, scores, mask, kl_ctl.value)
        adv, returns = gae(rewards, values, mask, s.gamma, s.lam)
        adv = whiten(adv, mask)
        t_roll = time.time() - t0

        # ---- optimisation ----
        stats: dict[str, list[float]] = {"policy_loss": [], "value_loss": [], "clipfrac": [], "vf_clipfrac": [],
                                         "approx_kl": [], "ptx_loss": []}
        for _ in range(s.ppo_epochs):
            perm = torch.randperm(len(batch)).tolist()
            for k in range(0, len(perm), s.mini_batch_size):
                mb = perm[k:k + s.mini_batch_size]
                logits, new_values = policy(ids[mb], attn[mb], n, s.temperature)
                new_lp = token_logprobs(logits, resp[mb])
                del logits
                pg, clipfrac = policy_loss(new_lp, old_lp[mb], adv[mb], mask[mb], s.cliprange)
                vf, vf_clipfrac = value_loss(new_values, values[mb], returns[mb], mask[mb], s.cliprange_value)
                loss = pg + s.vf_coef * vf
                if use_ptx:
                    ptx = ptx_loss(lm, tok, rng.sample(ptx_texts, min(len(mb), len(ptx_texts))), o.max_length)
                    loss = loss + s.ptx_coef * ptx
                    stats["ptx_loss"].append(ptx.item())
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                sched.step()
                approx_kl = 0.5 * masked_mean((new_lp.detach() - old_lp[mb]) ** 2, mask[mb])
                for key, v in (("policy_loss", pg), ("value_loss", vf), ("clipfrac", clipfrac),
                               ("vf_clipfrac", vf_clipfrac), ("approx_kl", approx_kl)):
                    stats[key].append(v.item())
        mean_kl = kl.mean().item()
        row = {"step": step, "score": scores.mean().item(), "kl": mean_kl, "kl_coef": kl_ctl.value,
               "entropy": entropy, "response_len": mask.sum(1).float().mean().item(),
               **{k: sum(v) / len(v) for k, v in stats.items() if v},
               "time_generate": t_gen, "time_rollout": t_roll, "time_optimise": time.time() - t0 - t_roll}
        kl_ctl.update(mean_kl, len(batch))
        history.append(row)
        log(f"ppo {step}/{o.max_steps}  score {row['score']:.3f}  kl {mean_kl:.3f}  beta {row['kl_coef']:.3f}  "
            f"ent {entropy:.2f}  pg {row['policy_loss']:.3f}  vf {row['value_loss']:.3f}  clip {row['clipfrac']:.2f}  "
            f"gen {t_gen:.1f}s  rollout {t_roll:.1f}s  opt {row['time_optimise']:.1f}s")

    # ---- save ----
    out = Path(out) if out is not None else common.output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    final = lm.merge_and_unload() if lora is not None else lm
    final.generation_config = model_gen_cfg
    final.save_pretrained(out)
    torch.save(policy.value_head.state_dict(), out / "value_head.pt")
    tok.padding_side, tok.truncation_side = saved_sides
    tok.save_pretrained(out)
    k = min(3, len(history))
    summary = {"steps": len(history), "prompts": len(prompts), "score_first": _mean(history[:k], "score"),
               "score_last": _mean(history[-k:], "score"), "kl_last": _mean(history[-k:], "kl"),
               "kl_coef_final": kl_ctl.value, "runtime_s": time.time() - t_start,
               "time_generate_s": sum(h["time_generate"] for h in history),
               "time_optimise_s": sum(h["time_optimise"] for h in history)}
    common.write_metrics(out, {"method": "ppo", "summary": summary, "history": history})
    return {"output_dir": str(out), "summary": summary, "history": history}


def _mean(rows: list[dict], key: str) -> float:
    return sum(r[key] for r in rows) / max(len(rows), 1)


def ptx_loss(lm, tok, texts: list[str], max_length: int) -> torch.Tensor:
    """The language-model loss on pretraining texts (the ptx term of InstructGPT); transformers computes it on
    float32 logits whatever the weights' dtype."""
    sides = tok.padding_side, tok.truncation_side
    tok.padding_side, tok.truncation_side = "right", "right"
    enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length).to(lm.device)
    tok.padding_side, tok.truncation_side = sides
    labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
    return lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask, labels=labels, use_cache=False).loss.float()


def train_ppo(cfg: TrainConfig, reward_fn: RewardFn | None = None) -> dict:
    """PPO on the training prompts of the store's preference pairs, against the reward model in
    cfg.ppo.reward_model (or `reward_fn`); records the run in the store."""
    from factory.train.data import prompt_texts

    data = common.load_data(cfg)
    prompts = [text for _, text in prompt_texts(data.train)]
    if reward_fn is None:
        reward_fn = load_reward_scorer(cfg.ppo.reward_model, cfg.prompt_format, cfg.trust_remote_code,
                                       max_length=cfg.optim.max_length)
    ptx = None
    if cfg.ppo.ptx_coef > 0:
        if not cfg.ppo.ptx_texts:
            raise ConfigError("ppo.ptx_coef > 0 needs ppo.ptx_texts (a JSONL or text file of pretraining texts)")
        ptx = read_ptx_texts(cfg.ppo.ptx_texts)
    out = common.output_dir(cfg)
    result = run_ppo(cfg, prompts, reward_fn, ptx_texts=ptx, out=out)
    result["run_id"] = common.record_training_run(cfg, "ppo", data, out, result["summary"])
    return result
