"""Distillation losses: a registry of small modules on tensors.

Every loss is an ``nn.Module`` whose ``forward(inp: LossInputs) -> Tensor`` returns a scalar.
It is registered with a :class:`LossSpec` that says its family and what it needs, and built
by :func:`build_loss` from the shapes of a dry forward pass (so adapters are sized
automatically) plus keyword parameters from the config. Adding a loss = one class + one
``register_loss`` line; ``tests/test_losses.py`` is parametrised over the registry.

Conventions: "batchmean" reduction (sum over classes / dims, mean over samples);
temperature-scaled KL terms are multiplied by T^2 so their gradients keep their scale.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch
from torch import nn

from ..errors import UserError
from ..registry import Registry


@dataclass
class LossInputs:
    """What a distillation method hands every loss for one batch."""

    s_logits: torch.Tensor  # (B, C) student logits
    t_logits: torch.Tensor | None = None  # (B, C) teacher logits (None: no teacher)
    targets: torch.Tensor | None = None  # (B,) class indices, (B, C) soft labels, or None (label-free)
    s_feats: list[torch.Tensor] = field(default_factory=list)  # per feature pair, student side
    t_feats: list[torch.Tensor] = field(default_factory=list)  # per feature pair, teacher side
    s_embed: torch.Tensor | None = None  # (B, Ds) student's pooled penultimate features
    t_embed: torch.Tensor | None = None  # (B, Dt) teacher's
    index: torch.Tensor | None = None  # (B,) dataset indices of the images


@dataclass
class Shapes:
    """Shapes seen in a dry forward pass; losses size their adapters from these."""

    num_classes: int
    s_feats: list[tuple[int, ...]] = field(default_factory=list)  # (C, H, W) per pair
    t_feats: list[tuple[int, ...]] = field(default_factory=list)
    s_embed: int = 0
    t_embed: int = 0


Family = Literal["logits", "features", "relations"]


@dataclass(frozen=True)
class LossSpec:
    cls: type[nn.Module]  # constructed as cls(shapes, **params)
    family: Family
    label_free: bool  # works with targets=None
    needs_teacher: bool = True

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.cls) or ""
        return doc.splitlines()[0] if doc else ""

    def params(self) -> dict[str, object]:
        """Constructor keyword parameters and their defaults."""
        sig = inspect.signature(self.cls.__init__)
        return {n: p.default for n, p in sig.parameters.items()
                if n not in ("self", "shapes") and p.default is not inspect.Parameter.empty}


LOSSES: Registry[LossSpec] = Registry("loss", list_hint="kdistill list losses")


def register_loss(name: str, family: Family, label_free: bool = True,
                  needs_teacher: bool = True) -> Callable[[type], type]:
    def deco(cls: type) -> type:
        LOSSES.add(name, LossSpec(cls, family, label_free, needs_teacher))
        return cls

    return deco


def build_loss(name: str, shapes: Shapes, **params) -> nn.Module:
    """Instantiate loss ``name``; unknown parameters are errors that name them."""
    spec = LOSSES.get(name)
    known = spec.params()
    unknown = sorted(set(params) - set(known))
    if unknown:
        raise UserError(f"loss '{name}' has no parameter '{unknown[0]}' "
                        f"(it takes: {', '.join(known) or 'none'})")
    return spec.cls(shapes, **params)


# registration side effects: one module per family
from . import logits, features, relations  # noqa: E402,F401,I001
