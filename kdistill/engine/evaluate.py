"""Evaluation: top-1, top-5, mean per-class accuracy (MPA), confusion matrix, optional TTA.

Counts are accumulated in device tensors, summed across DDP ranks once per pass.
"""
from __future__ import annotations

import contextlib
import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dist
from ..console import log
from ..data.loader import dropped, skipped_in
from ..data.transforms import tta_views
from ..utils import write_json


@dataclass
class EvalResult:
    top1: float
    top5: float
    mpa: float
    n: int
    loss: float
    per_class: list[float]
    confusion: list[list[int]]
    extra: dict = field(default_factory=dict)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason), this rank's

    def summary(self) -> dict:
        return {"top1": self.top1, "top5": self.top5, "mpa": self.mpa, "n": self.n,
                "loss": self.loss, **self.extra}


def metrics_from_confusion(cm: torch.Tensor) -> tuple[float, float, list[float]]:
    """top-1, MPA and per-class accuracy from a (true x predicted) confusion matrix.

    MPA averages the per-class accuracies of the classes that occur, so every class counts
    the same however many images it has; classes without images get NaN per-class accuracy.
    """
    cm = cm.double()
    support = cm.sum(1)
    n = support.sum()
    top1 = float(cm.diagonal().sum() / n) if n > 0 else float("nan")
    per_class = torch.where(support > 0, cm.diagonal() / support.clamp_min(1), torch.nan)
    present = per_class[support > 0]
    mpa = float(present.mean()) if present.numel() else float("nan")
    return top1, mpa, [float(v) for v in per_class]


class Accumulator:
    """Confusion matrix + top-5 hits + summed loss over batches, in device tensors that each
    batch adds to without a host sync (no per-batch ``torch.tensor(...)``, argument check or
    bincount); summed over DDP ranks once, in :meth:`compute`."""

    def __init__(self, num_classes: int, device: torch.device) -> None:
        self.k = num_classes
        self.cm = torch.zeros(num_classes * num_classes, dtype=torch.long, device=device)
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # top-5 hits, nll, images

    def update(self, probs: torch.Tensor, target: torch.Tensor) -> None:
        target = target.long()
        self.cm.index_add_(0, target * self.k + probs.argmax(-1), torch.ones_like(target))
        top5 = (probs.topk(min(5, self.k), dim=-1).indices == target[:, None]).any(-1).sum()
        nll = F.nll_loss(probs.float().clamp_min(1e-12).log(), target, reduction="sum")
        self.sums[0] += top5
        self.sums[1] += nll
        self.sums[2] += len(target)  # a Python number: no host-to-device copy

    def compute(self) -> EvalResult:
        cm = dist.all_reduce_sum(self.cm).view(self.k, self.k).cpu()
        top5, nll, n = dist.all_reduce_sum(self.sums).tolist()
        top1, mpa, per_class = metrics_from_confusion(cm)
        n = int(n)
        return EvalResult(top1=top1, top5=top5 / n if n else float("nan"), mpa=mpa, n=n,
                          loss=nll / max(n, 1), per_class=per_class, confusion=cm.long().tolist())


