"""int8 ONNX models: how one is made (:func:`int8_onnx`) and how it is checked, whatever
made it (:func:`int8_kernels`, :func:`check_agreement`).

Post-training quantization (PTQ) with ONNX Runtime's tools: the fp32 export goes through
``quant_pre_process`` (ONNX shape inference and ORT's graph optimizations, which fold
BatchNorm into the convolutions), then ``quantize_static`` in the QDQ format:
activations uint8 asymmetric per tensor, weights int8 symmetric per output channel, ranges
calibrated (min/max) on training images prepared as in evaluation. The file keeps the fp32
export's interface (float32 [0, 1] NCHW in, float32 logits out; the QuantizeLinear /
DequantizeLinear pairs are inside) and its ``kdistill`` metadata, with ``precision: int8``
and ``quantization`` (how it was made) added.

"Runs in int8" is checked, not assumed: ONNX Runtime's CPU session, at the optimization
level every kdistill session uses (``ORT_ENABLE_ALL``, :func:`~kdistill.models.onnx.ort_session`),
writes the graph it will run; each Conv/Gemm/MatMul must have become an int8 kernel
(QLinearConv, QGemm, ...). ``ORT_ENABLE_EXTENDED`` fuses the same QDQ groups into the same
kernels; ``ALL`` adds the layout changes (NCHWc / NHWC transposes) that really run.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import re
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import KdistillError, UserError
from ..models.onnx import INPUT_NAME, Normalized, import_onnxruntime, import_ort_quantization
from ..utils import first_line
from .runtime import META_KEY, softmax, torch_logits

MIN_CALIB_IMAGES = 64
DEFAULT_CALIB_IMAGES = 512
#: int8 top-1 agreement with the fp32 student below which the export fails: see README
#: ("int8"): under what PTQ kept on CIFAR-10 (bench/int8.py: 0.980-0.986 resnet20, 0.955 a
#: weak mobilenetv2), far above what wrong ranges or a layer gone wrong keep
DEFAULT_MIN_AGREEMENT = 0.95
INT8_PARITY_IMAGES = 1000  # val images the int8 agreement is measured on, when there are
CALIB_BATCH = 32
QUANT_FORMAT = "QDQ"

#: ONNX Runtime CPU kernels that compute in int8 (convolutions and matrix products)
INT8_KERNELS = frozenset({"QLinearConv", "QGemm", "QLinearMatMul", "ConvInteger", "MatMulInteger",
                          "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearConvTranspose"})
#: float convolutions and matrix products: what must not be left after quantization
FLOAT_COMPUTE = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "FusedConv", "FusedGemm",
                           "FusedMatMul", "NhwcFusedConv"})


def quantization_settings(n_images: int) -> dict:
    """What the int8 file records of how it was made (``meta["quantization"]``)."""
    ort = import_onnxruntime()
    return {"method": "ptq", "format": QUANT_FORMAT, "activations": "uint8 asymmetric per tensor",
            "weights": "int8 symmetric per channel", "calibration": "minmax",
            "calibration_images": n_images, "onnxruntime": ort.__version__}


# ------------------------------------------------------------------ making the int8 model


def int8_onnx(model: nn.Module, meta: dict, pp: Preprocessing, fp32_path: Path,
              calib: Callable[[], np.ndarray], out_path: Path, opset: int) -> dict:
    """Write the int8 ONNX model of ``model`` to ``out_path``; returns its embedded metadata.

    ``fp32_path`` is the student's fp32 export (with ``meta``); ``calib()`` gives the
    calibration images (float32 [0, 1] NCHW), called only when the model is calibrated.
    This is the one place that decides how an int8 file is made; everything after it
    (kernel check, agreement, card) reads the file only. A quantization-aware model
    (``models/quant.py: QATModel``) is not calibrated: its own graph, with the ranges it
    learned, is exported (:func:`~kdistill.models.quant.qat_onnx_bytes`)."""
    from ..models.quant import QAT_OPSET, QAT_SPEC, QATModel, qat_onnx_bytes

    if isinstance(model, QATModel):
        raw = qat_onnx_bytes(Normalized(model.cpu().eval(), pp).eval(), pp.image_size, meta["arch"])
        Path(out_path).write_bytes(raw)
        full = {**meta, "precision": "int8", "opset": QAT_OPSET,
                "quantization": {"method": "qat", "format": QUANT_FORMAT, **QAT_SPEC,
                                 "calibration": "none: the ranges learned in training"}}
        set_metadata(out_path, full, f"kdistill student {meta['arch']} (int8, QAT, {QUANT_FORMAT}): input "
                                     "[0,1] NCHW float32, output logits")
        return full
    images = calib()
    settings = quantization_settings(len(images))
    with tempfile.TemporaryDirectory(prefix="kdistill-ptq-") as work:
        pre = Path(work) / "pre.onnx"
        q = import_ort_quantization()
        QuantFormat, QuantType = q.QuantFormat, q.QuantType  # noqa: N806
        with _quiet(), _as_user_error(fp32_path, meta["arch"], "pre-processing"):
            q.shape_inference.quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=False)
        with _quiet(), _as_user_error(fp32_path, meta["arch"], "static quantization"):
            q.quantize_static(str(pre), str(out_path), Calibration(images), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True,
                            extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
            # not CalibMaxIntermediateOutputs: in onnxruntime 1.32 MinMax drops (does not merge)
            # the batches it clears; its outputs are already reduced to a min/max per batch
    full = {**meta, "precision": "int8", "opset": opset, "quantization": settings}
    set_metadata(out_path, full, f"kdistill student {meta['arch']} (int8, {QUANT_FORMAT}): input [0,1] "
                                 "NCHW float32, output logits")
    return full


def reference_logits(model: nn.Module, pp: Preprocessing) -> Callable[[np.ndarray], np.ndarray]:
    """What an int8 model of ``model`` is compared with: the fp32 student in torch eager."""
    module = Normalized(model.cpu().eval().float(), pp).eval()
    return lambda x: torch_logits(module, x)


class Calibration:
    """ONNX Runtime's ``CalibrationDataReader`` protocol over prepared images, in batches of
    :data:`CALIB_BATCH`."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.start = 0

    def get_next(self) -> dict | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start:self.start + CALIB_BATCH]
        self.start += CALIB_BATCH
        return {INPUT_NAME: np.ascontiguousarray(batch, dtype=np.float32)}

    def rewind(self) -> None:
        self.start = 0

    def __iter__(self):
        self.rewind()
        return iter(self.get_next, None)


