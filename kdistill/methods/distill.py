"""Knowledge distillation as a method: frozen teacher(s) + weighted, named loss terms.

``forward(batch)`` runs the student (capturing features with hooks when a feature or
relation loss needs them), runs the teachers without gradients on the same crop, and
returns ``{"loss": sum_k w_k(epoch) * term_k, "<term>": term_k, "logits": ...}``. The loop
logs every term separately.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..data.transforms import Preprocess
from ..errors import UserError
from ..losses import LOSSES, LossInputs
from ..models.hooks import FeatureCapture
from .base import Method, Trainable
from .teachers import Teacher, TeacherSet


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
    """The loss modules (with their adapters). One forward computes every active term, each
    on its own inputs (``name@k``: term ``name`` for merged teacher ``k``). It is trained
    with the student: ``losses`` in the method's :class:`Trainable`, inside its DDP wrapper."""

    def __init__(self, losses: dict[str, nn.Module]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict(losses)

    def forward(self, inputs: dict[str, LossInputs]) -> dict[str, torch.Tensor]:
        return {key: self.losses[key.partition("@")[0]](inp) for key, inp in inputs.items()}


class Distill(Method):
    """Student trained on a weighted sum of distillation (and label) terms.

    Teachers are frozen (eval mode, no gradients, not in ``trainable()``) and never saved with
    the student; the loss bank's adapters are trainable and saved in the training state.
    With teachers merged by subset (different label sets, ``merge='subset'``) each logit term
    is the weighted mean over teachers of the term between the teacher's logits and the
    student's logits restricted to that teacher's classes (label-free); ``ce`` always uses the
    labels over all classes. Teachers merged by ``concat`` give one set of union logits.
    With ``self_start`` set, ``teachers`` holds one teacher built from a copy of the student
    (:func:`self_teacher`): at epoch ``self_start`` it becomes a snapshot of the student and
    then follows the student's weights as an EMA (``self_decay``), teaching the last epochs
    (self-distillation).
    """

    name = "distill"

    def __init__(self, student: nn.Module, student_prep: Preprocess, teachers: TeacherSet | None,
                 terms: list[TermSpec], bank: LossBank, s_capture: FeatureCapture | None = None,
                 t_capture: FeatureCapture | None = None, self_start: int | None = None,
                 self_decay: float = 0.999) -> None:
        super().__init__(student, student_prep, losses=bank)
        self.teachers = teachers
        self.terms = terms
        self.s_capture, self.t_capture = s_capture, t_capture
        self.specs = {t.name: LOSSES.get(t.name) for t in terms}
        self.weights = {t.name: t.weight for t in terms}
        self.self_start, self.self_decay = self_start, self_decay
        self.register_buffer("teacher_on", torch.tensor(self_start is None), persistent=False)

    # ------------------------------------------------------------------ plumbing

    @property
    def bank(self) -> LossBank:
        return self.trainable_module.losses

    def find_unused_parameters(self) -> bool:
        """A loss module with trainable parameters (adapters) gets no gradient in a step where
        its term is left out: weight 0, or a teacher term while no teacher is on (the EMA
        self-teacher before ``self_start``; no teacher and no cached teacher outputs). Only
        then must DDP search the graph for unused parameters on every forward."""
        def may_skip(t: TermSpec) -> bool:
            teacher_off = self.self_start is not None or self.teachers is None
            return t.weight == 0 or (self.specs[t.name].needs_teacher and teacher_off)

        return any(p.requires_grad for t in self.terms if may_skip(t)
                   for p in self.bank.losses[t.name].parameters())

    def train(self, mode: bool = True) -> "Distill":
        super().train(mode)
        if self.teachers is not None:
            self.teachers.eval()
        return self

    def describe(self) -> dict:
        d: dict = {"method": self.name, "losses": [str(t) for t in self.terms]}
        if self.self_start is not None:
            d["teachers"] = [{"teacher": "self-ema", "start_epoch": self.self_start,
                              "decay": self.self_decay}]
        elif self.teachers is not None:
            d["teachers"] = self.teachers.describe()
        return d

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.weights = {t.name: t.weight_at(epoch) for t in self.terms}
        if self.self_start is not None and epoch >= self.self_start and not bool(self.teacher_on):
            self._ema_model().load_state_dict(self.plain_student.state_dict())
            self.teacher_on.fill_(True)

    def after_step(self) -> None:
        """Self-distillation: move the EMA teacher towards the student."""
        if self.self_start is None or not bool(self.teacher_on):
            return
        with torch.no_grad():
            t_params = list(self._ema_model().state_dict().values())
            s_params = list(self.plain_student.state_dict().values())
            for t, s in zip(t_params, s_params):
                if t.is_floating_point():
                    t.lerp_(s.detach(), 1 - self.self_decay)
                else:
                    t.copy_(s)

    def _ema_model(self) -> nn.Module:
        return self.teachers.teachers[0].model

    def extra_state(self) -> dict:
        if self.self_start is None:
            return {}
        return {"teacher_on": bool(self.teacher_on), "ema": self._ema_model().state_dict()}

    def load_extra_state(self, state: dict) -> None:
        if self.self_start is not None and state:
            self._ema_model().load_state_dict(state["ema"])
            self.teacher_on.fill_(state["teacher_on"])

    # ------------------------------------------------------------------ forward

    def step(self, modules: Trainable, batch: dict) -> dict[str, torch.Tensor]:
        x, targets = batch["image"], batch.get("target")
        if self.s_capture:
            self.s_capture.clear()
        s_logits = modules.student(self.student_prep(x))
        inp = LossInputs(s_logits, targets=targets, index=batch.get("index"))
        if self.s_capture:
            inp.s_feats, inp.s_embed = self.s_capture.features(), self.s_capture.embed
        given = batch.get("t_logits")  # teacher outputs from a soft-label cache / fixed table
        use_teacher = given is not None or (self.teachers is not None and bool(self.teacher_on))
        # label terms always run (and are logged); teacher terms when a teacher is on and weighted
        active = [n for n, w in self.weights.items() if not self.specs[n].needs_teacher or (use_teacher and w > 0)]
        t_out = None
        if given is not None:
            t_out = given.float()
        elif any(self.specs[n].needs_teacher for n in active):
            if self.t_capture:
                self.t_capture.clear()
            with torch.no_grad():  # the teacher's own crop in 'independent' view mode
                t_out = self.teachers(batch.get("image_t", x))
            if self.t_capture:
                inp.t_feats = [f.detach() for f in self.t_capture.features()]
                inp.t_embed = None if self.t_capture.embed is None else self.t_capture.embed.detach()
        values = modules.losses(self._inputs(inp, t_out, active))
        values = self._reduce_merged(values)
        loss = sum(self.weights[n] * v for n, v in values.items() if self.weights[n] > 0)
        if not torch.is_tensor(loss):
            loss = s_logits.float().sum() * 0.0
        return {"loss": loss, **values, "logits": s_logits}

    def _inputs(self, inp: LossInputs, t_out, active: list[str]) -> dict[str, LossInputs]:
        """Each term's inputs. Terms that need labels see only the labeled images;
        label-free terms see all of them (without targets when some are unlabeled). Merged
        teachers give one input per (term, teacher): the student's logits over that
        teacher's classes against the teacher's, label-free."""
        labeled = None
        if inp.targets is not None and not inp.targets.is_floating_point():
            mask = inp.targets >= 0
            labeled = None if bool(mask.all()) else mask
        free = inp if labeled is None else dataclasses.replace(inp, targets=None)
        out = {}
        for name in active:
            spec = self.specs[name]
            if not spec.label_free:
                out[name] = inp if labeled is None else LossInputs(inp.s_logits[labeled], targets=inp.targets[labeled])
            elif isinstance(t_out, list):
                for k, (teacher, t) in enumerate(zip(self.teachers.teachers, t_out)):
                    idx = torch.as_tensor(teacher.class_index, device=inp.s_logits.device)
                    out[f"{name}@{k}"] = LossInputs(inp.s_logits.index_select(1, idx), t, index=inp.index)
            else:
                out[name] = dataclasses.replace(free, t_logits=t_out)
        return out

    def _reduce_merged(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Weighted mean over teachers of the per-teacher values of a merged term."""
        out: dict[str, torch.Tensor] = {}
        for key, v in values.items():
            name, _, k = key.partition("@")
            w = self.teachers.weights[int(k)] if k else 1.0
            out[name] = out[name] + w * v if name in out else w * v
        return out


def self_teacher(student: nn.Module, prep: Preprocess) -> TeacherSet:
    """A frozen copy of ``student`` for self-distillation (weights set by :class:`Distill`)."""
    from ..data.transforms import Preprocessing

    pp = Preprocessing(prep.size, prep.mean.flatten().tolist(), prep.std.flatten().tolist())
    return TeacherSet([Teacher(copy.deepcopy(student), pp, "self-ema", channels_last=prep.channels_last)])
