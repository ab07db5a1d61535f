"""Losses on intermediate feature maps (one or more student/teacher pairs).

``inp.s_feats[i]`` and ``inp.t_feats[i]`` are (B, C, H, W) maps of feature pair ``i``; the
two sides may differ in channels and in spatial size. Conventions shared by every loss here:

- computed in float32 with autocast off (inputs from a bf16/fp16 autocast region are cast
  with ``.float()``; adapters run in float32 too, so sums of squares cannot overflow);
- the teacher side is a constant (``.detach()``): no gradient ever reaches the teacher;
- spatial mismatch: the *student* side is resized to the teacher's (H, W) by
  :func:`resize_to` -- adaptive average pooling when it is at least as large in both
  dimensions (downsampling), bilinear interpolation (``align_corners=False``) otherwise;
- the loss is the plain mean over feature pairs of the per-pair loss.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from . import LossInputs, Shapes, register_loss


@contextlib.contextmanager
def float32(device: torch.device) -> Iterator[None]:
    """Autocast off, so that adapters and reductions run in float32."""
    with torch.autocast(device_type=device.type, enabled=False):
        yield


def resize_to(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Resize (B, C, H, W) ``x`` to ``hw``: adaptive average pooling to shrink, bilinear to grow."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    if x.shape[-2] >= hw[0] and x.shape[-1] >= hw[1]:
        return F.adaptive_avg_pool2d(x, hw)
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False)


def _check_pairs(inp: LossInputs) -> int:
    n = len(inp.s_feats)
    if n == 0 or n != len(inp.t_feats):
        raise ValueError(f"feature losses need matching non-empty feature lists, got "
                         f"{n} student and {len(inp.t_feats)} teacher maps")
    return n


def mean_over_pairs(inp: LossInputs, per_pair: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor]
                    ) -> torch.Tensor:
    """``mean_i per_pair(i, s_i, t_i)`` in float32, teacher detached."""
    n = _check_pairs(inp)
    with float32(inp.s_feats[0].device):
        total = sum(per_pair(i, s.float(), t.detach().float())
                    for i, (s, t) in enumerate(zip(inp.s_feats, inp.t_feats)))
    return total / n


def _hw(shape: tuple[int, ...]) -> tuple[int, int]:
    return int(shape[-2]), int(shape[-1])


@register_loss("fitnet", "features")
class FitNet(nn.Module):
    """FitNets hints: MSE between adapted student features and teacher features.

    ``L = mean_i mean((r_i(s_i) - t_i)^2)`` with ``r_i`` = 1x1 conv + BatchNorm (student
    channels -> teacher channels), trained with the student; the adapted map is resized to
    the teacher's size after ``r_i``. Reduction: mean over all B*C*H*W elements (as
    ``nn.MSELoss()``), then mean over pairs.
    Romero et al., ICLR 2015, "FitNets: Hints for Thin Deep Nets".
    """

    def __init__(self, shapes: Shapes) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s[0], t[0], kernel_size=1, bias=False), nn.BatchNorm2d(t[0]))
            for s, t in zip(shapes.s_feats, shapes.t_feats))

    def forward(self, inp: LossInputs) -> torch.Tensor:
        def pair(i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return F.mse_loss(resize_to(self.adapters[i](s), _hw(t.shape)), t)

        return mean_over_pairs(inp, pair)


def attention_map(f: torch.Tensor, p: float = 2.0) -> torch.Tensor:
    """Spatial attention ``mean_c |f|^p`` as a (B, 1, H, W) map (not normalised)."""
    return f.abs().pow(p).mean(1, keepdim=True)


@register_loss("at", "features")
class AT(nn.Module):
    """Attention transfer: match L2-normalised spatial attention maps of student and teacher.

    ``a(f) = normalize(vec(mean_c |f|^p))`` per sample; per pair
    ``beta/2 * mean_{b,j} (a_s[b,j] - a_t[b,j])^2`` (mean over batch and positions, the
    reference code's ``(a_s - a_t).pow(2).mean()``), then mean over pairs. A student map of a
    different size is resized (see module docs) as a 2D map before flattening/normalising.
    Zagoruyko & Komodakis, ICLR 2017, "Paying More Attention to Attention".
    """

    def __init__(self, shapes: Shapes, p: float = 2.0, beta: float = 1000.0) -> None:
        super().__init__()
        self.p, self.beta = p, beta

    def forward(self, inp: LossInputs) -> torch.Tensor:
        def pair(i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            a_s = resize_to(attention_map(s, self.p), _hw(t.shape)).flatten(1)
            a_t = attention_map(t, self.p).flatten(1)
            return (F.normalize(a_s, dim=1) - F.normalize(a_t, dim=1)).pow(2).mean()

        return self.beta / 2 * mean_over_pairs(inp, pair)


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """Row-L2-normalised batch Gram matrix ``normalize(F F^T)`` of (B, ...) features."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


@register_loss("sp", "features")
class SP(nn.Module):
    """Similarity-preserving KD: match the batch's pairwise-similarity matrices.

    ``G = normalize_rows(F F^T)`` with ``F`` the (B, C*H*W) flattened map; per pair
    ``||G_s - G_t||_F^2 / B^2``, then mean over pairs. Channel and spatial sizes never need to
    match (G is B x B). Tung & Mori, ICCV 2019, "Similarity-Preserving Knowledge Distillation".
    """

    def __init__(self, shapes: Shapes) -> None:
        super().__init__()

    def forward(self, inp: LossInputs) -> torch.Tensor:
        def pair(i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            b = s.shape[0]
            return (similarity_matrix(s) - similarity_matrix(t)).pow(2).sum() / (b * b)

        return mean_over_pairs(inp, pair)


MGD_MASKS = ("channel", "spatial")


@register_loss("mgd", "features")
class MGD(nn.Module):
    """Masked generative distillation: regenerate teacher features from masked student features.

    Per pair: ``s' = align(s)`` (1x1 conv to teacher channels, identity if equal), resized to
    the teacher's size; ``M`` a random 0/1 mask, 0 with probability ``lambda_mask``, drawn
    as ``torch.rand(shape) > 1 - lambda_mask`` -> 0, pair by pair, from torch's global RNG:

    - ``mask="channel"`` (default): shape (B, C, 1, 1), whole channels of ``s'`` dropped,
      a fresh draw per sample;
    - ``mask="spatial"``: shape (B, 1, H, W), whole positions dropped (shared over channels).

    ``G`` = conv3x3 -> ReLU -> conv3x3; loss ``alpha_mgd * sum((G(s' * M) - t)^2) / B`` (sum
    over C, H, W, mean over samples), then mean over pairs. The mask is drawn in eval mode
    too (the loss is the same function).
    Yang et al., ECCV 2022, "Masked Generative Distillation". The defaults are the authors'
    classification recipe (repo yzd-v/MGD, ``cls/``: channel mask, alpha 7e-5, ratio 0.15);
    their detection recipe is ``mask="spatial", alpha_mgd=2e-5, lambda_mask=0.65``.
    """

    def __init__(self, shapes: Shapes, alpha_mgd: float = 7e-5, lambda_mask: float = 0.15,
                 mask: str = "channel") -> None:
        super().__init__()
        try:  # YAML 1.1 reads `2e-5` (no dot) as a string
            alpha_mgd, lambda_mask = float(alpha_mgd), float(lambda_mask)
        except (TypeError, ValueError):
            raise UserError(f"mgd: alpha_mgd and lambda_mask must be numbers, got "
                            f"{alpha_mgd!r} and {lambda_mask!r}") from None
        if not 0.0 <= lambda_mask < 1.0:
            raise UserError(f"mgd: lambda_mask must be in [0, 1), got {lambda_mask}")
        if mask not in MGD_MASKS:
            raise UserError(f"mgd: mask must be one of {', '.join(MGD_MASKS)}, got {mask!r}")
        self.alpha_mgd, self.lambda_mask, self.mask_kind = alpha_mgd, lambda_mask, mask
        self.align = nn.ModuleList(
            nn.Identity() if s[0] == t[0] else nn.Conv2d(s[0], t[0], kernel_size=1)
            for s, t in zip(shapes.s_feats, shapes.t_feats))
        self.generation = nn.ModuleList(
            nn.Sequential(nn.Conv2d(t[0], t[0], kernel_size=3, padding=1), nn.ReLU(inplace=True),
                          nn.Conv2d(t[0], t[0], kernel_size=3, padding=1))
            for t in shapes.t_feats)

    def mask(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Float mask for an aligned (B, C, H, W) map: (B, C, 1, 1) for ``channel``, (B, 1, H, W)
        for ``spatial``; 0 where dropped (probability ``lambda_mask``), else 1."""
        b, c, h, w = shape
        size = (b, c, 1, 1) if self.mask_kind == "channel" else (b, 1, h, w)
        return (torch.rand(size, device=device) <= 1 - self.lambda_mask).float()

    def forward(self, inp: LossInputs) -> torch.Tensor:
        def pair(i: int, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            aligned = resize_to(self.align[i](s), _hw(t.shape))
            gen = self.generation[i](aligned * self.mask(tuple(aligned.shape), s.device))
            return (gen - t).pow(2).sum() / s.shape[0]

        return self.alpha_mgd * mean_over_pairs(inp, pair)