def set_metadata(path: Path, meta: dict, doc: str | None = None) -> None:
    """Replace the ``kdistill`` metadata of the ONNX file at ``path``."""
    import onnx

    proto = onnx.load(str(path))
    for i in reversed(range(len(proto.metadata_props))):
        if proto.metadata_props[i].key == META_KEY:
            del proto.metadata_props[i]
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    if doc:
        proto.doc_string = doc
    onnx.save(proto, str(path))


@contextlib.contextmanager
def _quiet():
    """ORT's quantization tools log warnings and print; keep them out of the user's output."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


@contextlib.contextmanager
def _as_user_error(fp32_path: Path, arch: str, step: str):
    """A failure of ORT's tools as one :class:`UserError` line naming the layer (the node of
    the fp32 graph whose name or output the error mentions)."""
    try:
        yield
    except KdistillError:
        raise
    except Exception as err:  # noqa: BLE001 - ORT raises anything from its tools
        text = str(err) or type(err).__name__
        node = failing_node(fp32_path, text)
        at = f" at layer {node}" if node else ""
        raise UserError(f"ONNX Runtime cannot quantize {arch} to int8{at} ({step}: "
                        f"{first_line(text)[:200]}); export it in fp32 (drop --int8)") from None


def failing_node(fp32_path: Path, message: str) -> str | None:
    """The name (and op) of the node of ``fp32_path`` that ``message`` names, by node or
    output name (the longest match wins); None when it names none."""
    import onnx

    try:
        graph = onnx.load(str(fp32_path)).graph
    except Exception:  # noqa: BLE001
        return None
    hits = []
    for node in graph.node:
        for name in [node.name, *node.output]:
            if name and re.search(rf"(?<![\w/.]){re.escape(name)}(?![\w.])", message):
                hits.append((len(name), f"{node.name or name} ({node.op_type})"))
    return max(hits)[1] if hits else None


# ------------------------------------------------------------------ checking an int8 model


@dataclass
class Kernels:
    """What ONNX Runtime runs for an ONNX file: int8 kernels by op type, and the float
    Conv/Gemm/MatMul nodes left (by name)."""

    int8: dict[str, int]
    float_nodes: list[str] = field(default_factory=list)
    level: str = "ORT_ENABLE_ALL"

    @property
    def fully_int8(self) -> bool:
        return bool(self.int8) and not self.float_nodes

    def summary(self) -> str:
        counts = ", ".join(f"{op} {n}" for op, n in sorted(self.int8.items())) or "none"
        left = f"{len(self.float_nodes)} float Conv/Gemm/MatMul left" if self.float_nodes else "no float Conv/Gemm/MatMul"
        return f"int8 kernels {counts}; {left}"


def int8_kernels(path: str | Path, level: str = "ORT_ENABLE_ALL") -> Kernels:
    """The op types of the graph ONNX Runtime's CPU session runs for ``path`` at ``level``."""
    import onnx

    ort = import_onnxruntime()
    with tempfile.TemporaryDirectory(prefix="kdistill-ortopt-") as work:
        opts = ort.SessionOptions()
        opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
        opts.optimized_model_filepath = str(Path(work) / "optimized.onnx")
        opts.log_severity_level = 3  # the NCHWc "hardware specific" serialization warning
        try:
            ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
            graph = onnx.load(opts.optimized_model_filepath).graph
        except Exception as err:  # noqa: BLE001
            raise UserError(f"ONNX Runtime cannot load the int8 model '{path}' ({first_line(err)})") from None
    ops = Counter(n.op_type for n in graph.node)
    left = [f"{n.name or n.output[0]} ({n.op_type})" for n in graph.node if n.op_type in FLOAT_COMPUTE]
    return Kernels({op: c for op, c in ops.items() if op in INT8_KERNELS}, left, level)


