"""Knowledge distillation as a method: frozen teacher(s) + weighted, named loss terms.

``forward(batch)`` runs the student (capturing features with hooks when a feature or
relation loss needs them), asks its :class:`TeacherSource` for the teacher's views of the
same batch, and returns ``{"loss": sum_k w_k(epoch) * term_k, "<term>": term_k, "logits": ...}``. The loop
logs every term separately.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..data.transforms import Preprocess
from ..errors import UserError
from ..losses import LOSSES, LossInputs
from ..models.hooks import FeatureCapture
from .base import Method, Trainable
from .teachers import TeacherSource, TeacherView


@dataclass
class TermSpec:
    """``name[:weight]`` with an optional linear warm-up of the weight over ``warmup`` epochs."""

    name: str
    weight: float = 1.0
    warmup: int = 0

    @classmethod
    def parse(cls, text: str, warmups: dict[str, int] | None = None) -> "TermSpec":
        name, _, w = text.partition(":")
        name = name.strip()
        LOSSES.get(name)  # unknown names fail here, with suggestions
        try:
            weight = float(w) if w else 1.0
        except ValueError:
            raise UserError(f"loss '{text}': the weight after ':' must be a number") from None
        if weight < 0:
            raise UserError(f"loss '{text}': the weight must be >= 0")
        return cls(name, weight, (warmups or {}).get(name, 0))

    def weight_at(self, epoch: int) -> float:
        if self.warmup <= 0:
            return self.weight
        return self.weight * min(1.0, (epoch + 1) / self.warmup)

    def __str__(self) -> str:
        return f"{self.name}:{self.weight:g}"


class LossBank(nn.Module):
    """The loss modules (with their adapters). One forward computes every active term as the
    weighted sum of the term over its inputs (one per teacher view; label terms have one).
    It is trained with the student: ``losses`` in the method's :class:`Trainable`, inside its
    DDP wrapper."""

    def __init__(self, losses: dict[str, nn.Module]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)

    def forward(self, inputs: dict[str, list[tuple[float, LossInputs]]]) -> dict[str, torch.Tensor]:
        return {name: sum(w * self.losses[name](inp) for w, inp in parts) for name, parts in inputs.items()}


class Distill(Method):
    """Student trained on a weighted sum of distillation (and label) terms.

    The teacher is a :class:`TeacherSource`: frozen models, stored outputs or an EMA of the
    student. It is never trained nor saved with the student; the loss bank's adapters are
    trainable and saved in the training state. Each teacher term is the weighted sum, over
    the source's views of the batch, of the term between the view's logits (and features)
    and the student's logits restricted to the view's classes (label-free when restricted);
    ``ce`` always uses the labels over all classes.
    """

    name = "distill"

    def __init__(self, student: nn.Module, student_prep: Preprocess, teacher: TeacherSource | None,
                 terms: list[TermSpec], bank: LossBank, s_capture: FeatureCapture | None = None) -> None:
        super().__init__(student, student_prep, losses=bank)
        self.teacher = teacher
        self.terms = terms
        self.s_capture = s_capture
        self.specs = {t.name: LOSSES.get(t.name) for t in terms}
        self.weights = {t.name: t.weight for t in terms}

    # ------------------------------------------------------------------ plumbing

    @property
    def bank(self) -> LossBank:
        return self.trainable_module.losses

    def find_unused_parameters(self) -> bool:
        """A loss module with trainable parameters (adapters) gets no gradient in a step where
        its term is left out: weight 0, or a teacher term while no teacher teaches (the EMA
        self-teacher before it starts; no teacher at all). Only then must DDP search the
        graph for unused parameters on every forward."""
        def may_skip(t: TermSpec) -> bool:
            teacher_off = self.teacher is None or not self.teacher.always
            return t.weight == 0 or (self.specs[t.name].needs_teacher and teacher_off)

        return any(p.requires_grad for t in self.terms if may_skip(t)
                   for p in self.bank.losses[t.name].parameters())

    def describe(self) -> dict:
        d: dict = {"method": self.name, "losses": [str(t) for t in self.terms]}
        if self.teacher is not None:
            d["teachers"] = self.teacher.describe()
        return d

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.weights = {t.name: t.weight_at(epoch) for t in self.terms}
        if self.teacher is not None:
            self.teacher.set_epoch(epoch, epochs, self.plain_student)

    def after_step(self) -> None:
        if self.teacher is not None:
            self.teacher.after_step(self.plain_student)

    def extra_state(self) -> dict:
        return {} if self.teacher is None else self.teacher.extra_state()

    def load_extra_state(self, state: dict) -> None:
        if self.teacher is not None:
            self.teacher.load_extra_state(state)

    # ------------------------------------------------------------------ forward

    def step(self, modules: Trainable, batch: dict) -> dict[str, torch.Tensor]:
        targets = batch.get("target")
        if self.s_capture:
            self.s_capture.clear()
        s_logits = modules.student(self.student_prep(batch["image"]))
        inp = LossInputs(s_logits, targets=targets, index=batch.get("index"))
        if self.s_capture:
            inp.s_feats, inp.s_embed = self.s_capture.features(), self.s_capture.embed
        teaching = self.teacher is not None and self.teacher.active(batch)
        # label terms always run (and are logged); teacher terms when a teacher teaches and is weighted
        active = [n for n, w in self.weights.items() if not self.specs[n].needs_teacher or (teaching and w > 0)]
        views = self.teacher.views(batch) if any(self.specs[n].needs_teacher for n in active) else []
        # the loader counts the labeled images (first in the batch); else ask the device
        n_labeled = batch["n_labeled"] if "n_labeled" in batch else None
        values = modules.losses(self._inputs(inp, views, active, n_labeled))
        loss = sum(self.weights[n] * v for n, v in values.items() if self.weights[n] > 0)
        if not torch.is_tensor(loss):
            loss = s_logits.float().sum() * 0.0
        return {"loss": loss, **values, "logits": s_logits}

    def _inputs(self, inp: LossInputs, views: list[TeacherView], active: list[str],
                n_labeled: int | None = None) -> dict[str, list[tuple[float, LossInputs]]]:
        """Each term's weighted inputs. Terms that need labels see only the labeled images
        (the first ``n_labeled``, as the loader orders them; None: found on the device);
        label-free terms see all of them (without targets when some are unlabeled), once per
        teacher view; a view over a subset of the classes meets the student's logits over
        those classes, label-free."""
        labeled = None  # None: every image has a label; else a slice or mask picking those that do
        if inp.targets is not None and not inp.targets.is_floating_point():
            if n_labeled is None:
                mask = inp.targets >= 0
                labeled = None if bool(mask.all()) else mask
            elif n_labeled < len(inp.targets):
                labeled = slice(0, n_labeled)
        free = inp if labeled is None else dataclasses.replace(inp, targets=None)
        out = {}
        for name in active:
            spec = self.specs[name]
            if not spec.label_free:
                out[name] = [(1.0, inp if labeled is None else
                              LossInputs(inp.s_logits[labeled], targets=inp.targets[labeled]))]
                continue
            if not spec.needs_teacher:
                out[name] = [(1.0, free)]
                continue
            out[name] = []
            for v in views:
                base = free if v.class_index is None else LossInputs(
                    inp.s_logits.index_select(1, v.class_index), index=inp.index)
                out[name].append((v.weight, dataclasses.replace(
                    base, t_logits=v.logits, t_feats=v.features, t_embed=v.embed)))
        return out
