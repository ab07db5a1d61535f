"""The contract between a training method and the (method-agnostic) loop."""
from __future__ import annotations

from typing import Any, Callable

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

    It is also the one module DDP wraps: ``forward(step, *args)`` runs a method's training
    step, ``step(self, *args)``, so every trainable forward (the student and the loss bank
    with its adapters) happens inside this module's forward and one DDP wrapper sees the
    whole graph and averages all of its gradients in one backward.
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

    def forward(self, step: Callable[..., Any], *args: Any) -> Any:
        return step(self, *args)


class Method(nn.Module):
    """A way of training ``student``.

    ``forward(batch)`` gets ``batch["image"]`` as a float [0, 1] tensor on the device (after
    mixup, if any) and ``batch["target"]`` (class indices or soft targets), and returns a
    dict with the scalar ``"loss"`` to backpropagate plus any named terms to log (scalars)
    and, optionally, the student's ``"logits"``. A method implements :meth:`step`, which
    reaches the student and any extra trainable modules through the :class:`Trainable` it
    is given; ``forward`` runs it through that module (DDP-wrapped under torchrun).
    """

    name = "method"

    def __init__(self, student: nn.Module, student_prep: Preprocess, **extra: nn.Module) -> None:
        super().__init__()
        self.trainable_module = Trainable(student, **extra)
        self.ddp: DistributedDataParallel | None = None
        self.student_prep = student_prep

    @property
    def student(self) -> nn.Module:
        return self.trainable_module.student

    @property
    def plain_student(self) -> nn.Module:
        """The student without any DDP wrapper (what gets saved and evaluated)."""
        return self.trainable_module.student

    def trainable(self) -> Trainable:
        """Modules whose parameters the optimizer updates (the student, plus any adapters),
        unwrapped: its ``state_dict`` is the training state in ``last.pt``."""
        return self.trainable_module

    def find_unused_parameters(self) -> bool:
        """Whether some trainable parameter may get no gradient in a step (DDP must then
        search the graph for them on every forward). The student uses all of its own."""
        return False

    def wrap_distributed(self, device_ids: list[int] | None) -> None:
        """Wrap the one trainable module in DDP, once (frozen teachers stay plain)."""
        if self.ddp is None:
            self.ddp = DistributedDataParallel(self.trainable_module, device_ids=device_ids,
                                               find_unused_parameters=self.find_unused_parameters())

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

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        module = self.trainable_module if self.ddp is None else self.ddp
        return module(self.step, batch)

    def step(self, modules: Trainable, batch: dict) -> dict[str, torch.Tensor]:  # pragma: no cover
        """The training step on ``batch``, with the student as ``modules.student``."""
        raise NotImplementedError
