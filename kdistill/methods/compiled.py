"""Frozen teachers compiled for inference (``distill.teacher_runtime``).

A frozen teacher never trains, so it need not run as a training graph. Runtimes:

* ``eager``: the PyTorch module as loaded (under ``no_grad``; the reference).
* ``onnx``: the teacher exported to ONNX (normalisation inside the graph) and run by ONNX
  Runtime on the CPU with all graph optimisations (BatchNorm folded into the convolutions,
  fused activations), ``torch.get_num_threads()`` intra-op threads and thread spinning off,
  so its idle threads do not fight the student's backward pass for the cores. It runs in
  fp32 whatever the run's autocast precision.
* ``compile``: BatchNorm folded into the convolutions (``torch.fx``), channels_last on
  CUDA, ``torch.compile`` and ``inference_mode``.
* ``auto``, the fixed rule: ``compile`` on CUDA; on the CPU, ``eager`` when the run
  autocasts to bf16 (a CPU with native bf16: oneDNN's bf16 kernels beat ONNX Runtime's
  fp32), else ``onnx`` when ONNX Runtime is installed, else ``eager``. From
  ``bench/speed.py`` (BENCHMARKS.md, "Online KD"): resnet56 -> resnet20 on a 2-core
  AVX512-BF16 CPU (medians of 3 rounds), online KD ran at 1.29x eager's speed with
  ``onnx`` in fp32 (330 vs 255 img/s), and at 0.86x eager's with ``onnx`` beside a bf16
  student (428 vs 497 img/s).

Every compiled teacher is checked against eager at start on one batch of real images (max
|Δprob| <= 1e-4 and top-1 agreement 1.0, in fp32); when the export fails or the check does,
that teacher runs eager, said in one line. A teacher whose features a loss (or mining's
deduplication) captures stays eager too: compiled graphs give logits only.
"""
from __future__ import annotations

import copy
from typing import Callable, get_args

import torch
from torch import nn

from ..config import TeacherRuntime
from ..console import log
from ..errors import KdistillError, UserError
from ..models.onnx import INPUT_NAME, OUTPUT_NAME, Normalized, onnx_bytes, onnxruntime_available, ort_session
from ..utils import first_line
from .teachers import FrozenTeachers, Teacher

RUNTIMES = get_args(TeacherRuntime)
OPSET = 17
TOLERANCE = 1e-4


def resolve_runtime(runtime: str, device: torch.device, autocast: torch.dtype | None = None) -> str:
    """The runtime ``auto`` stands for on ``device`` when the run autocasts to ``autocast``
    (None: fp32); other runtimes are returned as they are."""
    if runtime not in RUNTIMES:
        raise UserError(f"distill.teacher_runtime must be one of {', '.join(RUNTIMES)}, got '{runtime}'")
    if runtime != "auto":
        return runtime
    if device.type == "cuda":
        return "compile"
    if autocast is torch.bfloat16:
        return "eager"
    return "onnx" if onnxruntime_available() else "eager"


class CompiledTeacher(Teacher):
    """A teacher whose forward runs ``runner`` on its resized [0, 1] input (the runner holds
    the normalisation); the eager ``model`` stays for describe() and feature capture."""

    def __init__(self, teacher: Teacher, runner: Callable[[torch.Tensor], torch.Tensor], runtime: str) -> None:
        super().__init__(teacher.model, teacher.preprocessing, teacher.name, teacher.classes,
                         teacher.class_index, teacher.prep.channels_last)
        self.prep = teacher.prep
        self.runner, self.runtime = runner, runtime

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.runner(self.prep.resized(x).float())


