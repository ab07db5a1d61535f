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

int8 (``--int8``, ONNX only; :mod:`kdistill.deploy.int8` makes the file): the fp32 graph is
written to a temporary folder and checked as above on the first ``n_images``, then
quantized; the int8 file is compared with the fp32 student on ``max(1000, n_images)`` val
images (as many as the split has): top-1 agreement, gated by ``min_agreement``, and the
top-1 accuracy of both against the labels. The kernels ONNX Runtime runs for it are listed
(int8 counts; float Conv/Gemm/MatMul left are named in a warning, not an error).
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
from ..models.onnx import INPUT_NAME, OUTPUT_NAME, Normalized, onnx_bytes
from . import DEFAULT_OPSET, DEFAULT_TOLERANCE, FORMATS
from .int8 import DEFAULT_CALIB_IMAGES, DEFAULT_MIN_AGREEMENT, INT8_PARITY_IMAGES, MIN_CALIB_IMAGES
from .inputs import calibration_inputs, parity_inputs
from .runtime import META_KEY, TS_EXTRA, OnnxPredictor, Predictor, load_torchscript, softmax, torch_logits

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


def export_meta(meta: dict, pp: Preprocessing, fmt: str, checkpoint: str | None,
                precision: str = "fp32") -> dict:
    """What the exported file carries (see the module docstring)."""
    return {
        "format": fmt, "precision": precision, "arch": meta["arch"], "num_classes": meta["num_classes"],
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
                      bench_seconds: float = 0.5, int8: bool = False, calib_images: int = DEFAULT_CALIB_IMAGES,
                      min_agreement: float | None = None) -> dict:
    """``kdistill export``: the run's student to ``out`` (+ model card), printing the parity."""
    from ..models.checkpoint import load_model, meta_preprocessing, resolve_checkpoint

    if fmt not in FORMATS:
        raise UserError(f"unknown export format '{fmt}' (use {' or '.join(FORMATS)})")
    if int8 and fmt != "onnx":
        raise UserError(f"--int8 needs --format onnx (ONNX Runtime runs the int8 model); {fmt} is fp32 only")
    if int8 and calib_images < MIN_CALIB_IMAGES:
        raise UserError(f"--calib-images {calib_images} is too few to calibrate int8 ranges; "
                        f"use at least {MIN_CALIB_IMAGES} (default {DEFAULT_CALIB_IMAGES})")
    if min_agreement is not None and not 0 <= min_agreement:
        raise UserError("--min-agreement must be >= 0 (a fraction of images, e.g. 0.95)")
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
    if int8:
        return export_int8(model, meta, pp, ckpt, out, opset, data, tolerance, n_images, card, bench_seconds,
                           calib_images, min_agreement)
    emeta = export_meta(meta, pp, fmt, str(ckpt.resolve()))
    inputs = parity_inputs(pp, meta["classes"], ckpt, data, n_images)
    parity, exported = export_module(model, emeta, fmt, out, inputs.x, inputs.source, tolerance, opset)
    print(parity.line(exported.backend))
    result = {"out": str(out), "format": fmt, "parity": asdict(parity), "meta": exported.meta}
    if card:
        from .card import build_card, write_card

        doc = build_card(model, exported, exported.meta, ckpt, parity, bench_seconds)
        result["card"] = [str(p) for p in write_card(out, doc)]
    print(f"exported {meta['arch']} ({fmt}) -> {out}" + (f"  card: {result['card'][0]}" if card else ""))
    return result


