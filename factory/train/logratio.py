"""Sequence log-probabilities with transformers forward passes, and what `factory eval` makes of them: the
held-out pair accuracy of a policy's implicit reward and a Monte-Carlo estimate of its KL to the reference.

Reads model folders (a trained policy, its reference) and token ids built exactly as TRL's DPOTrainer builds
them (`pair_ids`, `prompt_ids`: TRL's own `_tokenize` and `common_prefix_length`, plain completions ending in
EOS), so an accuracy here is the `rewards/accuracies` TRL reports, without beta (its sign does not depend on it).
Writes nothing; one model is loaded at a time by the caller (`load_causal_lm`, then `release`).
"""

from __future__ import annotations

import math

import torch

from factory.train.rates import wilson_interval


def local_folder(mcfg, role: str):
    """The model folder of a section; a path that is not a local transformers folder (an OpenAI server's model
    name, a missing folder) is a ConfigError naming the section and the fix."""
    from factory.config import ConfigError
    from factory.models import resolve_model

    try:
        path = resolve_model(mcfg.path)
    except FileNotFoundError as e:
        raise ConfigError(f"{role}.path {mcfg.path!r} is not a local transformers model folder (pair accuracy and KL "
                          f"need forward passes on its weights); give the folder the trainer wrote, e.g. "
                          f"outputs/<name> ({e})") from None
    return path


def load_causal_lm(mcfg, role: str):
    """(model, tokenizer) of a local transformers folder (`local_folder`), on CPU or the first GPU, in eval mode."""
    from transformers import AutoModelForCausalLM

    from factory.train.common import load_tokenizer

    path = local_folder(mcfg, role)
    tok = load_tokenizer(str(path), mcfg)  # as training loaded it (pad token, Gemma's <bos>)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(mcfg.dtype, "auto")
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
    return model.to("cuda" if torch.cuda.is_available() else "cpu").eval(), tok


def release(model) -> None:
    from factory.engines.base import free_memory

    del model
    free_memory()


def prompt_ids(tok, prompt) -> list[int]:
    """The ids TRL's DPOTrainer builds for a prompt: the chat template with the generation prompt for messages,
    the tokenizer's own special tokens for plain text."""
    from trl.data_utils import _tokenize

    if isinstance(prompt, list):
        return list(_tokenize(tok, prompt, add_generation_prompt=True)["input_ids"])
    return list(_tokenize(tok, prompt)["input_ids"])


def pair_ids(tok, example: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) ids of one row of `data.preference_dataset`, as DPOTrainer's `tokenize_fn` builds
    them: EOS appended to plain completions, the completion starting where prompt and prompt + completion diverge."""
    from trl.data_utils import _tokenize, common_prefix_length

    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if isinstance(prompt, list):
        p = prompt_ids(tok, prompt)
        pc = list(_tokenize(tok, prompt + chosen)["input_ids"])
        pr = list(_tokenize(tok, prompt + rejected)["input_ids"])
    else:
        eos = tok.eos_token
        p = prompt_ids(tok, prompt)
        pc = list(_tokenize(tok, prompt + (chosen if chosen.endswith(eos) else chosen + eos))["input_ids"])
        pr = list(_tokenize(tok, prompt + (rejected if rejected.endswith(eos) else rejected + eos))["input_ids"])
    k = min(common_prefix_length(p, pc), common_prefix_length(p, pr))
    return p[:k], pc[k:], pr[k:]


@torch.no_grad()
def sequence_logprobs(model, sequences: list[tuple[list[int], list[int]]], pad_id: int,
                      batch_size: int = 8) -> list[float]:
    """sum_t log p(completion_t | prompt, completion_<t) of each (prompt ids, completion ids), batched with right
    padding (the same batches give the same numbers, bit for bit, for the same model)."""
    out: list[float] = []
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        batch = sequences[start:start + batch_size]
        width = max(len(p) + len(c) for p, c in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, (p, c) in enumerate(batch):
            ids[i, :len(p) + len(c)] = torch.tensor(p + c)
            mask[i, :len(p) + len(c)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[:, 1:].to(device).unsqueeze(-1)).squeeze(-1)
        for i, (p, c) in enumerate(batch):  # the token at position j is predicted at j - 1
            out.append(float(logp[i, len(p) - 1:len(p) + len(c) - 1].sum()) if c else 0.0)
    return out


@torch.no_grad()
def sample_completions(model, tok, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    """One completion per prompt sampled from the model itself (temperature 1, no top-k, top-p or repetition
    penalty from the folder's generation_config: exactly pi), seeded per prompt; each ends at the first EOS
    (kept) or after max_new_tokens."""
    from transformers import GenerationConfig

    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else []) | {tok.eos_token_id}
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           eos_token_id=sorted(i for i in eos_ids if i is not None), pad_token_id=tok.pad_token_id)
    device = next(model.parameters()).device
    out = []
    for i, p in enumerate(prompts):
        torch.manual_seed(seed + i)
        ids = model.generate(input_ids=torch.tensor([p], device=device), attention_mask=torch.ones((1, len(p)),
                             dtype=torch.long, device=device), generation_config=gen)[0, len(p):].tolist()
        cut = next((j + 1 for j, t in enumerate(ids) if t in eos_ids), len(ids))
        out.append(ids[:cut])
    return out


def pair_accuracy(pol_chosen: list[float], pol_rejected: list[float], ref_chosen: list[float],
                  ref_rejected: list[float]) -> dict:
    """Share of pairs whose implicit reward ranks chosen above rejected: (log pi(chosen) - log ref(chosen)) -
    (log pi(rejected) - log ref(rejected)) > 0, TRL's rewards/accuracies without beta; with its count, 95%
    interval and the mean log-ratio margin."""
    margins = [(pc - rc) - (pr - rr) for pc, pr, rc, rr in zip(pol_chosen, pol_rejected, ref_chosen, ref_rejected)]
    right = sum(m > 0 for m in margins)
    n = len(margins)
    return {"pair_accuracy": right / n if n else None, "pair_accuracy_n": n,
            "pair_accuracy_ci95": wilson_interval(right, n), "pair_margin": sum(margins) / n if n else None}


def kl_estimate(pol: list[float], ref: list[float]) -> dict:
    """Mean over prompts of sum_t [log pi(y_t) - log ref(y_t)] on completions y sampled from pi: the Monte-Carlo
    estimate of KL(pi || ref) per sequence (nats), with its count and standard error. Exactly 0 when pi is ref."""
    diffs = [p - r for p, r in zip(pol, ref)]
    n = len(diffs)
    if not n:
        return {"kl": None, "kl_n": 0, "kl_se": None}
    mean = sum(diffs) / n
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
    return {"kl": mean, "kl_n": n, "kl_se": math.sqrt(var / n)}
