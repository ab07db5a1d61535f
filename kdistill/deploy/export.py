"""``kdistill export``: the student of a run as ONNX or TorchScript, checked for parity.

The exported graph takes float32 NCHW RGB images in [0, 1] at ``image_size`` x ``image_size``
(resized and centre-cropped as in evaluation, *not* normalised: mean/std are inside the
graph), with a dynamic batch dimension, and returns logits. Everything needed to use it is
embedded as JSON under the key ``kdistill``: ONNX ``metadata_props``, TorchScript
``_extra_files["kdistill.json"]`` (class names, mean/std, input size, crop_pct, arch, run,
checkpoint, training method/teachers, kdistill version, input/output convention).

Parity: up to ``n_images`` real images of the run's val split (``data.root`` of the run's
``config.yaml``, or ``--data``; random inputs with a printed note when there are none) go
through torch eager and the exported runtime, the first image alone and the rest in
batches of 32 (so the dynamic batch is exercised). The check fails when the largest
absolute difference of any softmax probability exceeds ``tolerance`` (default 1e-4); top-1
agreement is reported but not gated (near-ties may legitimately flip). A file that fails
is not written (the previous file at that path, if any, is kept).
"""
from __future__ import annotations

import datetime as _dt
import functools
import json
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .. import __version__
from ..data.transforms import Preprocessing
from ..errors import KdistillError, UserError
from ..utils import atomic_path
from . import DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS
from ..models.onnx import INPUT_NAME, OUTPUT_NAME, Normalized, onnx_bytes
from .runtime import (META_KEY, TS_EXTRA, ImageError, OnnxPredictor,
                      Predictor, Preparer, load_torchscript, read_rgb, softmax, torch_logits)

MIN_OPSET, MAX_OPSET = 9, 20  # the TorchScript-based ONNX exporter's range (needs no onnxscript)
PARITY_BATCH = 32


class ParityError(KdistillError):
    """The exported model does not reproduce the eager model: exit status 1."""

    exit_code = 1


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    n: int
    source: str  # "val images of ROOT" or "random inputs"
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def line(self, runtime: str) -> str:
        return (f"parity torch eager vs {runtime} on {self.n} {self.source}: max |dprob| "
                f"{self.max_abs_diff:.2e} (tolerance {self.tolerance:.0e}), top-1 agreement "
                f"{self.top1_agreement:.4f} -> {'ok' if self.ok else 'FAILED'}")


# ------------------------------------------------------------------ writers


def write_onnx(module: nn.Module, meta: dict, path: Path, opset: int = DEFAULT_OPSET) -> None:
    """``module`` (taking [0, 1] NCHW) as ONNX with a dynamic batch and ``meta`` embedded."""
    import onnx

    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset {opset} is not supported; use {MIN_OPSET}..{MAX_OPSET} "
                        f"(default {DEFAULT_OPSET})")
    try:
        raw = onnx_bytes(module, meta["preprocessing"]["image_size"], opset, meta["arch"])
    except KdistillError as err:
        raise KdistillError(f"{err}; try another --opset or --format torchscript") from None
    proto = onnx.load_from_string(raw)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps({**meta, "opset": opset})
    proto.doc_string = f"kdistill student {meta['arch']}: input [0,1] NCHW float32, output logits"
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def write_torchscript(module: nn.Module, meta: dict, path: Path) -> None:
    """``module`` traced to TorchScript (batch-generic) with ``meta`` as an extra file."""
    size = meta["preprocessing"]["image_size"]
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            traced = torch.jit.trace(module, torch.rand(2, 3, size, size), check_trace=False)
            torch.jit.save(traced, str(path), _extra_files={TS_EXTRA: json.dumps(meta)})
    except Exception as err:  # noqa: BLE001
        raise KdistillError(f"TorchScript export of {meta['arch']} failed: "
                            f"{str(err).strip().splitlines()[0][:200]}; try --format onnx") from None


def load_exported(path: Path, fmt: str) -> Predictor:
    return OnnxPredictor(str(path)) if fmt == "onnx" else load_torchscript(str(path))


# ------------------------------------------------------------------ parity


def parity_inputs(pp: Preprocessing, classes: list[str], checkpoint: Path, data: str | None,
                  n: int) -> tuple[np.ndarray, str]:
    """Up to ``n`` val images (float32 [0, 1], cropped as in evaluation) and where they came
    from; random inputs when the run records no readable data and ``data`` is not given."""
    from ..data.datasets import open_eval_split, shard_images
    from ..data.shards import ShardSplit, is_wds
    from ..data.sources import open_source, stratified_subset

    root, val = data, None
    if root is None:
        cfg_path = checkpoint.parent / "config.yaml"
        if cfg_path.is_file():
            import yaml

            try:
                section = (yaml.safe_load(cfg_path.read_text()) or {}).get("data") or {}
                root, val = section.get("root") or None, section.get("val")
            except yaml.YAMLError:
                root = None
    images: list[np.ndarray] = []
    source = None
    if root or val:
        try:
            if is_wds(val or root):  # shards: the first n readable val samples in shard order
                source = open_eval_split(val or root, "val", list(classes))
            else:
                source = open_source(root or "", "val", explicit=val, classes=list(classes))
        except UserError as err:
            if data is not None:  # the user named this data: tell them, do not guess
                raise UserError(f"--data {data}: {err}") from None
            print(f"note: the run's data ({err}) is unavailable; parity uses random inputs")
    if isinstance(source, ShardSplit) and n > 0:
        prep = Preparer(pp)
        images = [prep(img) for _, img in shard_images(source, n)]
    elif source is not None and n > 0:
        prep = Preparer(pp)
        subset = stratified_subset(source, n, seed=0)
        for i in range(len(subset)):
            try:  # PIL for files: torchvision's decoders can crash on a corrupt PNG
                img = read_rgb(subset.paths[i]) if subset.paths else subset.load(i)
            except ImageError:
                continue
            if img is not None:
                images.append(prep(img))
    if images:
        return np.stack(images), f"val images of {root or val}"
    if source is not None:
        print(f"note: no readable val image in {root or val}; parity uses random inputs")
    elif not (root or val):
        print(f"note: no data recorded beside {checkpoint} (config.yaml data.root) and no --data; "
              "parity uses random inputs")
    gen = torch.Generator().manual_seed(0)
    size = pp.image_size
    return torch.rand(max(n, 2), 3, size, size, generator=gen).numpy(), "random inputs"


