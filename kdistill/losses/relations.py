"""Losses on pooled penultimate features ("embeddings"): relations between samples.

``inp.s_embed`` is (B, Ds) and ``inp.t_embed`` (B, Dt); Ds and Dt may differ. Every loss
computes in float32 with autocast off and treats the teacher side as a constant (detached).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import LossInputs, Shapes, register_loss
from .features import float32


def _embeds(inp: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
    if inp.s_embed is None or inp.t_embed is None:
        raise ValueError("relation losses need student and teacher embeddings (s_embed, t_embed)")
    return inp.s_embed.float(), inp.t_embed.detach().float()


# ---------------------------------------------------------------- RKD


def pairwise_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, B) Euclidean distances, exactly 0 on the diagonal (no sqrt-at-0 gradient)."""
    sq = e.pow(2).sum(1)
    d2 = (sq[:, None] + sq[None, :] - 2 * e @ e.t()).clamp(min=eps)
    off = 1.0 - torch.eye(e.shape[0], device=e.device, dtype=e.dtype)
    return d2.sqrt() * off


def normalized_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Distances divided by their mean over the B(B-1) off-diagonal pairs."""
    d = pairwise_distances(e, eps)
    b = e.shape[0]
    return d / (d.sum() / (b * (b - 1))).clamp(min=eps)


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """(B, B, B) cosines ``cos(e_j - e_i, e_k - e_i)`` of the angle at vertex i."""
    u = F.normalize(e[None, :, :] - e[:, None, :], dim=2)  # u[i, j] = unit(e_j - e_i)
    return u @ u.transpose(1, 2)


@register_loss("rkd", "relations")
class RKD(nn.Module):
    """Relational KD: match normalised pairwise distances and triplet angles of embeddings.

    ``L = w_dist * smoothL1(psi_D(s), psi_D(t)) + w_angle * smoothL1(psi_A(s), psi_A(t))`` with
    ``psi_D`` the (B, B) Euclidean distances divided by their mean over off-diagonal pairs and
    ``psi_A[i,j,k] = cos(e_j - e_i, e_k - e_i)``. Reduction as in the authors' code: smooth L1
    (beta 1) averaged over all B^2 (distance) / B^3 (angle) entries, diagonal included.
    Dimension-free: no adapters. 0 for batches of fewer than 2 samples.
    Park et al., CVPR 2019, "Relational Knowledge Distillation".
    """

    def __init__(self, shapes: Shapes, w_dist: float = 25.0, w_angle: float = 50.0) -> None:
        super().__init__()
        self.w_dist, self.w_angle = w_dist, w_angle

    def forward(self, inp: LossInputs) -> torch.Tensor:
        s, t = _embeds(inp)
        with float32(s.device):
            if s.shape[0] < 2:
                return s.sum() * 0.0
            dist = F.smooth_l1_loss(normalized_distances(s), normalized_distances(t))
            angle = F.smooth_l1_loss(triplet_angles(s), triplet_angles(t))
            return self.w_dist * dist + self.w_angle * angle


# ---------------------------------------------------------------- PKT


def cosine_conditional(e: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Rows of ``(K + 1) / 2`` (K the cosine kernel) normalised to sum 1: P(j | i)."""
    e = e / (e.norm(dim=1, keepdim=True) + eps)
    k = (e @ e.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


@register_loss("pkt", "relations")
class PKT(nn.Module):
    """Probabilistic knowledge transfer: match cosine-kernel conditional probabilities.

    ``P(j|i) = k_ij / sum_j k_ij`` with ``k_ij = (cos(e_i, e_j) + 1) / 2``; loss
    ``mean_{i,j} P_t(j|i) log((P_t(j|i) + eps) / (P_s(j|i) + eps))`` with eps = 1e-7, i.e. the
    authors' reduction: the mean over all B^2 entries, which equals ``(1/B) * batchmean
    KL(P_t || P_s)`` (so the CRD repo's weight 30000 carries over).
    Passalis & Tefas, ECCV 2018, "Learning Deep Representations with Probabilistic Knowledge
    Transfer".
    """

    def __init__(self, shapes: Shapes, eps: float = 1e-7) -> None:
        super().__init__()
        self.eps = eps

    def forward(self, inp: LossInputs) -> torch.Tensor:
        s, t = _embeds(inp)
        with float32(s.device):
            p_s, p_t = cosine_conditional(s, self.eps), cosine_conditional(t, self.eps)
            return (p_t * torch.log((p_t + self.eps) / (p_s + self.eps))).mean()


# ---------------------------------------------------------------- CRD


def info_nce(anchor: torch.Tensor, positive: torch.Tensor, negatives: torch.Tensor,
             temperature: float) -> torch.Tensor:
    """``mean_b -log softmax([a.p, a.n_1, ..., a.n_K] / T)[0]`` (unit vectors in, K may be 0)."""
    pos = (anchor * positive).sum(1, keepdim=True)
    logits = torch.cat([pos, anchor @ negatives.t()], dim=1) / temperature
    return (torch.logsumexp(logits, dim=1) - logits[:, 0]).mean()


@register_loss("crd", "relations")
class CRD(nn.Module):
    """Contrastive representation distillation with a fixed-length negative queue.

    ``z_s = normalize(W_s s)``, ``z_t = normalize(W_t t)`` (trainable linear heads to
    ``feat_dim``); ``L = NCE(z_s; z_t, Q_t) + NCE(z_t; z_s, Q_s)`` with
    ``NCE(a; p, Q) = mean_b -log(exp(a.p/T) / (exp(a.p/T) + sum_{q in Q} exp(a.q/T)))``,
    ``T = nce_t``; ``Q_t`` / ``Q_s`` hold the last ``queue_size`` teacher / student embeddings
    (detached) from earlier batches: a MoCo-style queue replacing the paper's dataset-sized
    memory bank (memory does not grow with the dataset). Until the queues are full only their
    filled rows are negatives (with none, the loss is 0). The current batch is enqueued after
    the loss is computed, in training mode only. The queues are buffers and the write pointer
    and fill count host integers (extra state), all saved in ``state_dict``, so resume is exact. Under DDP each process keeps its own
    queue of its local batches (no all-gather) -- note DDP's default buffer broadcast then
    copies rank 0's queue to every rank before each forward.
    Tian, Krishnan, Isola, ICLR 2020, "Contrastive Representation Distillation".
    """

    def __init__(self, shapes: Shapes, feat_dim: int = 128, queue_size: int = 4096,
                 nce_t: float = 0.07) -> None:
        super().__init__()
        if queue_size < 1 or feat_dim < 1:
            raise ValueError("crd: feat_dim and queue_size must be >= 1")
        self.nce_t = nce_t
        self.embed_s = nn.Linear(shapes.s_embed, feat_dim)
        self.embed_t = nn.Linear(shapes.t_embed, feat_dim)
        self.register_buffer("queue_s", torch.zeros(queue_size, feat_dim))
        self.register_buffer("queue_t", torch.zeros(queue_size, feat_dim))
        # write pointer and fill count: host integers (no device read per step), in
        # state_dict through get_extra_state
        self.ptr, self.count = 0, 0

    def get_extra_state(self) -> dict:
        return {"ptr": self.ptr, "count": self.count}

    def set_extra_state(self, state: dict) -> None:
        self.ptr, self.count = int(state["ptr"]), int(state["count"])

    def negatives(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Filled rows of the (student, teacher) queues, as copies (safe against enqueue)."""
        return self.queue_s[:self.count].clone(), self.queue_t[:self.count].clone()

    @torch.no_grad()
    def enqueue(self, z_s: torch.Tensor, z_t: torch.Tensor) -> None:
        size = self.queue_s.shape[0]
        z_s, z_t = z_s[-size:], z_t[-size:]  # a batch larger than the queue: keep its tail
        idx = (self.ptr + torch.arange(z_s.shape[0], device=z_s.device)) % size
        self.queue_s[idx] = z_s.to(self.queue_s.dtype)
        self.queue_t[idx] = z_t.to(self.queue_t.dtype)
        self.ptr = (self.ptr + z_s.shape[0]) % size
        self.count = min(self.count + z_s.shape[0], size)

    def forward(self, inp: LossInputs) -> torch.Tensor:
        s, t = _embeds(inp)
        with float32(s.device):
            z_s = F.normalize(self.embed_s(s), dim=1)
            z_t = F.normalize(self.embed_t(t), dim=1)
            neg_s, neg_t = self.negatives()
            loss = (info_nce(z_s, z_t, neg_t, self.nce_t) + info_nce(z_t, z_s, neg_s, self.nce_t))
        if self.training:
            self.enqueue(z_s.detach(), z_t.detach())
        return loss
