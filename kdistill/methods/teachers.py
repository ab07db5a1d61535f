"""Frozen teachers: loading (run folder, checkpoint, or a timm / torchvision / Hugging Face
name), per-teacher preprocessing, ensembles, and teachers over different label sets.

A teacher sees the same [0, 1] crop as the student and applies its own :class:`Preprocess`
(resolution and normalisation), so teachers trained at other resolutions or with ImageNet
statistics need nothing else.
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Preprocess, Preprocessing
from ..errors import UserError


class Teacher(nn.Module):
    """A frozen model with its own preprocessing.

    ``class_index[j]`` is the student class of the teacher's output ``j``; None means the
    teacher predicts exactly the student's classes, in the same order.
    """

    def __init__(self, model: nn.Module, pp: Preprocessing, name: str, classes: list[str] | None = None,
                 class_index: list[int] | None = None, channels_last: bool = False) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.prep = Preprocess(pp, channels_last)
        self.preprocessing = pp
        self.name = name
        self.classes = classes
        self.class_index = class_index

    def train(self, mode: bool = True) -> "Teacher":  # always in eval mode (BN, dropout)
        return super().train(False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(self.prep(x)).float()


def _map_classes(spec: str, t_classes: list[str], classes: list[str]) -> list[int] | None:
    if t_classes == classes:
        return None
    missing = [c for c in t_classes if c not in classes]
    if missing:
        raise UserError(f"teacher '{spec}' predicts class '{missing[0]}', which the training data "
                        f"does not have ({len(classes)} classes: {', '.join(classes[:5])}...)")
    return [classes.index(c) for c in t_classes]


def load_teacher(spec: str, classes: list[str], device: torch.device,
                 channels_last: bool = False) -> Teacher:
    """``spec``: a run folder or kdistill checkpoint; ``NAME@WEIGHTS`` (a model name and a
    local weights file); or a model name with published weights (downloaded by timm /
    torchvision / the Hugging Face Hub; its outputs must be the data's classes, in order)."""
    from ..models import create_model, default_preprocessing, read_state_dict
    from ..models.checkpoint import load_model, meta_preprocessing

    if Path(spec).exists():
        model, meta = load_model(spec, device)
        pp, t_classes = meta_preprocessing(meta), list(meta["classes"])
        index = _map_classes(spec, t_classes, classes)
    elif "@" in spec:
        name, weights = spec.split("@", 1)
        model = create_model(name, len(classes))
        state = read_state_dict(weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as err:
            raise UserError(f"'{weights}' does not hold {name} weights with {len(classes)} classes: "
                            f"{str(err).splitlines()[0][:160]}") from None
        pp, t_classes, index = default_preprocessing(model, True), None, None
    else:
        if not _looks_like_name(spec):
            raise UserError(f"teacher '{spec}' does not exist (expected a run folder, a "
                            "checkpoint, NAME@WEIGHTS_FILE or a model name)")
        model = create_model(spec, len(classes), pretrained=True)
        head = (getattr(model, "pretrained_cfg", None) or {}).get("num_classes")
        if head is not None and head != len(classes):
            raise UserError(f"teacher '{spec}' was pretrained on {head} classes, the data has "
                            f"{len(classes)}; fine-tune it first (kdistill train --model {spec} "
                            "--pretrained) and pass that run as --teacher")
        pp, t_classes, index = default_preprocessing(model, True), None, None
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return Teacher(model, pp, spec, t_classes, index, channels_last).to(device)


def _looks_like_name(spec: str) -> bool:
    """A model name, not a path that does not exist (hf-hub names contain one '/')."""
    if spec.startswith("hf-hub:"):
        return True
    return "/" not in spec and not spec.endswith((".safetensors", ".pt", ".pth", ".bin"))


class TeacherSet(nn.Module):
    """One or several teachers.

    If every teacher predicts the student's classes, they form an **ensemble**: the weighted
    mean of their probabilities (``ensemble='prob'``; returned as log-probabilities, which are
    valid logits) or of their logits (``'logit'``). If some teacher covers only a subset of
    the classes, the teachers are **merged**, in one of two ways (``merge``):

    * ``'subset'``: each teacher supervises the student's distribution restricted to its own
      classes (see ``Distill``), as in Vongkulbhisal et al., CVPR 2019, "Unifying
      Heterogeneous Classifiers with Distillation". With disjoint label sets this says
      nothing about which subset an image belongs to: add ``ce`` on labels.
    * ``'concat'``: the teachers' logits are placed side by side in one vector over the
      student's classes (the weighted mean where label sets overlap) and the student matches
      its softmax, as in Shen et al., AAAI 2019, "Amalgamating Knowledge towards
      Comprehensive Classification". Label-free, since a teacher's logits on images outside
      its classes are low; every student class must be covered by some teacher.
    """

    def __init__(self, teachers: list[Teacher], weights: list[float] | None = None,
                 ensemble: Literal["prob", "logit"] = "prob", merge: Literal["subset", "concat"] = "subset",
                 num_classes: int | None = None) -> None:
        super().__init__()
        if not teachers:
            raise UserError("no teacher given")
        weights = list(weights) if weights else [1.0] * len(teachers)
        if len(weights) != len(teachers) or min(weights) < 0 or sum(weights) <= 0:
            raise UserError(f"distill.teacher_weights needs {len(teachers)} non-negative weight(s) "
                            f"with a positive sum, got {weights}")
        self.teachers = nn.ModuleList(teachers)
        self.weights = [w / sum(weights) for w in weights]
        self.ensemble = ensemble
        self.merged = any(t.class_index is not None for t in teachers)
        if self.merged:
            for t in teachers:
                if t.class_index is None:
                    t.class_index = list(range(len(t.classes or []))) or None
            if any(t.class_index is None for t in teachers):
                raise UserError("teachers over different label sets must all be kdistill runs "
                                "(their checkpoints name their classes)")
        self.merge = merge
        self.num_classes = num_classes
        if self.merged and merge == "concat":
            covered = {c for t in teachers for c in t.class_index}
            if num_classes is None or len(covered) < num_classes:
                raise UserError(f"distill.merge=concat needs every class covered by some teacher; "
                                f"{(num_classes or 0) - len(covered)} class(es) are not: use merge=subset "
                                "with ce on labels")

    @property
    def single(self) -> Teacher | None:
        return self.teachers[0] if len(self.teachers) == 1 and not self.merged else None

    @property
    def per_teacher(self) -> bool:
        """True when ``forward`` returns each teacher's own logits (merge='subset')."""
        return self.merged and self.merge == "subset"

    def forward(self, x: torch.Tensor) -> torch.Tensor | list[torch.Tensor]:
        """Logits (B, C) over the student's classes, or, for teachers merged by subset, a
        list of each teacher's own logits."""
        outs = [t(x) for t in self.teachers]
        if self.per_teacher:
            return outs
        if self.merged:
            return self._concat(outs)
        if len(outs) == 1:
            return outs[0]
        if self.ensemble == "logit":
            return sum(w * o for w, o in zip(self.weights, outs))
        probs = sum(w * F.softmax(o, dim=-1) for w, o in zip(self.weights, outs))
        return probs.clamp_min(1e-12).log()

    def _concat(self, outs: list[torch.Tensor]) -> torch.Tensor:
        """Union logits: each class gets the weighted mean of the logits of its teachers."""
        b = outs[0].shape[0]
        total = outs[0].new_zeros(b, self.num_classes)
        norm = outs[0].new_zeros(self.num_classes)
        for t, w, o in zip(self.teachers, self.weights, outs):
            idx = torch.as_tensor(t.class_index, device=o.device)
            total.index_add_(1, idx, w * o)
            norm.index_add_(0, idx, torch.full_like(idx, w, dtype=o.dtype))
        return total / norm

    def describe(self) -> list[dict]:
        return [{"teacher": t.name, "weight": w, **({"classes": t.classes} if t.class_index else {})}
                for t, w in zip(self.teachers, self.weights)]