def check_parity(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                 x: np.ndarray, source: str, tolerance: float = DEFAULT_TOLERANCE) -> Parity:
    """Compare softmax probabilities of two logit functions on ``x``: the first image alone,
    then batches of :data:`PARITY_BATCH`."""
    chunks = [x[:1]] + [x[i:i + PARITY_BATCH] for i in range(1, len(x), PARITY_BATCH)]
    worst, agree = 0.0, 0
    for chunk in chunks:
        p_ref, p_new = softmax(reference(chunk)), softmax(candidate(chunk))
        if p_new.shape != p_ref.shape or not np.isfinite(p_new).all():
            return Parity(float("inf"), 0.0, len(x), source, tolerance)
        worst = max(worst, float(np.abs(p_ref - p_new).max()))
        agree += int((p_ref.argmax(-1) == p_new.argmax(-1)).sum())
    return Parity(worst, agree / len(x), len(x), source, tolerance)


# ------------------------------------------------------------------ export


def export_meta(meta: dict, pp: Preprocessing, fmt: str, checkpoint: str | None) -> dict:
    """What the exported file carries (see the module docstring)."""
    return {
        "format": fmt, "arch": meta["arch"], "num_classes": meta["num_classes"],
        "classes": list(meta["classes"]), "preprocessing": pp.to_dict(),
        "input": {"name": INPUT_NAME, "layout": "NCHW", "dtype": "float32", "range": [0, 1],
                  "normalized_in_graph": True, "shape": ["batch", 3, pp.image_size, pp.image_size]},
        "output": {"name": OUTPUT_NAME, "kind": "logits"},
        "run": meta.get("run"), "checkpoint": checkpoint, "epoch": meta.get("epoch"),
        "method": meta.get("method"), "losses": meta.get("losses"), "teachers": meta.get("teachers"),
        "trained_with": meta.get("kdistill_version"), "kdistill_version": __version__,
        "exported": _dt.datetime.now().isoformat(timespec="seconds"),
    }


def export_module(model: nn.Module, meta: dict, fmt: str, out: str | Path, inputs: np.ndarray,
                  source: str, tolerance: float = DEFAULT_TOLERANCE,
                  opset: int = DEFAULT_OPSET) -> tuple[Parity, Predictor]:
    """Write ``Normalized(model)`` to ``out`` atomically, only if it passes the parity check
    on ``inputs``; ``meta`` is :func:`export_meta`'s dict. Returns the parity and the
    loaded export."""
    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    pp = Preprocessing.from_dict(meta["preprocessing"])
    module = Normalized(model.cpu().eval().float(), pp).eval()
    with atomic_path(out) as tmp:
        if fmt == "onnx":
            write_onnx(module, meta, tmp, opset)
        else:
            write_torchscript(module, meta, tmp)
        exported = load_exported(tmp, fmt)
        parity = check_parity(functools.partial(torch_logits, module), exported.logits, inputs, source, tolerance)
        if not parity.ok:
            raise ParityError(parity.line(exported.backend) + f"; {out} not written "
                              "(raise --tolerance to accept it)")
    exported.path = str(out)
    return parity, exported


def export_checkpoint(run_or_ckpt: str, fmt: str, out: str, image_size: int | None = None,
                      opset: int = DEFAULT_OPSET, data: str | None = None,
                      tolerance: float = DEFAULT_TOLERANCE, n_images: int = 64, card: bool = True,
                      bench_seconds: float = 0.5) -> dict:
    """``kdistill export``: the run's student to ``out`` (+ model card), printing the parity."""
    from ..models.checkpoint import load_model, meta_preprocessing, resolve_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    if image_size is not None and image_size < 8:
        raise UserError("--image-size must be at least 8")
    if tolerance < 0 or n_images < 1:
        raise UserError("--tolerance must be >= 0 and --parity-images >= 1")
    if Path(out).is_dir():
        raise UserError(f"--out '{out}' is a folder; give a file name, e.g. {Path(out) / 'student.onnx'}")
    ckpt = resolve_checkpoint(run_or_ckpt)
    model, meta = load_model(str(ckpt), "cpu")
    pp = meta_preprocessing(meta)
    if image_size:
        pp = Preprocessing(image_size, pp.mean, pp.std, pp.crop_pct)
    emeta = export_meta(meta, pp, fmt, str(ckpt.resolve()))
    inputs, source = parity_inputs(pp, meta["classes"], ckpt, data, n_images)
    parity, exported = export_module(model, emeta, fmt, out, inputs, source, tolerance, opset)
    print(parity.line(exported.backend))
    result = {"out": str(out), "format": fmt, "parity": asdict(parity), "meta": exported.meta}
    if card:
        from .card import build_card, write_card

        doc = build_card(model, exported, exported.meta, ckpt, parity, bench_seconds)
        result["card"] = [str(p) for p in write_card(out, doc)]
    print(f"exported {meta['arch']} ({fmt}) -> {out}" + (f"  card: {result['card'][0]}" if card else ""))
    return result
