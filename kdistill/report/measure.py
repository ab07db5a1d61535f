"""What a report measures for each run: per-image probabilities on the split (cached per
checkpoint), the eval metrics they give, calibration, agreement with the teacher, and cost
(parameters, FLOPs, latency as the model card measures it).

The metrics come from the same evaluation pass as ``kdistill eval`` (``evaluate_model``);
from the cache they are recomputed by the same counters, so the numbers are equal.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..data.shards import ShardSplit
from ..data.sources import Source
from ..deploy import DEFAULT_OPSET
from ..deploy.card import LATENCY_BATCHES, LATENCY_THREADS
from ..engine.evaluate import EvalResult, kl_per_image, result_from_probs
from ..engine.run import eval_dir, evaluate_model
from ..errors import KdistillError
from ..models.checkpoint import meta_preprocessing
from ..models.onnx import Normalized, onnx_bytes, onnxruntime_available, ort_session
from ..models.profile import count_flops, latency_table
from ..utils import atomic_write, count_params, ensure_writable_dir, first_line
from .gather import Export, Run

CACHE_FORMAT = 1
ECE_BINS = 15


@dataclass
class Scores:
    """A model's probabilities on every image of the split (rows of unreadable images are
    zero and not ``valid``) and the eval metrics they give."""

    probs: torch.Tensor  # (N, K) float32, CPU
    valid: torch.Tensor  # (N,) bool
    result: EvalResult
    cached: bool = False


def cache_file(run: Run, split: str, tta: bool, fingerprint: str) -> Path:
    """``<eval-<split>>/probs-<checkpoint sha256>-<data fingerprint>[-tta].pt``."""
    folder = eval_dir(run.spec, run.checkpoint, split)
    return folder / f"probs-{run.sha256[:16]}-{fingerprint[:12]}{'-tta' if tta else ''}.pt"


def _load_cache(path: Path, run: Run, fingerprint: str, tta: bool, shape: tuple[int, int]):
    if not path.is_file():
        return None
    try:
        d = torch.load(path, map_location="cpu", weights_only=True)
        ok = (d["format"] == CACHE_FORMAT and d["sha256"] == run.sha256 and d["fingerprint"] == fingerprint
              and d["tta"] == tta and tuple(d["probs"].shape) == shape)
    except Exception:  # noqa: BLE001 - a torn or foreign file is recomputed, not an error
        return None
    return (d["probs"].float(), d["valid"].bool()) if ok else None


def _save_cache(path: Path, run: Run, fingerprint: str, tta: bool, probs: torch.Tensor,
                valid: torch.Tensor) -> None:
    try:
        ensure_writable_dir(path.parent, "the cache folder")
        blob = {"format": CACHE_FORMAT, "sha256": run.sha256, "fingerprint": fingerprint, "tta": tta,
                "probs": probs, "valid": valid}
        atomic_write(path, lambda tmp: torch.save(blob, tmp))
    except (KdistillError, OSError) as err:
        run.notes.append(f"probabilities not cached ({first_line(err)})")


def score(run: Run, model: nn.Module, source: Source | ShardSplit, labels: torch.Tensor, fingerprint: str,
          device: torch.device, split: str, tta: bool, batch_size: int, workers: int) -> Scores:
    """``run``'s probabilities on ``source`` from its cache, else from ``kdistill eval``'s
    pass (then cached)."""
    n, k = len(source), run.meta["num_classes"]
    path = cache_file(run, split, tta, fingerprint)
    hit = _load_cache(path, run, fingerprint, tta, (n, k))
    if hit is not None:
        probs, valid = hit
        result = result_from_probs(probs[valid], labels[valid], k)
        if int((~valid).sum()):
            result.extra["skipped"] = int((~valid).sum())
        return Scores(probs, valid, result, cached=True)
    probs, valid = torch.zeros(n, k), torch.zeros(n, dtype=torch.bool)

    def collect(batch: dict, p: torch.Tensor) -> None:
        idx = batch["index"].cpu()
        probs[idx] = p.float().cpu()
        valid[idx] = True

    result = evaluate_model(model.to(device), run.meta, source, device, tta, batch_size, workers, collect,
                            f"the '{split}' split")
    _save_cache(path, run, fingerprint, tta, probs, valid)
    return Scores(probs, valid, result)


def calibration(s: Scores, labels: torch.Tensor, n_bins: int = ECE_BINS) -> dict:
    """Expected calibration error (torchmetrics, L1, ``n_bins`` equal-width confidence bins)
    and the bins of a reliability diagram: images, mean confidence and accuracy per bin."""
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs, target = s.probs[s.valid], labels[s.valid]
    ece = float(multiclass_calibration_error(probs, target, probs.shape[1], n_bins=n_bins, norm="l1"))
    conf, pred = probs.max(-1)
    edges = torch.linspace(0, 1, n_bins + 1)
    b = (torch.bucketize(conf, edges, right=True) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(b, minlength=n_bins)
    hits = torch.bincount(b, weights=(pred == target).double(), minlength=n_bins)
    mean_conf = torch.bincount(b, weights=conf.double(), minlength=n_bins)
    return {"ece": ece, "edges": edges.tolist(), "count": count.tolist(),
            "accuracy": (hits / count.clamp_min(1)).tolist(), "confidence": (mean_conf / count.clamp_min(1)).tolist()}


def compare(student: Scores, teacher: Scores) -> dict:
    """Top-1 agreement and mean ``KL(teacher || student)`` over images both could read
    (the statistics of ``kdistill eval --teacher``)."""
    both = student.valid & teacher.valid
    p_s, p_t = student.probs[both], teacher.probs[both]
    return {"agreement": float((p_s.argmax(-1) == p_t.argmax(-1)).double().mean()),
            "kl_to_teacher": float(kl_per_image(p_t, p_s).double().mean())}


def disagreements(student: Scores, teacher: Scores, k: int = 12) -> list[int]:
    """Up to ``k`` images on which student and teacher disagree most: different top-1,
    ranked by the total-variation distance of their probabilities."""
    both = student.valid & teacher.valid
    differ = both & (student.probs.argmax(-1) != teacher.probs.argmax(-1))
    tv = 0.5 * (student.probs - teacher.probs).abs().sum(-1)
    tv[~differ] = -1
    order = tv.argsort(descending=True)[:k]
    return [int(i) for i in order if tv[i] >= 0]


def onnxruntime_missing() -> str | None:
    """Why ONNX Runtime latency cannot be measured here, or None when it can."""
    if onnxruntime_available():
        return None
    return "onnxruntime is not installed (pip install onnxruntime), so there is no ONNX Runtime latency"


def onnx_forward(eager: nn.Module, image_size: int, arch: str) -> Callable[[np.ndarray], Any]:
    """``eager`` exported to ONNX in memory, as a one-thread ONNX Runtime forward."""
    session = ort_session(onnx_bytes(eager, image_size, DEFAULT_OPSET, arch), threads=LATENCY_THREADS)
    name = session.get_inputs()[0].name
    return lambda x: session.run(None, {name: x})[0]


def cost(run: Run, model: nn.Module, seconds: float, with_onnx: bool) -> dict:
    """Parameters, MFLOPs per image and ms per image at :data:`LATENCY_BATCHES` in torch
    eager (and ONNX Runtime when ``with_onnx``), one thread each: the model card's timing.
    Always measured fresh; ``model`` is moved to the CPU."""
    pp = meta_preprocessing(run.meta)
    model = model.cpu().float().eval()
    eager = Normalized(model, pp).eval()
    others = {}
    if with_onnx:
        try:
            others["onnxruntime"] = onnx_forward(eager, pp.image_size, run.meta["arch"])
        except KdistillError as err:
            run.notes.append(f"no ONNX Runtime latency: {first_line(err)}")
    latency = latency_table(eager, pp.image_size, others, LATENCY_BATCHES, seconds, LATENCY_THREADS)
    return {"params": count_params(model), "mflops": count_flops(model, pp.image_size) / 1e6,
            "latency": latency, "threads": LATENCY_THREADS}


class OnnxClassifier(nn.Module):
    """An exported ONNX file as a module for ``evaluate_model``: it takes [0, 1] images (the
    file normalises inside) and returns its logits, computed by ONNX Runtime on the CPU."""

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        super().__init__()
        from ..deploy.runtime import OnnxPredictor

        self.predictor = OnnxPredictor(str(path), threads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.predictor.logits(x.detach().cpu().float().numpy()))


def unit_meta(meta: dict) -> dict:
    """``meta`` with mean 0 / std 1: evaluation then feeds the [0, 1] images an export takes
    (its own mean/std are inside the graph); resize and crop stay the file's."""
    return {**meta, "preprocessing": {**meta["preprocessing"], "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}}


def score_export(export: Export, source: Source | ShardSplit, split: str, tta: bool, batch_size: int,
                 workers: int) -> Scores:
    """An exported file's probabilities on ``source``, from ``kdistill eval``'s pass
    (:func:`evaluate_model`, on the CPU, ONNX Runtime as the model); not cached."""
    n, k = len(source), export.meta["num_classes"]
    probs, valid = torch.zeros(n, k), torch.zeros(n, dtype=torch.bool)

    def collect(batch: dict, p: torch.Tensor) -> None:
        idx = batch["index"].cpu()
        probs[idx] = p.float().cpu()
        valid[idx] = True

    result = evaluate_model(OnnxClassifier(export.path), unit_meta(export.meta), source, torch.device("cpu"),
                            tta, batch_size, workers, collect, f"the '{split}' split")
    return Scores(probs, valid, result)


def export_latency(export: Export, seconds: float) -> dict[str, float]:
    """ms per image of the file in ONNX Runtime at each of :data:`LATENCY_BATCHES`, on
    :data:`LATENCY_THREADS` thread (the model card's timing)."""
    from ..deploy.runtime import OnnxPredictor
    from ..models.profile import callable_latency_ms

    size = int(export.meta["preprocessing"]["image_size"])
    forward = OnnxPredictor(str(export.path), threads=LATENCY_THREADS).logits

    def make(batch: int) -> np.ndarray:
        return np.random.default_rng(0).random((batch, 3, size, size), dtype=np.float32)

    return {str(b): round(callable_latency_ms(forward, make, b, min_seconds=seconds), 4) for b in LATENCY_BATCHES}
