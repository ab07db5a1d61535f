"""The contract between a training method and the (method-agnostic) loop."""
from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..data.transforms import Preprocess


class Trainable(nn.Module):
    """What the optimizer updates and ``last.pt`` stores: the student (``student.*``) plus
    any extra trainable modules (e.g. the loss bank with its adapters, ``losses.*``).

    Like the trainable modules of timm's distillation tasks, it forwards the student's
    ``no_weight_decay()`` and ``group_matcher()`` with the ``student.`` prefix, so timm's
    param-group builder keeps e.g. a ViT's ``pos_embed`` and ``cls_token`` out of weight
    decay (and layer-wise lr decay sees the student's layers; extra modules go with its
    head). State-dict keys are those of the former ``ModuleDict``: old checkpoints load.
    """

    def __init__(self, student: nn.Module, **extra: nn.Module) -> None:
        super().__init__()
        self.student = student
        for name, module in extra.items():
            self.add_module(name, module)

    def no_weight_decay(self) -> set[str]:
        names = getattr(self.student, "no_weight_decay", None)
        return {f"student.{n}" for n in names()} if names else set()

    def group_matcher(self, coarse: bool = False):
        from timm.models import group_parameters

        matcher = getattr(self.student, "group_matcher", None)
        if matcher is None:
            return {}
        layers = group_parameters(self.student, matcher(coarse=coarse), reverse=True)
        last = max(layers.values(), default=0)

        def layer_of(name: str) -> int:
            return layers.get(name[len("student."):], last) if name.startswith("student.") else last

        return layer_of


class Method(nn.Module):
    """A way of training ``student``.

    ``forward(batch)`` gets ``batch["image"]`` as a float [0, 1] tensor on the device (after
    mixup, if any) and ``batch["target"]`` (class indices or soft targets), and returns a
    dict with the scalar ``"loss"`` to backpropagate plus any named terms to log (scalars)
    and, optionally, the student's ``"logits"``.
    """

    name = "method"

    def __init__(self, student: nn.Module, student_prep: Preprocess) -> None:
        super().__init__()
        self.student = student
        self.student_prep = student_prep

    @property
    def plain_student(self) -> nn.Module:
        """The student without its DDP wrapper (what gets saved and evaluated)."""
        s = self.student
        return s.module if isinstance(s, DistributedDataParallel) else s

    def trainable(self) -> nn.Module:
        """Modules whose parameters the optimizer updates (the student, plus any adapters)."""
        return Trainable(self.plain_student)

    def wrap_distributed(self, device_ids: list[int] | None) -> None:
        """Wrap only trainable parts in DDP (frozen teachers stay plain)."""
        self.student = DistributedDataParallel(self.student, device_ids=device_ids)

    def ddp_modules(self) -> list[DistributedDataParallel]:
        return [m for m in self.modules() if isinstance(m, DistributedDataParallel)]

    def describe(self) -> dict:
        """What the method was (recorded in checkpoints and model cards)."""
        return {"method": self.name}

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Hook for schedules that depend on training progress (e.g. loss-weight warm-up)."""

    def after_step(self) -> None:
        """Hook called after every optimizer step (e.g. to update an EMA teacher)."""

    def extra_state(self) -> dict:
        """Non-trainable state to keep in ``last.pt`` for resume (e.g. an EMA teacher)."""
        return {}

    def load_extra_state(self, state: dict) -> None:
        """Restore what :meth:`extra_state` returned."""

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError
