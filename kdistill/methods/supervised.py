"""Plain supervised training: cross-entropy, optionally with R-Drop."""
from __future__ import annotations

import torch
from torch import nn

from ..data.transforms import Preprocess
from ..losses.logits import cross_entropy, symmetric_kl
from .base import Method, Trainable


class Supervised(Method):
    """CE on labels (hard, smoothed or mixup-soft).

    With ``rdrop > 0`` the batch goes through the network twice (two dropout masks, one
    forward of the doubled batch) and ``rdrop * symmetric_KL(p1, p2)`` is added
    (R-Drop, Liang et al. 2021); CE is averaged over both passes.
    """

    name = "supervised"

    def __init__(self, student: nn.Module, student_prep: Preprocess, label_smoothing: float = 0.0,
                 rdrop: float = 0.0) -> None:
        super().__init__(student, student_prep)
        self.label_smoothing = label_smoothing
        self.rdrop = rdrop

    def step(self, modules: Trainable, batch: dict) -> dict[str, torch.Tensor]:
        student = modules.student
        x = self.student_prep(batch["image"])
        y = batch["target"]
        if self.rdrop <= 0:
            logits = student(x)
            ce = cross_entropy(logits, y, self.label_smoothing)
            return {"loss": ce, "ce": ce, "logits": logits}
        a, b = student(torch.cat([x, x])).chunk(2)
        ce = 0.5 * (cross_entropy(a, y, self.label_smoothing) + cross_entropy(b, y, self.label_smoothing))
        rd = symmetric_kl(a, b)
        return {"loss": ce + self.rdrop * rd, "ce": ce, "rdrop": rd, "logits": a}
