"""Losses on logits.

Reduction convention: every loss returns a scalar averaged over the batch ("batchmean":
sum over classes, mean over samples).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


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


# ---------------------------------------------------------------- functional forms


def kl_div(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``KL(p_t || p_s)`` at temperature T, batchmean, times T^2 (Hinton et al. 2015)."""
    log_s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean() * temperature**2


def js_div(s_logits: torch.Tensor, t_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Jensen-Shannon divergence ``(KL(p_s||m) + KL(p_t||m)) / 2`` with ``m = (p_s + p_t) / 2``,
    batchmean, times T^2."""
    log_s = F.log_softmax(s_logits.float() / temperature, dim=-1)
    log_t = F.log_softmax(t_logits.float() / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_s, log_t]), dim=0) - torch.log(torch.tensor(2.0))
    kl_s = (log_s.exp() * (log_s - log_m)).sum(-1)
    kl_t = (log_t.exp() * (log_t - log_m)).sum(-1)
    return 0.5 * (kl_s + kl_t).mean() * temperature**2


def _hard(targets: torch.Tensor | None, t_logits: torch.Tensor) -> torch.Tensor:
    """Class indices: the labels (argmax of soft labels), or the teacher's prediction when
    label-free."""
    if targets is None:
        return t_logits.argmax(-1)
    return targets.argmax(-1) if targets.is_floating_point() else targets


def _split_target(logits: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Log of the binary (target, non-target) probabilities, (B, 2), and of the distribution
    over the non-target classes, (B, C) with 0 at the target.

    Exact in log space for any finite logits: ``log p_t = z_t - lse(z)`` and
    ``log(1 - p_t) = lse(z_{-t}) - lse(z)`` (not ``log1p(-p_t)``, which is lost once ``p_t``
    rounds to 1), as a log-softmax over ``(z_t, lse(z_{-t}))``; the non-target distribution
    is a log-softmax with the target masked by ``-inf``. Rows are first shifted by their
    largest non-target logit (detached; softmax is shift-invariant), so every log-softmax
    sees small numbers: adding a constant to all logits changes nothing (beyond the rounding
    of the shifted inputs), and the non-target probabilities keep full float32 precision
    next to a target logit of 1e4.
    """
    mask = F.one_hot(gt, logits.shape[-1]).bool()
    z = logits - logits.detach().masked_fill(mask, float("-inf")).amax(-1, keepdim=True)
    rest = z.masked_fill(mask, float("-inf"))
    lse_rest = torch.logsumexp(rest, dim=-1, keepdim=True)
    binary = F.log_softmax(torch.cat([z.gather(1, gt[:, None]), lse_rest], dim=1), dim=-1)
    return binary, F.log_softmax(rest, dim=-1).masked_fill(mask, 0.0)


def dkd_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, gt: torch.Tensor, alpha: float = 1.0,
             beta: float = 8.0, temperature: float = 4.0) -> torch.Tensor:
    """Decoupled KD: ``T^2 * (alpha * TCKD + beta * NCKD)``, batchmean (sum within a row, mean
    over the batch).

    With ``b = (p_gt, 1 - p_gt)`` the binary target / non-target probabilities and ``q`` the
    distribution over the non-target classes (softmax of the logits without the target), all
    at temperature T: ``TCKD = KL(b_teacher || b_student)`` and
    ``NCKD = KL(q_teacher || q_student)`` (Zhao et al., CVPR 2022, "Decoupled Knowledge
    Distillation"). Computed in float32 and in log space (see :func:`_split_target`): finite
    and accurate, value and gradient, for any finite logits, including a student whose
    ``p_gt`` rounds to 1 (TCKD keeps growing and pushing it towards the teacher's ``p_gt``).
    """
    bs, ns = _split_target(s_logits.float() / temperature, gt)
    bt, nt = _split_target(t_logits.float() / temperature, gt)
    tckd = (bt.exp() * (bt - bs)).sum(-1).mean()
    non_target = 1 - F.one_hot(gt, s_logits.shape[-1]).float()
    nckd = (nt.exp() * (nt - ns) * non_target).sum(-1).mean()
    return (alpha * tckd + beta * nckd) * temperature**2


