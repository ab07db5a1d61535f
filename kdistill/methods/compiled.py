"""Frozen teachers compiled for inference (``distill.teacher_runtime``).

A frozen teacher never trains, so it need not run as a training graph. Runtimes:

* ``eager``: the PyTorch module as loaded (under ``no_grad``; the reference).
* ``onnx``: the teacher exported to ONNX (normalisation inside the graph) and run by ONNX
  Runtime on the CPU with all graph optimisations (BatchNorm folded into the convolutions,
  fused activations), ``torch.get_num_threads()`` intra-op threads and thread spinning off,
  so its idle threads do not fight the student's backward pass for the cores. It runs in
  fp32 whatever the run's autocast precision.
* ``compile``: BatchNorm folded into the convolutions (``torch.fx``), weights in the run's
  autocast dtype, channels_last on CUDA and under bf16, ``torch.compile`` and
  ``inference_mode``, one graph per teacher (:class:`CompileRunner`).
* ``auto``, the fixed rule: ``compile`` on CUDA; on the CPU, ``eager`` when the run
  autocasts to bf16 (a CPU with native bf16: oneDNN's bf16 kernels beat ONNX Runtime's
  fp32), else ``onnx`` when ONNX Runtime is installed, else ``eager``. From
  ``bench/speed.py`` (BENCHMARKS.md, "Online KD"): resnet56 -> resnet20 on a 2-core
  AVX512-BF16 CPU (medians of 3 rounds), online KD ran at 1.29x eager's speed with
  ``onnx`` in fp32 (330 vs 255 img/s), and at 0.86x eager's with ``onnx`` beside a bf16
  student (428 vs 497 img/s).

Every compiled teacher is checked against eager fp32 (TF32 off) at start on one batch of
real images at the run's batch size and precision: max |Δprob| <= 1e-4 in fp32, <= 2e-2 in
bf16/fp16, and the same top-1 wherever eager's top-2 margin exceeds twice that; when the
export fails or the check does, that teacher runs eager, said in one line (a CUDA error
while compiling ends the run instead: the GPU is unusable after it). A teacher whose features a loss (or mining's
deduplication) captures stays eager too: compiled graphs give logits only.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, get_args

import torch
from torch import nn

from ..config import TeacherRuntime
from ..console import log
from ..errors import KdistillError, TrainingError, UserError
from ..models.onnx import INPUT_NAME, OUTPUT_NAME, Normalized, onnx_bytes, onnxruntime_available, ort_session
from ..utils import first_line
from .teachers import FrozenTeachers, Teacher

RUNTIMES = get_args(TeacherRuntime)
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
OPSET = 17
TOLERANCE = 1e-4
BACKEND = "inductor"  # torch.compile's backend for the compile runtime (tests: aot_eager)


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
    (``torch.fx``); a plain copy when it cannot be traced (the original stays as it is: the
    caller may cast the copy)."""
    from torch.fx.experimental.optimization import fuse

    model = copy.deepcopy(model).eval()
    try:
        return fuse(model)
    except Exception:  # noqa: BLE001 - untraceable control flow: keep the BatchNorms
        return model