@dataclass
class Agreement:
    """An int8 model against its reference on labelled images: top-1 agreement, and the
    top-1 accuracy of both (None without labels)."""

    top1_agreement: float
    reference_top1: float | None
    int8_top1: float | None
    n: int
    n_labeled: int
    source: str
    min_agreement: float
    max_abs_diff: float  # max |probability difference|: reported, not gated

    @property
    def ok(self) -> bool:
        return self.top1_agreement >= self.min_agreement

    def line(self, reference: str = "fp32 torch eager") -> str:
        acc = ""
        if self.reference_top1 is not None:
            acc = (f", top-1 accuracy {reference} {self.reference_top1:.4f} vs int8 {self.int8_top1:.4f}"
                   + (f" ({self.n_labeled} labelled)" if self.n_labeled != self.n else ""))
        return (f"parity {reference} vs onnxruntime int8 on {self.n} {self.source}: top-1 agreement "
                f"{self.top1_agreement:.4f} (min {self.min_agreement:g}){acc}, max |dprob| "
                f"{self.max_abs_diff:.2e} -> {'ok' if self.ok else 'FAILED'}")


def check_agreement(reference: Callable[[np.ndarray], np.ndarray], candidate: Callable[[np.ndarray], np.ndarray],
                    x: np.ndarray, labels: np.ndarray, source: str, min_agreement: float,
                    batch: int = 32) -> Agreement:
    """Compare two logit functions on ``x`` (the first image alone, then batches of
    ``batch``: the dynamic batch is exercised); ``labels`` -1 are left out of the accuracies."""
    chunks = [slice(0, 1)] + [slice(i, i + batch) for i in range(1, len(x), batch)]
    ref, new = [], []
    for s in chunks:
        ref.append(softmax(reference(x[s])))
        out = softmax(candidate(x[s]))
        if out.shape != ref[-1].shape or not np.isfinite(out).all():
            return Agreement(0.0, None, None, len(x), 0, source, min_agreement, float("inf"))
        new.append(out)
    p_ref, p_new = np.concatenate(ref), np.concatenate(new)
    top_ref, top_new = p_ref.argmax(-1), p_new.argmax(-1)
    known = labels >= 0
    acc_ref = float((top_ref[known] == labels[known]).mean()) if known.any() else None
    acc_new = float((top_new[known] == labels[known]).mean()) if known.any() else None
    return Agreement(float((top_ref == top_new).mean()), acc_ref, acc_new, len(x), int(known.sum()), source,
                     min_agreement, float(np.abs(p_ref - p_new).max()))


def int8_summary(agreement: Agreement, kernels: Kernels, fp32_bytes: int, int8_bytes: int,
                 quantization: dict) -> dict:
    """The model card's ``int8`` section (fp32 beside int8)."""
    return {"agreement": asdict(agreement), "kernels": kernels.int8, "float_nodes": kernels.float_nodes,
            "optimization_level": kernels.level, "fp32_bytes": fp32_bytes, "int8_bytes": int8_bytes,
            "quantization": quantization}
