"""DPO with the judge's soft labels: the target of each pair is its stored P(chosen), not 1.

TRL's DPO losses take one global label smoothing at most; factory's labels are per pair (the judge's probability,
both orders averaged). The loss here is the cross-entropy between the label p and sigmoid(beta * delta), delta
the margin of the policy/reference log-ratios of chosen over rejected:

    loss = -p * log sigmoid(beta * delta) - (1 - p) * log sigmoid(-beta * delta)

At p = 1 it is DPO's sigmoid loss; with p = 1 - eps for every pair it is conservative DPO (label smoothing eps).
Written by hand (no maintained library has a per-pair label): only the loss is ours. Everything else, the
datasets' tokenization, the collator, the reference model (a frozen copy, or the LoRA model with its adapters
off) and precomputed reference log-probabilities, is TRL's DPOTrainer; `compute_ref_log_probs` is its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dpo_loss(delta: torch.Tensor, label: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-pair loss: cross-entropy between P(chosen) = `label` and sigmoid(beta * delta)."""
    return -label * F.logsigmoid(beta * delta) - (1 - label) * F.logsigmoid(-beta * delta)


def soft_dpo_trainer(**kwargs):
    """TRL's DPOTrainer with the soft-label loss (the training dataset carries a `label_prob` column)."""
    from trl import DPOTrainer

    class SoftDPOTrainer(DPOTrainer):
        def __init__(self, **kw):
            super().__init__(**kw)
            collate = self.data_collator

            def with_labels(examples):  # TRL's collator, plus each pair's label
                return {**collate(examples), "label_prob": torch.tensor([float(e["label_prob"]) for e in examples])}

            self.data_collator = with_labels

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            label = inputs.pop("label_prob").to(self.accelerator.device)
            kwargs = {k: v for k, v in inputs.items()
                      if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
            completion_mask = inputs["completion_mask"]
            labels = inputs["input_ids"].masked_fill(completion_mask == 0, -100)
            outputs = model(**kwargs, use_cache=False, labels=labels, fused_lm_head=True)
            logps = outputs.log_probs[:, -(completion_mask.size(1) - 1):].sum(dim=1)
            chosen, rejected = logps.chunk(2, dim=0)  # the batch is [chosen..., rejected...]
            if "ref_chosen_logps" in inputs:
                ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            else:
                ref_model = model if self.ref_model is None else self.ref_model  # None: LoRA, adapters off
                ref_chosen, ref_rejected = self.compute_ref_log_probs(ref_model, inputs)
            chosen_ratio, rejected_ratio = chosen - ref_chosen, rejected - ref_rejected
            loss = soft_dpo_loss(chosen_ratio - rejected_ratio, label.to(logps.dtype), self.beta).mean()
            # TRL's reward metrics, so eval_rewards/accuracies and margins read as for TRL's own losses
            chosen_rewards, rejected_rewards = self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach()
            gather = self.accelerator.gather
            for name, value in (("rewards/chosen", chosen_rewards), ("rewards/rejected", rejected_rewards),
                                ("rewards/accuracies", (chosen_rewards > rejected_rewards).float()),
                                ("rewards/margins", chosen_rewards - rejected_rewards),
                                ("logps/chosen", chosen.detach()), ("logps/rejected", rejected.detach())):
                self._metrics[mode][name].append(gather(value).mean().item())
            return (loss, outputs) if return_outputs else loss

    return SoftDPOTrainer(**kwargs)
