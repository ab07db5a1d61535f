"""Which precision a run trains in, chosen from the hardware, never assumed.

``train.amp = auto`` (the default) turns autocast on only where it is fast: on CUDA (bf16
on GPUs of compute capability 8 or more, else fp16 with a GradScaler) and on CPUs with native bf16
(AVX512-BF16 or AMX). On a CPU without it (e.g. AVX2 only) oneDNN emulates bf16 and
autocast runs ~10x slower than fp32 (resnet20, batch 128, 2 threads: 21 vs 240 img/s), so
``auto`` picks fp32 there. ``true`` forces autocast (with a warning where it is emulated);
``false`` is fp32. The choice is logged in one line and recorded per epoch.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch

NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_capability() -> str:
    """The vector ISA PyTorch's CPU kernels use here, e.g. ``AVX2``, ``AVX512``."""
    return torch.backends.cpu.get_cpu_capability()


#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) under which its kernels still compute bf16 natively
_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
              "AVX10_1_512", "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "ALL", "DEFAULT")


def cpu_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX tiles) and oneDNN may use
    it (an ``ONEDNN_MAX_CPU_ISA`` cap below AVX512_CORE_BF16 turns those kernels off).

    ``torch.ops.mkldnn._is_mkldnn_bf16_supported()`` is not this: it is also true on AVX512
    CPUs that only emulate bf16."""
    cap = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA") or "ALL").upper()
    if cap not in _BF16_ISAS:
        return False
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass(frozen=True)
class Precision:
    """The resolved precision: autocast dtype (None = fp32) and why it was chosen."""

    dtype: torch.dtype | None
    reason: str
    warning: str | None = None

    @property
    def name(self) -> str:
        return NAMES[self.dtype]

    @property
    def needs_scaler(self) -> bool:
        return self.dtype is torch.float16

    def autocast(self, device: torch.device) -> Callable[[], contextlib.AbstractContextManager]:
        """A factory of autocast contexts for ``device`` (a no-op for fp32)."""
        if self.dtype is None:
            return contextlib.nullcontext
        dtype = self.dtype
        return lambda: torch.autocast(device.type, dtype=dtype)

    def record(self, device: torch.device) -> dict:
        """What metrics.jsonl, summary.json and the model card say about precision."""
        row = {"precision": self.name}
        if device.type == "cpu":
            row["cpu_capability"] = cpu_capability()
        return row


def cuda_native_bf16(device: torch.device) -> bool:
    """True when the GPU computes bf16 natively: compute capability 8.0 or more (Ampere on).
    ``torch.cuda.is_bf16_supported()`` is not this: by default it also answers yes on GPUs
    that only emulate bf16 (T4, V100), where fp16 with a GradScaler is the fast choice."""
    return torch.cuda.get_device_capability(device)[0] >= 8


def resolve(device: torch.device, amp: bool | str = "auto", amp_dtype: str = "auto") -> Precision:
    """``train.amp`` (``auto`` | True | False) and ``train.amp_dtype`` -> :class:`Precision`."""
    if amp is False:
        return Precision(None, "train.amp=false")
    if device.type == "cuda":
        if amp_dtype == "auto":
            bf16 = cuda_native_bf16(device)
            major, minor = torch.cuda.get_device_capability(device)
            return Precision(torch.bfloat16 if bf16 else torch.float16,
                             f"CUDA compute capability {major}.{minor} {'with' if bf16 else 'without'} native bf16")
        return Precision(torch.bfloat16 if amp_dtype == "bf16" else torch.float16, f"train.amp_dtype={amp_dtype}")
    if device.type != "cpu":
        if amp == "auto":
            return Precision(None, f"no autocast rule for device '{device.type}'")
        return Precision(torch.bfloat16 if amp_dtype != "fp16" else torch.float16, "train.amp=true")
    cap, native = cpu_capability(), cpu_native_bf16()
    dtype = torch.float16 if amp_dtype == "fp16" else torch.bfloat16
    if amp == "auto":
        if dtype is torch.bfloat16 and native:
            return Precision(dtype, f"CPU {cap} with native bf16")
        why = (f"CPU {cap} has no native bf16 (emulated autocast is ~10x slower)" if not native
               else "CPU fp16 autocast is emulated")
        return Precision(None, why)
    warning = None
    if not (dtype is torch.bfloat16 and native):
        warning = (f"warning: train.amp=true on a CPU ({cap}) without native {NAMES[dtype]}: autocast is "
                   "emulated and about 10x slower than fp32; use train.amp=auto or --no-amp")
    return Precision(dtype, "train.amp=true", warning)


def configure_cuda(device: torch.device, precision: Precision) -> None:
    """CUDA settings for a training run on ``device``: this process's current device (a
    single process on ``cuda:N`` otherwise allocates on cuda:0 too), cuDNN autotuning (the
    training batches have one shape), and TF32 matmuls for an fp32 run."""
    if device.type != "cuda":
        return
    if device.index is not None:
        torch.cuda.set_device(device)
    torch.backends.cudnn.benchmark = True
    if precision.dtype is None:
        torch.set_float32_matmul_precision("high")
