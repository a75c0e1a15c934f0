"""The soft-label reward loss: it is TRL's Bradley-Terry loss at hard labels, pushes rewards the right way,
is minimised where sigmoid(r_chosen - r_rejected) equals the label, and scales correctly in the Trainer."""

import math

import pytest
import torch
import torch.nn.functional as F

from factory.train.reward import bradley_terry_loss, soft_collator, soft_label_loss, soft_loss_for_trainer


def _rewards(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g) * 3, torch.randn(n, generator=g) * 3


def test_label_one_is_the_bradley_terry_loss_trl_uses():
    r_c, r_r = _rewards()
    trl_hard = -F.logsigmoid(r_c - r_r).mean()  # trl RewardTrainer.compute_loss without margin
    assert torch.allclose(soft_label_loss(r_c, r_r, torch.ones_like(r_c)), trl_hard, atol=1e-6)
    assert torch.allclose(bradley_terry_loss(r_c, r_r), trl_hard)


def test_label_zero_is_the_bradley_terry_loss_with_roles_swapped():
    r_c, r_r = _rewards(seed=1)
    expected = -F.logsigmoid(r_r - r_c).mean()
    assert torch.allclose(soft_label_loss(r_c, r_r, torch.zeros_like(r_c)), expected, atol=1e-6)


@pytest.mark.parametrize("p, sign", [(1.0, -1), (0.9, -1), (0.1, 1), (0.0, 1)])
def test_gradient_moves_rewards_towards_the_preferred_side(p, sign):
    # At equal rewards, a label above 0.5 raises r_chosen and lowers r_rejected (descent goes against the gradient).
    r_c, r_r = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
    soft_label_loss(r_c, r_r, torch.full((3,), p)).backward()
    assert torch.all(torch.sign(r_c.grad) == sign) and torch.all(torch.sign(r_r.grad) == -sign)
    assert torch.allclose(r_c.grad, -r_r.grad)


def test_half_label_is_minimised_at_equal_rewards():
    diffs = torch.linspace(-4, 4, 81)
    losses = torch.stack([soft_label_loss(d.view(1), torch.zeros(1), torch.tensor([0.5])) for d in diffs])
    assert diffs[losses.argmin()].item() == pytest.approx(0.0, abs=1e-6)
    assert losses.min().item() == pytest.approx(math.log(2), abs=1e-6)
    d = torch.zeros(1, requires_grad=True)
    soft_label_loss(d, torch.zeros(1), torch.tensor([0.5])).backward()
    assert d.grad.abs().item() < 1e-7


@pytest.mark.parametrize("p", [0.6, 0.75, 0.95])
def test_optimum_is_the_log_odds_of_the_label(p):
    # BCE is minimised where sigmoid(r_c - r_r) = p: a soft label asks for a finite reward gap.
    d = torch.tensor([math.log(p / (1 - p))], requires_grad=True)
    soft_label_loss(d, torch.zeros(1), torch.tensor([p])).backward()
    assert abs(d.grad.item()) < 1e-6


def test_trainer_loss_is_normalised_over_the_accumulated_batch():
    # transformers.Trainer passes the pairs of all accumulated micro-batches as num_items_in_batch and does not
    # divide a compute_loss_func loss again, so two half batches must sum to the full-batch mean.
    r_c, r_r = _rewards(8, seed=2)
    p = torch.rand(8, generator=torch.Generator().manual_seed(3))

    class Out:
        def __init__(self, c, r):
            self.logits = torch.cat([c, r]).unsqueeze(-1)

    full = soft_loss_for_trainer(Out(r_c, r_r), p)
    halves = sum(soft_loss_for_trainer(Out(r_c[i:i + 4], r_r[i:i + 4]), p[i:i + 4], num_items_in_batch=8)
                 for i in (0, 4))
    assert torch.allclose(full, soft_label_loss(r_c, r_r, p)) and torch.allclose(full, halves)


def test_collator_stacks_chosen_over_rejected_with_labels():
    batch = soft_collator(pad_id=0)([{"chosen_ids": [2, 5, 6], "rejected_ids": [2, 7], "label_prob": 0.8},
                                     {"chosen_ids": [2, 9], "rejected_ids": [2, 4, 4, 1], "label_prob": 1.0}])
    assert batch["input_ids"].tolist() == [[2, 5, 6, 0], [2, 9, 0, 0], [2, 7, 0, 0], [2, 4, 4, 1]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 1, 1]]
    assert batch["labels"].tolist() == pytest.approx([0.8, 1.0])
