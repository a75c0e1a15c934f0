"""PPO maths against numbers worked out by hand (factory.train.ppo_math), plus the small token helpers of
factory.train.ppo (response mask after EOS, positions with left padding)."""

import math

import pytest
import torch

from factory.train.ppo import position_ids, response_mask
from factory.train.ppo_math import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae,
                                    per_token_rewards, policy_loss, token_logprobs, value_loss, whiten)


def t(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def gae_by_hand(rewards, values, gamma, lam):
    """Plain-Python GAE over one unpadded sequence (the value after the last token is 0)."""
    adv, next_adv = [0.0] * len(rewards), 0.0
    for i in reversed(range(len(rewards))):
        next_value = values[i + 1] if i + 1 < len(rewards) else 0.0
        next_adv = rewards[i] + gamma * next_value - values[i] + gamma * lam * next_adv
        adv[i] = next_adv
    return adv


def test_gae_three_tokens_by_hand():
    # gamma=1, lam=0.95, rewards (0.1, -0.2, 1.0), values (0.5, 0.3, 0.8):
    # delta_2 = 1.0 + 0 - 0.8 = 0.2;           A_2 = 0.2
    # delta_1 = -0.2 + 0.8 - 0.3 = 0.3;        A_1 = 0.3 + 0.95 * 0.2 = 0.49
    # delta_0 = 0.1 + 0.3 - 0.5 = -0.1;        A_0 = -0.1 + 0.95 * 0.49 = 0.3655
    adv, ret = gae(t([0.1, -0.2, 1.0]), t([0.5, 0.3, 0.8]), t([1, 1, 1]), gamma=1.0, lam=0.95)
    assert adv[0].tolist() == pytest.approx([0.3655, 0.49, 0.2], abs=1e-6)
    assert ret[0].tolist() == pytest.approx([0.8655, 0.79, 1.0], abs=1e-6)  # returns = advantages + values


def test_gae_matches_plain_python_with_discount():
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(1, 6, generator=g), torch.randn(1, 6, generator=g)
    adv, _ = gae(r, v, torch.ones(1, 6), gamma=0.9, lam=0.8)
    assert adv[0].tolist() == pytest.approx(gae_by_hand(r[0].tolist(), v[0].tolist(), 0.9, 0.8), abs=1e-5)


def test_gae_padding_is_ignored():
    # Row 0: 3 real tokens then 2 pads holding garbage; row 1: 5 real tokens.
    rewards = t([0.1, -0.2, 1.0, 50.0, -7.0], [0.3, 0.0, 0.2, -0.1, 0.5])
    values = t([0.5, 0.3, 0.8, 9.0, 9.0], [0.1, 0.2, 0.3, 0.4, 0.5])
    mask = t([1, 1, 1, 0, 0], [1, 1, 1, 1, 1])
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=0.95)
    assert adv[0, :3].tolist() == pytest.approx([0.3655, 0.49, 0.2], abs=1e-6)  # as without padding
    assert adv[0, 3:].tolist() == [0.0, 0.0] and ret[0, 3:].tolist() == [0.0, 0.0]
    assert adv[1].tolist() == pytest.approx(gae_by_hand(rewards[1].tolist(), values[1].tolist(), 1.0, 0.95), abs=1e-6)


def test_per_token_rewards_kl_and_score_on_last_real_token():
    logprobs = t([-1.0, -2.0, -0.5, -3.0], [-1.0, -1.0, -1.0, -1.0])
    ref = t([-1.5, -1.0, -0.5, -9.0], [-1.0, -1.0, -1.0, -1.0])
    mask = t([1, 1, 1, 0], [1, 0, 0, 0])
    rewards, kl = per_token_rewards(logprobs, ref, t(2.0, -1.0), mask, kl_coef=0.1)
    # row 0: log-ratios (0.5, -1.0, 0.0), the pad's 6.0 is ignored; the score 2.0 lands on token 2
    assert rewards[0].tolist() == pytest.approx([-0.05, 0.1, 0.0 + 2.0, 0.0])
    assert rewards[1].tolist() == pytest.approx([-1.0, 0.0, 0.0, 0.0])  # one real token: it takes the score
    assert kl.tolist() == pytest.approx([-0.5, 0.0])


def test_policy_loss_clips_in_both_directions():
    eps = 0.2
    up, down = math.log(1.5), math.log(0.5)  # ratios 1.5 and 0.5, both outside [0.8, 1.2]
    old = torch.zeros(1, 1)

    def loss(delta, a):
        value, frac = policy_loss(torch.full((1, 1), delta), old, torch.full((1, 1), a), torch.ones(1, 1), eps)
        return value.item(), frac.item()

    assert loss(up, 2.0) == pytest.approx((-2.0 * 1.2, 1.0))    # A > 0, ratio too high: clipped at 1 + eps
    assert loss(down, 2.0) == pytest.approx((-2.0 * 0.5, 0.0))  # A > 0, ratio low: the unclipped (pessimistic)
    assert loss(down, -2.0) == pytest.approx((2.0 * 0.8, 1.0))  # A < 0, ratio too low: clipped at 1 - eps
    assert loss(up, -2.0) == pytest.approx((2.0 * 1.5, 0.0))    # A < 0, ratio high: unclipped
    assert loss(math.log(1.1), 2.0) == pytest.approx((-2.0 * 1.1, 0.0))  # inside the range: plain ratio * A


