"""A model as an ONNX graph run by ONNX Runtime on the CPU: used by ``kdistill export`` (the
shipped student) and by frozen teachers compiled for inference (``methods/compiled.py``).

The graph takes float32 NCHW images in [0, 1] (normalisation inside, :class:`Normalized`)
with a dynamic batch dimension and returns logits.
"""
from __future__ import annotations

import contextlib
import io
import os
import sys
import warnings

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import KdistillError, UserError
from ..utils import first_line

INPUT_NAME, OUTPUT_NAME = "input", "logits"


class Normalized(nn.Module):
    """``model((x - mean) / std)``: the exported graph, taking [0, 1] images."""

    def __init__(self, model: nn.Module, pp: Preprocessing) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(pp.mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(pp.std, dtype=torch.float32).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model((x - self.mean) / self.std)


def onnx_bytes(module: nn.Module, size: int, opset: int, what: str) -> bytes:
    """``module`` (eval mode, on the CPU, fp32) exported to ONNX with a dynamic batch; a
    failure raises :class:`KdistillError` naming ``what`` and the exporter's first line."""
    buf = io.BytesIO()
    try:
        # the exporter prints the whole graph when it fails: keep it out of the user's log
        with warnings.catch_warnings(), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (torch.rand(2, 3, size, size),), buf, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME],
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                              opset_version=opset, do_constant_folding=True, dynamo=False)
    except Exception as err:  # noqa: BLE001
        raise KdistillError(f"ONNX export of {what} failed at opset {opset}: "
                            f"{str(err).strip().splitlines()[0][:200]}") from None
    return buf.getvalue()


def onnxruntime_available() -> bool:
    """Can ONNX Runtime be imported here (it is a core dependency, but may be missing)?"""
    import importlib.util

    return importlib.util.find_spec("onnxruntime") is not None


#: read by ONNX Runtime once, when it is first imported; "1" creates no telemetry uploader
TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"


def import_onnxruntime():
    """``onnxruntime``, imported with its telemetry off (unless ``ORT_DISABLE_TELEMETRY`` is set).

    The official Linux wheels (1.29 on) start Microsoft's 1DS telemetry uploader when they
    are imported: a worker thread, a SQLite queue under ``~/.cache/Microsoft``, an HTTP
    thread per upload. It uploads while the process exits, racing the interpreter's and the
    C++ statics' teardown: an upstream cause of aborts at exit after the work is done (e.g.
    microsoft/onnxruntime-genai#2363, zilliztech/memsearch#747). Under torchrun every rank
    has one. ``ORT_DISABLE_TELEMETRY=1`` before the first import creates none of it; if
    onnxruntime was imported before (by the caller), its events are switched off instead."""
    imported = "onnxruntime" in sys.modules
    os.environ.setdefault(TELEMETRY_ENV, "1")
    import onnxruntime as ort

    if imported and os.environ[TELEMETRY_ENV] == "1":
        ort.disable_telemetry_events()
    return ort


def import_ort_quantization():
    """``onnxruntime.quantization`` (ONNX Runtime's quantization tools), imported after
    :func:`import_onnxruntime` has switched telemetry off."""
    import_onnxruntime()
    import onnxruntime.quantization as quantization
    import onnxruntime.quantization.shape_inference  # noqa: F401 - quant_pre_process

    return quantization


def ort_session(model: str | bytes, threads: int | None = None, spinning: bool = True):
    """An ONNX Runtime CPU session on a file path or serialized model. ``threads``: intra-op
    threads (None: ORT's default, one per core); ``spinning=False`` makes its idle threads
    sleep instead of spinning, so they leave the cores to PyTorch between calls (a teacher
    running beside the student's backward pass)."""
    ort = import_onnxruntime()

    opts = ort.SessionOptions()
    if threads:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if not spinning:
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    try:
        return ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    except Exception as err:  # noqa: BLE001
        where = f"'{model}'" if isinstance(model, str) else "the exported graph"
        raise UserError(f"cannot load ONNX model {where} ({first_line(err)})") from None