def _graphs() -> int:
    """Dynamo's count of graphs compiled in this process (global: callers take deltas)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


class CompileRunner:
    """``torch.compile`` of the normalised, BatchNorm-folded teacher in inference mode, at
    the run's precision, for batches of exactly ``batch_size`` images.

    Dynamo adds a cache entry per input shape and autocast state, and after 8 entries on a
    code object it runs eager without a word. So this runner gives it one: the weights are
    cast to ``dtype`` (bf16/fp16 under autocast; channels_last on CUDA and under bf16) and
    autocast is off inside, so the caller's autocast state adds nothing; shorter batches are
    padded (by repeating their last image) and longer ones chunked to ``batch_size``.
    ``graphs`` counts the graphs this teacher's calls compiled (1); each one after the
    first is logged."""

    made = 0  # runners made in this process

    def __init__(self, model: nn.Module, pp, device: torch.device, batch_size: int,
                 dtype: torch.dtype | None = None, name: str = "teacher", backend: str | None = None) -> None:
        self.dtype = dtype or torch.float32
        self.batch_size, self.name, self.graphs = batch_size, name, 0
        # traced as a whole, each teacher's graph module has a forward of its own; only an
        # untraceable one keeps Normalized.forward, which then holds one cache entry per teacher
        module = fold_batchnorm(Normalized(model, pp)).to(device, self.dtype).eval()
        CompileRunner.made += 1
        limit = torch._dynamo.config.recompile_limit
        torch._dynamo.config.recompile_limit = max(limit, 8 + CompileRunner.made)
        self.channels_last = device.type == "cuda" or self.dtype is torch.bfloat16
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module, dynamic=False, backend=backend or BACKEND)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n < self.batch_size:
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
        x = x.to(self.dtype, memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)
        before = _graphs()
        with torch.inference_mode(), torch.autocast(x.device.type, enabled=False):
            out = self.module(x)
        new = _graphs() - before
        if new:
            self.graphs += new
            if self.graphs > 1:
                log(f"teacher {self.name}: compiled graph {self.graphs} (input {tuple(x.shape)}, "
                    f"{NAMES[self.dtype]}); expected one per teacher")
        return out[:n]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.cat([self._run(c) for c in x.split(self.batch_size)]) if len(x) else self._run(x)
        return out.float().clone()  # a normal tensor: losses may save it for backward


#: parity tolerances, max |Δprob| against eager fp32 (TF32 off), by the runtime's precision
TOLERANCES = {torch.float32: TOLERANCE, torch.bfloat16: 2e-2, torch.float16: 2e-2}


@contextlib.contextmanager
def _exact_fp32():
    """fp32 matmuls and convolutions without TF32 (CUDA), for a reference that rounds only once."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@dataclass
class Parity:
    """How ``compiled`` compares with eager fp32 on ``n`` images."""

    max_diff: float
    agreement: float  # top-1 agreement where eager's top-2 margin exceeds 2 x tolerance
    decisive: int  # images with such a margin
    n: int
    tolerance: float
    precision: str

    @property
    def ok(self) -> bool:
        return self.max_diff <= self.tolerance and self.agreement == 1.0

    def line(self) -> str:
        return (f"max |dprob| {self.max_diff:.1e} (tolerance {self.tolerance:.0e}, {self.precision}), top-1 "
                f"agreement {self.agreement:.4f} on {self.decisive} of {self.n} images")


def parity(eager: Teacher, compiled: Teacher, images: torch.Tensor, dtype: torch.dtype | None = None) -> Parity:
    """``compiled`` (running at ``dtype``; None: fp32) against eager fp32 on ``images``. Top-1
    must agree only where eager's top-2 margin is above twice the tolerance: closer classes
    may swap within it, and a good compile must not fail through rounding."""
    dtype = dtype or torch.float32
    tol = TOLERANCES[dtype]
    with torch.no_grad(), torch.autocast(images.device.type, enabled=False), _exact_fp32():
        p_e = eager(images).float().softmax(-1)
        p_c = compiled(images).float().softmax(-1)
    top2 = p_e.topk(min(2, p_e.shape[1]), dim=-1).values
    decisive = (top2[:, 0] - top2[:, -1]) > 2 * tol if top2.shape[1] > 1 else torch.ones(len(p_e), dtype=torch.bool)
    agree = (p_e.argmax(-1) == p_c.argmax(-1))[decisive]
    return Parity(float((p_e - p_c).abs().max()), float(agree.float().mean()) if len(agree) else 1.0,
                  int(decisive.sum()), len(images), tol, NAMES[dtype])