def test_policy_loss_clip_fraction_mask_and_gradient():
    new = torch.tensor([[math.log(1.5), math.log(1.1), math.log(0.5), 5.0]], requires_grad=True)
    adv, mask = t([1.0, 1.0, -1.0, 1.0]), t([1, 1, 1, 0])
    loss, frac = policy_loss(new, torch.zeros(1, 4), adv, mask, 0.2)
    assert frac.item() == pytest.approx(2 / 3)  # tokens 0 and 2 clipped; the pad does not count
    assert loss.item() == pytest.approx((-1.2 - 1.1 + 0.8) / 3)
    loss.backward()
    # clipped tokens and the pad get no gradient; the unclipped one gets -A * ratio / n
    assert new.grad[0].tolist() == pytest.approx([0.0, -1.1 / 3, 0.0, 0.0])


def test_value_loss_takes_the_larger_of_clipped_and_unclipped():
    old, ret, mask = torch.zeros(1, 1), torch.ones(1, 1), torch.ones(1, 1)
    # new = 1.0 hits the return, but the clipped value 0.2 is 0.8 off: 0.5 * 0.8^2
    loss, frac = value_loss(torch.ones(1, 1), old, ret, mask, 0.2)
    assert (loss.item(), frac.item()) == pytest.approx((0.5 * 0.64, 1.0))
    # inside the clip range both agree: 0.5 * (0.1 - 1)^2
    loss, frac = value_loss(torch.full((1, 1), 0.1), old, ret, mask, 0.2)
    assert (loss.item(), frac.item()) == pytest.approx((0.5 * 0.81, 0.0))
    # moving away from the return is never clipped away: new = -1 vs clipped -0.2 -> 0.5 * 2^2
    loss, _ = value_loss(torch.full((1, 1), -1.0), old, ret, mask, 0.2)
    assert loss.item() == pytest.approx(2.0)
    # padded tokens do not count
    loss, _ = value_loss(t([0.1, 50.0]), torch.zeros(1, 2), torch.ones(1, 2), t([1, 0]), 0.2)
    assert loss.item() == pytest.approx(0.5 * 0.81)


def test_adaptive_kl_controller_moves_beta_towards_target():
    high = AdaptiveKLController(0.1, target=6.0, horizon=100)
    high.update(current_kl=12.0, n_steps=10)  # error clipped to +0.2 -> beta * (1 + 0.2 * 10 / 100)
    assert high.value == pytest.approx(0.1 * 1.02)
    low = AdaptiveKLController(0.1, target=6.0, horizon=100)
    low.update(current_kl=5.4, n_steps=10)  # error -0.1
    assert low.value == pytest.approx(0.1 * 0.99)
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_whiten_over_real_tokens_only():
    x, mask = t([1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -100.0, 7.0]), t([1, 1, 1, 0], [1, 1, 0, 0])
    w = whiten(x, mask)
    real = w[mask.bool()]
    assert real.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert real.std().item() == pytest.approx(1.0, abs=1e-4)
    assert w[~mask.bool()].tolist() == [0.0, 0.0, 0.0]


def test_entropy_and_token_logprobs():
    v = 7
    logits = torch.zeros(1, 2, v)
    logits[0, 1, 3] = 100.0  # token 1: practically one-hot
    assert entropy_from_logits(logits, t([1, 0])).item() == pytest.approx(math.log(v))
    assert entropy_from_logits(logits, t([0, 1])).item() == pytest.approx(0.0, abs=1e-4)
    assert entropy_from_logits(logits, t([1, 1])).item() == pytest.approx(math.log(v) / 2, abs=1e-4)
    g = torch.Generator().manual_seed(0)
    logits, tokens = torch.randn(2, 3, v, generator=g), torch.randint(0, v, (2, 3), generator=g)
    expected = torch.log_softmax(logits, -1).gather(-1, tokens[..., None])[..., 0]
    assert torch.allclose(token_logprobs(logits, tokens), expected, atol=1e-6)


def test_response_mask_stops_after_first_eos_and_positions_skip_left_padding():
    eos, pad = 1, 0
    resp = torch.tensor([[5, 6, eos, pad, pad], [5, eos, 7, eos, 8], [5, 6, 7, 8, 9]])
    assert response_mask(resp, [eos, 106]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    attn = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    assert position_ids(attn).tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]


def test_weights_dtype_is_bfloat16_only_for_bf16_on_a_gpu():
    """optim.bf16 loads PPO's policy and reference in bfloat16 weights on a GPU; on a CPU it is off (float32), as
    common.trl_common_args makes it for the TRL trainers."""
    from factory.train.ppo import weights_dtype

    assert weights_dtype(bf16=True, gpu=True) == torch.bfloat16
    assert weights_dtype(bf16=True, gpu=False) == torch.float32
    assert weights_dtype(bf16=False, gpu=True) == torch.float32
    assert weights_dtype(bf16=False, gpu=False) == torch.float32
