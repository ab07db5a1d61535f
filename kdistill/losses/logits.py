"""Losses on logits.

Reduction convention: every loss returns a scalar averaged over the batch ("batchmean":
sum over classes, mean over samples).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def cross_entropy(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """CE with hard labels (optionally smoothed) or with soft targets (mixup / cutmix):
    ``-mean_i sum_c q_ic log softmax(z_i)_c``."""
    if target.is_floating_point():
        return -(target * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
    return F.cross_entropy(logits.float(), target, label_smoothing=label_smoothing)


def symmetric_kl(logits_a: torch.Tensor, logits_b: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``(KL(p_a || p_b) + KL(p_b || p_a)) / 2`` at temperature T, batchmean, times T^2.

    Both sides receive gradients: this is R-Drop's regulariser (Liang et al., NeurIPS 2021,
    "R-Drop: Regularized Dropout for Neural Networks") between two dropout passes.
    """
    la = F.log_softmax(logits_a.float() / temperature, dim=-1)
    lb = F.log_softmax(logits_b.float() / temperature, dim=-1)
    kl_ab = (la.exp() * (la - lb)).sum(-1).mean()
    kl_ba = (lb.exp() * (lb - la)).sum(-1).mean()
    return 0.5 * (kl_ab + kl_ba) * temperature**2