def _pearson_rows(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    return (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


def dist_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, beta: float = 1.0, gamma: float = 1.0,
              temperature: float = 1.0) -> torch.Tensor:
    """DIST: ``T^2 * (beta * inter + gamma * intra)`` with ``inter = mean_i (1 - pearson(p_s[i,:],
    p_t[i,:]))`` (per image, across classes) and ``intra = mean_c (1 - pearson(p_s[:,c],
    p_t[:,c]))`` (per class, across the batch) (Huang et al., NeurIPS 2022, "Knowledge
    Distillation from A Stronger Teacher")."""
    ps = F.softmax(s_logits.float() / temperature, dim=-1)
    pt = F.softmax(t_logits.float() / temperature, dim=-1)
    inter = (1 - _pearson_rows(ps, pt)).mean()
    intra = (1 - _pearson_rows(ps.t(), pt.t())).mean()
    return (beta * inter + gamma * intra) * temperature**2


# ---------------------------------------------------------------- registered modules

from . import LossInputs, Shapes, register_loss  # noqa: E402


@register_loss("ce", "logits", label_free=False, needs_teacher=False)
class CE(nn.Module):
    """Cross-entropy with the labels (hard, or soft after mixup); 0 for label-free batches.

    ``mean_i -sum_c q_ic log softmax(z_i)_c``; rows without a label never reach it.
    """

    def __init__(self, shapes: Shapes, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing

    def forward(self, inp: LossInputs) -> torch.Tensor:
        if inp.targets is None or inp.targets.shape[0] == 0:
            return inp.s_logits.float().sum() * 0.0
        return cross_entropy(inp.s_logits, inp.targets, self.label_smoothing)


@register_loss("kd", "logits")
class KD(nn.Module):
    """Hinton soft targets: ``T^2 * KL(softmax(t/T) || softmax(s/T))``, batchmean.

    Hinton, Vinyals, Dean 2015, "Distilling the Knowledge in a Neural Network".
    """

    def __init__(self, shapes: Shapes, temperature: float = 4.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inp: LossInputs) -> torch.Tensor:
        return kl_div(inp.s_logits, inp.t_logits.detach(), self.temperature)


@register_loss("js", "logits")
class JS(nn.Module):
    """Jensen-Shannon divergence between teacher and student soft labels (SSLD).

    ``T^2 * (KL(p_s||m) + KL(p_t||m)) / 2``, ``m = (p_s + p_t) / 2``, batchmean; needs no
    labels (Cui et al. 2021, PaddleClas "Beyond Self-Supervision: ... SSLD").
    """

    def __init__(self, shapes: Shapes, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inp: LossInputs) -> torch.Tensor:
        return js_div(inp.s_logits, inp.t_logits.detach(), self.temperature)


@register_loss("skl", "logits")
class SKL(nn.Module):
    """Symmetric KL ``T^2 * (KL(p_t||p_s) + KL(p_s||p_t)) / 2``, batchmean (SKL-UGI).

    The teacher side is a constant here (no gradient reaches the teacher). Used on general
    unlabeled images in "Distilling ... with Symmetric KL on Unlabeled General Images"
    (PaddleClas SKL-UGI).
    """

    def __init__(self, shapes: Shapes, temperature: float = 1.0) -> None:
        super().__init__()
        self.temperature = temperature

    def forward(self, inp: LossInputs) -> torch.Tensor:
        return symmetric_kl(inp.s_logits, inp.t_logits.detach(), self.temperature)


@register_loss("dkd", "logits")
class DKD(nn.Module):
    """Decoupled KD: ``T^2 * (alpha * TCKD + beta * NCKD)``, batchmean (Zhao et al., CVPR 2022).

    Label-free (targets=None): the teacher's top-1 class stands in for the label.
    """

    def __init__(self, shapes: Shapes, alpha: float = 1.0, beta: float = 8.0,
                 temperature: float = 4.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.temperature = alpha, beta, temperature

    def forward(self, inp: LossInputs) -> torch.Tensor:
        gt = _hard(inp.targets, inp.t_logits)
        return dkd_loss(inp.s_logits, inp.t_logits.detach(), gt, self.alpha, self.beta, self.temperature)


@register_loss("dist", "logits")
class DIST(nn.Module):
    """DIST: Pearson-correlation inter- and intra-class relations, ``T^2 (beta*inter + gamma*intra)``.

    Huang et al., NeurIPS 2022, "Knowledge Distillation from A Stronger Teacher".
    """

    def __init__(self, shapes: Shapes, beta: float = 1.0, gamma: float = 1.0,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self.beta, self.gamma, self.temperature = beta, gamma, temperature

    def forward(self, inp: LossInputs) -> torch.Tensor:
        return dist_loss(inp.s_logits, inp.t_logits.detach(), self.beta, self.gamma, self.temperature)
