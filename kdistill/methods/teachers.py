"""Teachers: loading (run folder, checkpoint, or a timm / torchvision / Hugging Face name),
per-teacher preprocessing, and :class:`TeacherSource`, the one way every user of a teacher
(distill, cache, mine, eval's agreement, the fixed-view table) gets its outputs: a list of
:class:`TeacherView` per batch. Kinds: :class:`FrozenTeachers` (one model, an ensemble, or
teachers over different label sets), :class:`StoredOutputs` (soft-label cache, fixed
table), :class:`EmaTeacher` (self-distillation).

A teacher sees the same [0, 1] crop as the student and applies its own :class:`Preprocess`
(resolution and normalisation), so teachers trained at other resolutions or with ImageNet
statistics need nothing else.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import nn

from ..data.transforms import Preprocess, Preprocessing
from ..errors import UserError

if TYPE_CHECKING:
    from ..models.hooks import FeatureCapture


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
        self.dtype: torch.dtype | None = None  # None: as loaded, under the caller's autocast

    def train(self, mode: bool = True) -> "Teacher":  # always in eval mode (BN, dropout)
        return super().train(False)

    def run_in(self, dtype: torch.dtype) -> "Teacher":
        """Run from now on with weights in ``dtype`` (bf16 under a bf16 run: no per-call
        weight casts by autocast), channels_last for a convolutional model, in inference
        mode, whatever the caller's autocast state."""
        self.dtype = dtype
        self.model.to(dtype)
        if any(isinstance(m, nn.Conv2d) for m in self.model.modules()):
            self.model.to(memory_format=torch.channels_last)
            self.prep.channels_last = True
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dtype is None:
            return self.model(self.prep(x)).float()
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            out = self.model(self.prep(x).to(self.dtype))
        return out.float().clone()  # a normal tensor: losses may save it for backward

    def index_on(self, device: torch.device) -> torch.Tensor:
        """``class_index`` as a tensor on ``device``, made once (not a host-to-device copy per step)."""
        cached = self.__dict__.get("_index")
        if cached is None or cached.device != device:
            cached = self.__dict__["_index"] = torch.as_tensor(self.class_index, device=device)
        return cached


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
    from ..models import create_model, default_preprocessing, load_weights
    from ..models.checkpoint import load_model, meta_preprocessing

    if Path(spec).exists():
        model, meta = load_model(spec, device)
        pp, t_classes = meta_preprocessing(meta), list(meta["classes"])
        index = _map_classes(spec, t_classes, classes)
    elif "@" in spec:
        name, weights = spec.split("@", 1)
        model = load_weights(create_model(name, len(classes)), weights,
                             f"{name} weights with {len(classes)} classes")
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


@dataclass
class TeacherView:
    """What one teacher says about a batch, in the terms the loss functions use.

    ``class_index[j]`` is the student class of output ``j`` (None: the student's classes, in
    order); ``weight`` is the view's share of each teacher term (the weights of a batch's
    views sum to 1). ``features`` / ``embed`` are the captured feature maps and pooled
    embedding, when a feature or relation loss (or mining) asked for them.
    """

    logits: torch.Tensor
    class_index: torch.Tensor | None = None
    weight: float = 1.0
    features: list[torch.Tensor] = field(default_factory=list)
    embed: torch.Tensor | None = None


