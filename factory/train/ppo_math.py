"""The pure maths of PPO for language models (RLHF), in torch, kept apart from the trainer so it can be
tested by hand. Tensors are [batch, response_len]; `mask` is 1 (or True) on real response tokens and 0
on padding, and every function ignores padded tokens.

- per-token reward: -beta * (log pi(y_t) - log pi_ref(y_t)), plus the reward model's score on the last
  real token (Ziegler et al. 2019; Ouyang et al. 2022, InstructGPT);
- generalized advantage estimation, GAE(gamma, lambda) (Schulman et al. 2016);
- the clipped surrogate objective and the clipped value loss (Schulman et al. 2017, PPO);
- the adaptive KL controller of Ziegler et al. 2019, and a fixed one.
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var  # unbiased


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """(x - mean) / std over the real tokens; padded positions come out as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask.to(x.dtype)


def last_token_index(mask: torch.Tensor) -> torch.Tensor:
    """Index of the last real token of each row (0 for a row without any)."""
    pos = torch.arange(mask.shape[1], device=mask.device)
    return (pos * mask.to(torch.long)).argmax(dim=1)


def per_token_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, score: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards r_t = -kl_coef * (logprob_t - ref_logprob_t), with `score` [batch] added on the last real
    token. Returns (rewards [batch, T], per-sequence KL estimate [batch] = sum of the log-ratios)."""
    m = mask.to(logprobs.dtype)
    kl = (logprobs - ref_logprobs) * m
    rewards = -kl_coef * kl
    has_tokens = m.sum(1) > 0
    rows = torch.arange(len(score), device=score.device)
    rewards[rows, last_token_index(mask)] += torch.where(has_tokens, score.to(rewards.dtype), 0.0)
    return rewards, kl.sum(1)


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation, backwards over the real tokens only:
    delta_t = r_t + gamma * V_{t+1} - V_t,  A_t = delta_t + gamma * lam * A_{t+1},
    where t+1 is the next *real* token (V and A are 0 after the last one). Padded positions are skipped
    (they neither receive nor pass on anything) and get advantage and return 0.
    Returns (advantages, returns = advantages + values)."""
    m = mask.bool()
    adv = torch.zeros_like(rewards)
    next_value = torch.zeros_like(rewards[:, 0])
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        a = delta + gamma * lam * next_adv
        next_adv = torch.where(m[:, t], a, next_adv)
        next_value = torch.where(m[:, t], values[:, t], next_value)
        adv[:, t] = torch.where(m[:, t], a, 0.0)
    returns = torch.where(m, adv + values, 0.0)
    return adv, returns


def policy_loss(new_logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped surrogate, as a loss to minimise: mean over real tokens of
    max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps)). Returns (loss, clip fraction = share of real
    tokens where the clipped term is the one used)."""
    ratio = torch.exp(new_logprobs - old_logprobs)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - cliprange, 1.0 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    clipfrac = masked_mean((clipped > unclipped).to(new_logprobs.dtype), mask)
    return loss, clipfrac.detach()


def value_loss(new_values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Clipped value loss: 0.5 * mean over real tokens of max((V - R)^2, (V_clipped - R)^2), where
    V_clipped = V_old + clip(V - V_old, -eps, eps). Returns (loss, value clip fraction)."""
    v_clipped = old_values + torch.clamp(new_values - old_values, -cliprange_value, cliprange_value)
    err, err_clipped = (new_values - returns) ** 2, (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(err, err_clipped), mask)
    clipfrac = masked_mean((err_clipped > err).to(new_values.dtype), mask)
    return loss, clipfrac.detach()


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions over the real tokens; logits [B, T, V]."""
    logz = torch.logsumexp(logits, dim=-1)
    ent = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
    return masked_mean(ent, mask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[token], without materialising the full log-softmax; logits [B, T, V]."""
    return torch.gather(logits, -1, tokens.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


class FixedKLController:
    """A constant KL coefficient beta."""

    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. 2019: beta <- beta * (1 + K_beta * e), e = clip(KL / target - 1, -0.2, 0.2),
    K_beta = n_steps / horizon. beta grows while the KL is above target and shrinks while below."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int):
        self.value, self.target, self.horizon = init_kl_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_steps / self.horizon
