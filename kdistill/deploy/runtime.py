"""One interface over a shipped student: an ONNX file (onnxruntime), a TorchScript file or a
kdistill checkpoint / run folder (torch eager), plus the image preprocessing they share.

Input convention (every exported graph, ``predict`` and ``serve``): a float32 NCHW batch of
RGB images with values in [0, 1], already resized and centre-cropped to ``image_size``
(:class:`~kdistill.data.transforms.ResizeCenterCrop` with the model's ``crop_pct``), *not*
normalised: the mean/std normalisation is inside the graph. The batch dimension is dynamic.
The graph returns logits ``(B, num_classes)``; callers apply the softmax.
"""
from __future__ import annotations

import json
import warnings
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..data.transforms import Preprocessing, ResizeCenterCrop, to_unit
from ..errors import UserError
from ..models.onnx import Normalized, ort_session
from ..utils import first_line

META_KEY = "kdistill"  # ONNX metadata_props key / TorchScript extra file (kdistill.json)
TS_EXTRA = "kdistill.json"
CHECKPOINT_SUFFIXES = (".safetensors",)


# ------------------------------------------------------------------ predictors


class Predictor:
    """A loaded model: ``logits(x)`` for a float32 [0, 1] NCHW numpy batch, and ``meta``
    (classes, preprocessing, arch, run...)."""

    backend = "none"

    def __init__(self, meta: dict, path: str) -> None:
        self.meta = meta
        self.path = path
        self.pp = Preprocessing.from_dict(meta["preprocessing"])
        self.classes: list[str] = list(meta["classes"])

    def logits(self, x: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def probs(self, x: np.ndarray) -> np.ndarray:
        return softmax(self.logits(x))


class OnnxPredictor(Predictor):
    backend = "onnxruntime"

    def __init__(self, path: str, threads: int | None = None) -> None:
        self.session = ort_session(str(path), threads)
        raw = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        super().__init__(_parse_meta(raw, path), str(path))
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(x, dtype=np.float32)})[0]


class TorchPredictor(Predictor):
    """TorchScript module or eager model, on CPU, in inference mode (thread-safe)."""

    def __init__(self, module: nn.Module, meta: dict, path: str, backend: str) -> None:
        super().__init__(meta, path)
        self.module = module.eval()
        self.backend = backend

    def logits(self, x: np.ndarray) -> np.ndarray:
        return torch_logits(self.module, x)


def torch_logits(module: nn.Module, x: np.ndarray) -> np.ndarray:
    """float32 logits of a torch module (eager or TorchScript) on a float32 NCHW batch, in
    inference mode."""
    with torch.inference_mode():
        return module(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).float().numpy()


def load_torchscript(path: str) -> TorchPredictor:
    extra = {TS_EXTRA: ""}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            module = torch.jit.load(str(path), map_location="cpu", _extra_files=extra)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot load TorchScript model '{path}' ({first_line(err)})") from None
    raw = extra[TS_EXTRA]
    meta = _parse_meta(raw.decode() if isinstance(raw, bytes) else raw, path)
    return TorchPredictor(module, meta, str(path), "torchscript")


def load_checkpoint(run_or_ckpt: str) -> TorchPredictor:
    """A kdistill run folder or .safetensors checkpoint, run eagerly behind :class:`Normalized`."""
    from ..models.checkpoint import load_model, meta_preprocessing

    model, meta = load_model(run_or_ckpt, "cpu")
    export_meta = {"arch": meta["arch"], "num_classes": meta["num_classes"], "classes": meta["classes"],
                   "preprocessing": meta["preprocessing"], "run": meta.get("run"),
                   "checkpoint": meta["path"], "kdistill_version": meta.get("kdistill_version")}
    return TorchPredictor(Normalized(model, meta_preprocessing(meta)), export_meta, meta["path"], "torch")


def detect_format(path: str) -> str:
    """'checkpoint' (run folder or .safetensors), 'torchscript' (a zip archive) or 'onnx'."""
    p = Path(path)
    if p.is_dir() or p.suffix.lower() in CHECKPOINT_SUFFIXES:
        return "checkpoint"
    if not p.is_file():
        raise UserError(f"model '{path}' does not exist (give an .onnx or TorchScript file, "
                        "a run folder or a .safetensors checkpoint)")
    if p.suffix.lower() == ".onnx":
        return "onnx"
    return "torchscript" if zipfile.is_zipfile(p) else "onnx"


def load_predictor(model: str, threads: int | None = None) -> Predictor:
    """Load MODEL, whatever it is (see :func:`detect_format`)."""
    fmt = detect_format(model)
    if fmt == "checkpoint":
        return load_checkpoint(model)
    if fmt == "torchscript":
        return load_torchscript(model)
    return OnnxPredictor(model, threads)


def read_export_meta(path: str) -> dict:
    """The metadata embedded in an exported ONNX or TorchScript file."""
    if detect_format(path) == "torchscript":
        return load_torchscript(path).meta
    import onnx

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read ONNX model '{path}' ({first_line(err)})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    return _parse_meta(props.get(META_KEY), path)


def _parse_meta(raw: str | None, path: str) -> dict:
    if not raw:
        raise UserError(f"'{path}' has no kdistill metadata (class names, preprocessing); "
                        "export it with `kdistill export`")
    try:
        meta = json.loads(raw)
        Preprocessing.from_dict(meta["preprocessing"])
        list(meta["classes"])
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"'{path}' has unreadable kdistill metadata ({first_line(err)})") from None
    return meta


# ------------------------------------------------------------------ images


class ImageError(Exception):
    """An upload or file that is not a usable image; ``status`` is the HTTP code to answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def as_rgb_uint8(img: torch.Tensor) -> torch.Tensor:
    """(3, H, W) uint8 from what decoders return (first frame of an animation, 16-bit PNG)."""
    if img.ndim == 4:
        img = img[0]
    if img.dtype != torch.uint8:
        from torchvision.transforms.v2 import functional as TF

        img = TF.to_dtype(img, torch.uint8, scale=True)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return img


class Preparer:
    """uint8 CHW image -> float32 (3, S, S) in [0, 1], exactly as evaluation crops it."""

    def __init__(self, pp: Preprocessing) -> None:
        self.crop = ResizeCenterCrop(pp.image_size, pp.crop_pct)

    def __call__(self, img: torch.Tensor) -> np.ndarray:
        return to_unit(self.crop(as_rgb_uint8(img))).numpy()


def read_rgb(source: str | bytes, max_pixels: int | None = None) -> torch.Tensor:
    """:func:`kdistill.images.read_image` (PIL; the decoder evaluation uses), with its
    errors as :class:`ImageError`: 413 for images over ``max_pixels``, else 400."""
    from ..images import UnreadableImage, read_image

    try:
        return read_image(source, max_pixels)
    except UnreadableImage as err:
        raise ImageError(str(err), 413 if err.too_large else 400) from None


# ------------------------------------------------------------------ outputs


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def top_k(probs: np.ndarray, classes: list[str], k: int) -> list[dict[str, Any]]:
    """``[{"label", "index", "prob"}, ...]`` for the ``k`` most probable classes of one image."""
    k = max(1, min(k, len(classes)))
    order = np.argsort(-probs, kind="stable")[:k]
    return [{"label": classes[i], "index": int(i), "prob": round(float(probs[i]), 6)} for i in order]