class TeacherSource(nn.Module):
    """Where the teacher outputs for a batch come from: frozen models, outputs stored with the
    batch (a soft-label cache, the fixed-view table), an EMA of the student.

    A kind implements :meth:`views`; :class:`~kdistill.methods.distill.Distill` combines its
    loss terms over the views it returns. The class attributes and the other methods have
    defaults that suit a source which teaches on every batch and keeps no state.
    """

    kind = "teacher"
    size: int | None = None  # the largest resolution it runs at (None: runs no model)
    preprocessing: Preprocessing | None = None  # the crop it wants for stored images (None: any)
    always = True  # teaches on every batch (else :meth:`active` can be False)
    capture: FeatureCapture | None = None  # hooks whose features / embedding go in its views
    per_teacher = False  # True when its views are per teacher, over class subsets

    def views(self, batch: dict) -> list[TeacherView]:
        """The teacher's views of ``batch`` (``batch["image"]``: uint8 or [0, 1] float on
        the device; ``image_t``: the teacher's own crop in view mode 'independent'; any
        stored outputs such as ``t_logits``). No gradients flow into them."""
        raise NotImplementedError

    def active(self, batch: dict) -> bool:
        """Whether it teaches on ``batch`` (checked before :meth:`views` is paid for)."""
        return True

    @torch.no_grad()
    def view_of(self, x: torch.Tensor) -> TeacherView:
        """The one view over all of the student's classes of images ``x`` (cache, mining,
        the fixed-view table, agreement)."""
        views = self.views({"image": x})
        if len(views) != 1 or views[0].class_index is not None:
            raise UserError(f"teacher '{self.kind}' gives per-teacher outputs over class subsets; "
                            "join them with -o distill.merge=concat")
        return views[0]

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C) logits of :meth:`view_of`."""
        return self.view_of(x).logits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`logits`: a source can be evaluated like a model."""
        return self.logits(x)

    def describe(self) -> list[dict]:
        return [{"teacher": self.kind}]

    # hooks for sources that change during training (the EMA self-teacher)
    def set_epoch(self, epoch: int, epochs: int, student: nn.Module) -> None:
        pass

    def after_step(self, student: nn.Module) -> None:
        pass

    def extra_state(self) -> dict:
        return {}

    def load_extra_state(self, state: dict) -> None:
        pass


class FrozenTeachers(TeacherSource):
    """One or several frozen teachers, run on the batch's crop.

    If every teacher predicts the student's classes, they form an **ensemble**: the weighted
    mean of their probabilities (``ensemble='prob'``; returned as log-probabilities, which are
    valid logits) or of their logits (``'logit'``). If some teacher covers only a subset of
    the classes, the teachers are **merged**, in one of two ways (``merge``):

    * ``'subset'``: one view per teacher, over its own classes: each teacher supervises the
      student's distribution restricted to its classes, as in Vongkulbhisal et al., CVPR
      2019, "Unifying Heterogeneous Classifiers with Distillation". With disjoint label sets
      this says nothing about which subset an image belongs to: add ``ce`` on labels.
    * ``'concat'``: the teachers' logits are placed side by side in one vector over the
      student's classes (the weighted mean where label sets overlap) and the student matches
      its softmax, as in Shen et al., AAAI 2019, "Amalgamating Knowledge towards
      Comprehensive Classification". Label-free, since a teacher's logits on images outside
      its classes are low; every student class must be covered by some teacher.

    ``capture`` (set by whoever needs them) records the single teacher's features and
    embedding, which then travel in its view.
    """

    kind = "frozen"

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
        self.size = max(t.prep.size for t in teachers)
        self.preprocessing = teachers[0].preprocessing

    @property
    def single(self) -> Teacher | None:
        return self.teachers[0] if len(self.teachers) == 1 and not self.merged else None

    @property
    def per_teacher(self) -> bool:
        """True when each teacher gives its own view (merge='subset')."""
        return self.merged and self.merge == "subset"

    def train(self, mode: bool = True) -> "FrozenTeachers":
        return super().train(False)

    @torch.no_grad()
    def views(self, batch: dict) -> list[TeacherView]:
        x = batch.get("image_t", batch["image"])  # the teacher's own crop in 'independent' mode
        if self.capture is not None:
            self.capture.clear()
        outs = [t(x) for t in self.teachers]
        if self.per_teacher:
            return [TeacherView(o, t.index_on(o.device), w)
                    for t, w, o in zip(self.teachers, self.weights, outs)]
        view = TeacherView(self._combine(outs))
        if self.capture is not None:
            # clones: a teacher in inference mode (run_in) captures inference tensors
            view.features = [f.detach().clone() for f in self.capture.features()]
            view.embed = None if self.capture.embed is None else self.capture.embed.detach().clone()
        return [view]

    def _combine(self, outs: list[torch.Tensor]) -> torch.Tensor:
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
            idx = t.index_on(o.device)
            total.index_add_(1, idx, w * o)
            norm.index_add_(0, idx, torch.full_like(idx, w, dtype=o.dtype))
        return total / norm

    def describe(self) -> list[dict]:
        return [{"teacher": t.name, "weight": w, **({"classes": t.classes} if t.class_index else {})}
                for t, w in zip(self.teachers, self.weights)]

    def coverage(self) -> tuple[str, list[int]]:
        """One line: how many of the student's classes each teacher covers and the rule that
        joins them; and the student classes (indices) that no teacher covers."""
        n = self.num_classes or 0
        covered: set[int] = set()
        parts = []
        for t in self.teachers:
            own = set(range(n)) if t.class_index is None else set(t.class_index)
            covered |= own
            parts.append(f"{t.name} covers {len(own)} of the student's {n} classes")
        rule = JOIN_RULES[f"merge={self.merge}" if self.merged else f"ensemble={self.ensemble}"]
        return f"teachers: {'; '.join(parts)}; {rule}", sorted(set(range(n)) - covered)