def export_int8(model: nn.Module, meta: dict, pp: Preprocessing, ckpt: Path, out: str, opset: int,
                data: str | None, tolerance: float, n_images: int, card: bool, bench_seconds: float,
                calib_images: int, min_agreement: float) -> dict:
    """``kdistill export --int8`` (see the module docstring): fp32 ONNX in a temporary
    folder, parity-checked; the int8 model from it (:func:`~.int8.int8_onnx`), its kernels
    and its agreement with the reference; ``out`` only when the agreement passes."""
    import tempfile

    from ..models.quant import QAT_MIN_AGREEMENT, QATModel
    from .int8 import check_agreement, int8_kernels, int8_onnx, int8_summary, reference_logits

    # a quantization-aware student: its int8 model is its own graph (no calibration), compared
    # with its fake-quantized self; its fp32 file is the same graph with quantization off
    qat = isinstance(model, QATModel)
    float_model = model.float_model() if qat else model
    if min_agreement is None:
        min_agreement = QAT_MIN_AGREEMENT if qat else DEFAULT_MIN_AGREEMENT
    emeta = export_meta(meta, pp, "onnx", str(ckpt.resolve()), precision="fp32")
    inputs = parity_inputs(pp, meta["classes"], ckpt, data, max(INT8_PARITY_IMAGES, n_images), required=True)
    def calib() -> np.ndarray:  # only when int8_onnx calibrates
        return calibration_inputs(pp, meta["classes"], ckpt, data, calib_images, MIN_CALIB_IMAGES).x

    reference = reference_logits(model, pp)
    with tempfile.TemporaryDirectory(prefix="kdistill-int8-") as work:
        fp32_path = Path(work) / "fp32.onnx"
        write_onnx(Normalized(float_model.cpu().eval().float(), pp).eval(), emeta, fp32_path, opset)
        fp32 = OnnxPredictor(str(fp32_path))
        parity = check_parity(reference_logits(float_model, pp) if qat else reference, fp32.logits, inputs.x[:n_images], inputs.source, tolerance)
        print(parity.line("onnxruntime fp32"))
        if not parity.ok:
            raise ParityError(parity.line("onnxruntime fp32") + f"; {out} not written "
                              "(the fp32 graph already differs; raise --tolerance to accept it)")
        with atomic_path(out) as tmp:
            int8_onnx(model, emeta, pp, fp32_path, calib, tmp, opset)
            kernels = int8_kernels(tmp)
            exported = OnnxPredictor(str(tmp))
            agreement = check_agreement(reference, exported.logits, inputs.x, inputs.labels, inputs.source,
                                        min_agreement)
            what = "fake-quantized torch eager" if qat else "fp32 torch eager"
            if not agreement.ok:
                raise ParityError(agreement.line(what) + f"; {out} not written (lower --min-agreement to "
                                  "accept it" + ("" if qat else ", or calibrate on more images: --calib-images")
                                  + ")")
        exported.path = str(out)
        print(agreement.line(what))
        print(f"onnxruntime {kernels.level}: {kernels.summary()}")
        if kernels.float_nodes:
            shown = ", ".join(kernels.float_nodes[:10]) + (" ..." if len(kernels.float_nodes) > 10 else "")
            print(f"warning: {len(kernels.float_nodes)} Conv/Gemm/MatMul still run in float: {shown}")
        summary = int8_summary(agreement, kernels, fp32_path.stat().st_size, Path(out).stat().st_size,
                               exported.meta["quantization"])
        result = {"out": str(out), "format": "onnx", "precision": "int8", "parity": asdict(parity),
                  "agreement": asdict(agreement), "kernels": kernels.int8, "float_nodes": kernels.float_nodes,
                  "meta": exported.meta}
        if card:
            from .card import build_card, write_card

            doc = build_card(model, exported, exported.meta, ckpt, parity, bench_seconds,
                             int8={**summary, "fp32_path": str(fp32_path)})
            result["card"] = [str(p) for p in write_card(out, doc)]
    print(f"exported {meta['arch']} (onnx, int8) -> {out}" + (f"  card: {result['card'][0]}" if card else ""))
    return result


def export_to_folder(run_or_ckpt: str, workdir: str | Path, data: str | None = None, int8: bool = False) -> str:
    """A checkpoint or run folder exported to ONNX (int8 with ``int8``) in ``workdir``,
    parity-checked, without a card: what ``serve`` and ``predict --int8`` run."""
    out = str(Path(workdir) / ("model.int8.onnx" if int8 else "model.onnx"))
    export_checkpoint(run_or_ckpt, "onnx", out, data=data, n_images=16, card=False, int8=int8)
    return out