def result_from_probs(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> EvalResult:
    """The :class:`EvalResult` of stored per-image probabilities: the same counts, hence the
    same numbers, as the evaluation pass that produced them (``kdistill report``'s cache)."""
    acc = Accumulator(num_classes, probs.device)
    if len(target):
        acc.update(probs, target)
    return acc.compute()


def kl_per_image(p_teacher: torch.Tensor, p_student: torch.Tensor) -> torch.Tensor:
    """``KL(p_teacher || p_student)`` per image (nats), probabilities floored at 1e-12."""
    p_t = p_teacher.float()
    return (p_t * (p_t.clamp_min(1e-12).log() - p_student.float().clamp_min(1e-12).log())).sum(-1)


class EvalHook(Protocol):
    """Extra statistics gathered during an evaluation pass (see :class:`Agreement`)."""

    def reset(self) -> None: ...

    def update(self, batch: dict, probs: torch.Tensor) -> None: ...

    def compute(self) -> dict: ...


class Agreement:
    """Student-teacher top-1 agreement and mean ``KL(p_teacher || p_student)`` (nats, T=1).

    The teacher's probabilities on the evaluation images are computed in the first pass and
    kept by image index (the images, and each rank's share of them, do not change between
    passes); later passes only read them. Sums stay on the device; DDP-reduced in
    :meth:`compute`.
    """

    def __init__(self, teacher: Callable[[torch.Tensor], torch.Tensor], n_images: int,
                 num_classes: int, device: torch.device) -> None:
        self.teacher, self.device = teacher, device
        self.cache = torch.zeros(n_images, num_classes, device=device)
        self.filled = False  # after one full pass, every image of this rank's share is cached
        self.sums = torch.zeros(3, dtype=torch.float64, device=device)  # agree, kl, images

    def reset(self) -> None:
        self.sums.zero_()

    @torch.no_grad()
    def update(self, batch: dict, probs: torch.Tensor) -> None:
        idx = batch["index"].to(self.device, non_blocking=True)
        if not self.filled:
            self.cache[idx] = self.teacher(batch["image"].to(self.device, non_blocking=True)).float().softmax(-1)
        p_t = self.cache[idx]
        self.sums[0] += (p_t.argmax(-1) == probs.argmax(-1)).sum()
        self.sums[1] += kl_per_image(p_t, probs).sum()
        self.sums[2] += len(probs)

    def compute(self) -> dict:
        self.filled = True
        agree, kl, n = dist.all_reduce_sum(self.sums).tolist()
        if n == 0:
            return {}
        return {"agreement": agree / n, "kl_to_teacher": kl / n}


@torch.no_grad()
def predict_probs(model: nn.Module, prep: nn.Module, x: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Class probabilities for a uint8/[0,1] batch; TTA averages probabilities over views."""
    views = tta_views(x) if tta else [x]
    probs = sum(model(prep(v)).float().softmax(-1) for v in views)
    return probs / len(views)


@torch.no_grad()
def evaluate(model: nn.Module, prep: nn.Module, loader: Iterable[dict], num_classes: int,
             device: torch.device, tta: bool = False,
             autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
             on_batch: Callable[[dict, torch.Tensor], None] | None = None) -> EvalResult:
    """Evaluate ``model`` (called on ``prep(images)``) over ``loader``.

    ``on_batch(batch, probs)`` lets callers add their own statistics (e.g. agreement).
    Unreadable images (met in ``loader`` on any rank, or dropped when decoding into RAM)
    are counted in ``extra["skipped"]`` and listed in ``result.skipped``.
    """
    was_training = model.training
    model.eval()
    acc = Accumulator(num_classes, device)
    met: dict[str, str] = {}
    for batch in loader:
        met.update(skipped_in(batch))
        if "image" not in batch:
            continue
        x = batch["image"].to(device, non_blocking=True)
        y = batch["target"].to(device, non_blocking=True)
        with autocast():
            probs = predict_probs(model, prep, x, tta)
        acc.update(probs, y)
        if on_batch is not None:
            on_batch(batch, probs)
    model.train(was_training)
    result = acc.compute()
    gone = dropped(loader)  # the same on every rank; each image is met on one rank only
    result.skipped = gone + list(met.items())
    n_met = int(dist.all_reduce_sum(torch.tensor(len(met), device=device))) if dist.is_distributed() else len(met)
    if gone or n_met:
        result.extra["skipped"] = len(gone) + n_met
    return result


def write_report(result: EvalResult, classes: list[str], out_dir: str | Path,
                 extra: dict | None = None) -> Path:
    """metrics.json, per_class.csv, confusion.csv and confusion.png in ``out_dir``.

    A class without images in the split has no accuracy: ``null`` in metrics.json (strict
    JSON, with a ``note`` naming those classes), an empty cell in per_class.csv, and a line."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    doc = {**result.summary(), **(extra or {}), "per_class": dict(zip(classes, result.per_class))}
    empty = [c for c, row in zip(classes, result.confusion) if sum(row) == 0]
    if empty:
        shown = ", ".join(empty[:10]) + (", ..." if len(empty) > 10 else "")
        doc["note"] = (f"{len(empty)} class(es) have no images in this split, so no accuracy (per_class "
                       f"null; mpa averages the other classes): {shown}")
        doc["classes_without_images"] = empty
        log(f"note: {doc['note']}")
    write_json(out / "metrics.json", doc)
    with open(out / "per_class.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["class", "accuracy", "images"])
        for c, acc, row in zip(classes, result.per_class, result.confusion):
            w.writerow([c, f"{acc:.6f}" if math.isfinite(acc) else "", sum(row)])
    with open(out / "confusion.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["true\\pred", *classes])
        for c, row in zip(classes, result.confusion):
            w.writerow([c, *row])
    plot_confusion(result.confusion, classes, out / "confusion.png",
                   f"top-1 {result.top1:.4f}  MPA {result.mpa:.4f}  n={result.n}")
    return out


def plot_confusion(cm: list[list[int]], classes: list[str], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = confusion_figure(cm, classes, title)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def confusion_figure(cm: list[list[int]], classes: list[str], title: str, max_size: float = 30,
                     per_class: float = 0.45, fontsize: float = 7):
    """A matplotlib figure of the row-normalised confusion matrix (counts written in the
    cells up to 20 classes, in ``fontsize`` points; class names up to 40). Its side is
    ``4 + per_class`` inches per class, at most ``max_size``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = len(classes)
    t = torch.tensor(cm, dtype=torch.float64)
    norm = t / t.sum(1, keepdim=True).clamp_min(1)
    size = min(4 + per_class * k, max_size)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(norm.numpy(), cmap="Blues", vmin=0, vmax=1)
    if k <= 40:
        ax.set_xticks(range(k), classes, rotation=90)
        ax.set_yticks(range(k), classes)
        if k <= 20:
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, int(t[i, j]), ha="center", va="center", fontsize=fontsize,
                            color="white" if norm[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.tight_layout()
    return fig