#: what :meth:`FrozenTeachers.coverage` says of each way teachers are joined
JOIN_RULES = {
    "merge=subset": "distill.merge=subset: each teacher teaches the student's distribution over its own classes",
    "merge=concat": "distill.merge=concat: the teachers' logits are joined into one distribution over the union",
    "ensemble=prob": "distill.ensemble=prob: the mean of their probabilities",
    "ensemble=logit": "distill.ensemble=logit: the mean of their logits",
}


class StoredOutputs(TeacherSource):
    """Teacher outputs that come with the batch (``batch["t_logits"]``): a soft-label cache
    replayed view by view, or the table of view mode 'fixed'. Runs no model."""

    kind = "stored"

    def __init__(self, origin: list[dict]) -> None:
        super().__init__()
        self.origin = origin  # what computed them, for describe()

    def views(self, batch: dict) -> list[TeacherView]:
        return [TeacherView(batch["t_logits"].float())]

    def active(self, batch: dict) -> bool:
        return "t_logits" in batch

    def describe(self) -> list[dict]:
        return self.origin


class EmaTeacher(FrozenTeachers):
    """Self-distillation: a frozen copy of the student that, at epoch ``start``, becomes a
    snapshot of the student and then follows its weights as an EMA (``decay`` per step),
    teaching the last epochs."""

    kind = "self-ema"
    always = False

    def __init__(self, student: nn.Module, prep: Preprocess, start: int, decay: float = 0.999) -> None:
        pp = Preprocessing(prep.size, prep.mean.flatten().tolist(), prep.std.flatten().tolist())
        super().__init__([Teacher(copy.deepcopy(student), pp, self.kind, channels_last=prep.channels_last)])
        self.start, self.decay = start, decay
        self.on = False  # a Python bool: checking it costs no device sync

    @property
    def model(self) -> nn.Module:
        return self.teachers[0].model

    def active(self, batch: dict) -> bool:
        return self.on

    def describe(self) -> list[dict]:
        return [{"teacher": self.kind, "start_epoch": self.start, "decay": self.decay}]

    def set_epoch(self, epoch: int, epochs: int, student: nn.Module) -> None:
        if epoch >= self.start and not self.on:
            self.model.load_state_dict(student.state_dict())
            self.on = True

    @torch.no_grad()
    def after_step(self, student: nn.Module) -> None:
        if not self.on:
            return
        pairs = list(zip(self.model.state_dict().values(), student.state_dict().values()))
        floats = [(t, s.detach()) for t, s in pairs if t.is_floating_point()]
        if floats:  # one multi-tensor kernel, not one lerp per tensor
            torch._foreach_lerp_([t for t, _ in floats], [s for _, s in floats], 1 - self.decay)
        for t, s in pairs:
            if not t.is_floating_point():
                t.copy_(s)

    def extra_state(self) -> dict:
        return {"teacher_on": self.on, "ema": self.model.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if state:
            self.model.load_state_dict(state["ema"])
            self.on = bool(state["teacher_on"])


def load_teachers(specs: list[str], classes: list[str], device: torch.device,
                  weights: list[float] | None = None, ensemble: Literal["prob", "logit"] = "prob",
                  merge: Literal["subset", "concat"] = "subset", channels_last: bool = False) -> FrozenTeachers:
    """:func:`load_teacher` for each spec, as one :class:`FrozenTeachers` over ``classes``."""
    return FrozenTeachers([load_teacher(s, classes, device, channels_last) for s in specs], weights,
                          ensemble, merge, len(classes))