class OrtRunner:
    """ONNX Runtime on CPU tensors: float32 NCHW in, float32 logits out (no copies beyond
    the one into ONNX Runtime's output)."""

    def __init__(self, model: nn.Module, pp, size: int, name: str) -> None:
        module = Normalized(copy.deepcopy(model).cpu().float().eval(), pp).eval()
        self.session = ort_session(onnx_bytes(module, size, OPSET, name),
                                   threads=torch.get_num_threads(), spinning=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise KdistillError("the onnx teacher runtime runs on the CPU")
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: x.contiguous().numpy()})[0]
        return torch.from_numpy(out)


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each BatchNorm that follows a convolution folded into it
    (``torch.fx``); ``model`` itself when it cannot be traced."""
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval())
    except Exception:  # noqa: BLE001 - untraceable control flow: keep the BatchNorms
        return model


class CompileRunner:
    """``torch.compile`` of the normalised, BatchNorm-folded teacher, in inference mode."""

    def __init__(self, model: nn.Module, pp, device: torch.device) -> None:
        module = Normalized(fold_batchnorm(model), pp).to(device).eval()
        self.channels_last = device.type == "cuda"
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module, dynamic=False)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            out = self.module(x)
        return out.float().clone()  # a normal tensor: losses may save it for backward


def parity(eager: Teacher, compiled: Teacher, images: torch.Tensor) -> tuple[float, float]:
    """(max |Δprob|, top-1 agreement) of ``compiled`` against ``eager`` on ``images``, fp32."""
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False):
        p_e = eager(images).float().softmax(-1)
        p_c = compiled(images).float().softmax(-1)
    return float((p_e - p_c).abs().max()), float((p_e.argmax(-1) == p_c.argmax(-1)).float().mean())


def compile_teacher(teacher: Teacher, runtime: str, images: torch.Tensor) -> Teacher:
    """``teacher`` on ``runtime`` if it reproduces eager on ``images``, else ``teacher``."""
    device = images.device
    try:
        if runtime == "onnx":
            runner = OrtRunner(teacher.model, teacher.preprocessing, teacher.prep.size, teacher.name)
        else:
            runner = CompileRunner(teacher.model, teacher.preprocessing, device)
        compiled = CompiledTeacher(teacher, runner, runtime)
        diff, agree = parity(teacher, compiled, images)
    except (KdistillError, UserError) as err:
        log(f"teacher {teacher.name}: {runtime} runtime unavailable ({err}); running eager")
        return teacher
    except Exception as err:  # noqa: BLE001 - an op the runtime cannot take
        log(f"teacher {teacher.name}: {runtime} runtime failed ({first_line(err)[:160]}); running eager")
        return teacher
    check = f"max |dprob| {diff:.1e}, top-1 agreement {agree:.4f} on {len(images)} images"
    if diff > TOLERANCE or agree < 1.0:
        log(f"teacher {teacher.name}: {runtime} runtime disagrees with eager ({check}; tolerance "
            f"{TOLERANCE:.0e}); running eager")
        return teacher
    log(f"teacher {teacher.name}: {runtime} runtime ({check})")
    return compiled


def compile_teachers(source: FrozenTeachers, runtime: str, device: torch.device,
                     images: Callable[[], torch.Tensor | None],
                     autocast: torch.dtype | None = None) -> FrozenTeachers:
    """Each of ``source``'s teachers (on ``device``) on ``runtime`` (after
    :func:`resolve_runtime`; ``autocast``: the run's autocast dtype, None for fp32), checked
    against eager on ``images()``, a uint8 batch of real images loaded only when needed.
    In place; returns ``source``."""
    runtime = resolve_runtime(runtime, device, autocast)
    if runtime == "eager":
        return source
    if source.capture is not None:
        log(f"teacher features are captured (feature/relation losses, or deduplication): the teacher "
            f"stays eager instead of {runtime}")
        return source
    images = images()
    if images is not None:
        images = images.to(device)
    else:
        log(f"no readable image to check the {runtime} teacher runtime against eager; running eager")
        return source
    for i, t in enumerate(source.teachers):
        if not isinstance(t, CompiledTeacher):
            source.teachers[i] = compile_teacher(t, runtime, images)
    return source