def _failure(err: BaseException, device: torch.device) -> str:
    """Why a compile failed, in a few words; a sticky CUDA error ends the run instead."""
    if isinstance(err, torch.cuda.OutOfMemoryError):
        torch.cuda.empty_cache()
        return f"out of GPU memory while compiling ({first_line(err)[:120]})"
    if device.type == "cuda" and ("CUDA error" in str(err) or type(err).__name__ == "AcceleratorError"):
        raise TrainingError(f"CUDA error while compiling the teacher ({first_line(err)[:160]}); the GPU "
                            "cannot go on in this process: rerun with --teacher-runtime eager, then --resume") from None
    return first_line(err)[:160]


def compile_teacher(teacher: Teacher, runtime: str, images: torch.Tensor, batch_size: int = 128,
                    dtype: torch.dtype | None = None) -> Teacher:
    """``teacher`` on ``runtime`` if it reproduces eager on ``images``, else ``teacher``.
    ``compile`` runs at the run's autocast ``dtype`` for batches of ``batch_size``; the
    parity check runs at that size and precision (ONNX Runtime runs fp32)."""
    device = images.device
    if len(images) < batch_size:  # parity at the training batch size: repeat the real images
        images = images.repeat(math.ceil(batch_size / len(images)), 1, 1, 1)[:batch_size]
    dtype = dtype if runtime == "compile" else None
    graphs = 0
    try:
        if runtime == "onnx":
            runner = OrtRunner(teacher.model, teacher.preprocessing, teacher.prep.size, teacher.name)
        else:
            runner = CompileRunner(teacher.model, teacher.preprocessing, device, batch_size, dtype, teacher.name)
        compiled = CompiledTeacher(teacher, runner, runtime)
        check = parity(teacher, compiled, images, dtype)
        graphs = getattr(runner, "graphs", 0)
    except (KdistillError, UserError) as err:
        if isinstance(err, TrainingError):
            raise
        log(f"teacher {teacher.name}: {runtime} runtime unavailable ({err}); running eager")
        return teacher
    except Exception as err:  # noqa: BLE001 - an op the runtime cannot take
        log(f"teacher {teacher.name}: {runtime} runtime failed ({_failure(err, device)}); running eager")
        return teacher
    if not check.ok:
        log(f"teacher {teacher.name}: {runtime} runtime disagrees with eager ({check.line()}); running eager")
        return teacher
    compiled_graphs = f"{graphs} graph{'s' if graphs != 1 else ''} compiled, " if runtime == "compile" else ""
    log(f"teacher {teacher.name}: {runtime} runtime ({compiled_graphs}{check.line()})")
    return compiled


def compile_teachers(source: FrozenTeachers, runtime: str, device: torch.device,
                     images: Callable[[], torch.Tensor | None],
                     autocast: torch.dtype | None = None, batch_size: int = 128) -> FrozenTeachers:
    """Each of ``source``'s teachers (on ``device``) on ``runtime`` (after
    :func:`resolve_runtime`; ``autocast``: the run's autocast dtype, None for fp32), checked
    against eager on ``images()``, a uint8 batch of real images loaded only when needed,
    at ``batch_size`` (the batches the teacher will see). In place; returns ``source``."""
    runtime = resolve_runtime(runtime, device, autocast)
    if runtime != "eager":
        _compile_each(source, runtime, device, images, autocast, batch_size)
    if autocast is torch.bfloat16:  # the teachers that stay eager run in bf16 (Teacher.run_in)
        for t in source.teachers:
            if not isinstance(t, CompiledTeacher):
                t.run_in(torch.bfloat16)
    return source


def _compile_each(source: FrozenTeachers, runtime: str, device: torch.device,
                  images: Callable[[], torch.Tensor | None], autocast: torch.dtype | None,
                  batch_size: int) -> None:
    if source.capture is not None:
        log(f"teacher features are captured (feature/relation losses, or deduplication): the teacher "
            f"stays eager instead of {runtime}")
        return
    images = images()
    if images is None:
        log(f"no readable image to check the {runtime} teacher runtime against eager; running eager")
        return
    images = images.to(device)
    for i, t in enumerate(source.teachers):
        if not isinstance(t, CompiledTeacher):
            source.teachers[i] = compile_teacher(t, runtime, images, batch_size, autocast)
