"""Cost of a model: parameters, FLOPs (torch.utils.flop_counter) and CPU latency.

:func:`latency_ms` times a torch module; :func:`callable_latency_ms` times any forward
(e.g. an onnxruntime session), so model cards compare runtimes with the same clock.
"""
from __future__ import annotations

import os
import platform
import time
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from ..utils import count_params


@torch.no_grad()
def count_flops(model: nn.Module, image_size: int, batch: int = 1) -> int:
    """Forward FLOPs for ``batch`` images (a multiply-add counts as 2 FLOPs)."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.zeros(batch, 3, image_size, image_size, device=device)
    with FlopCounterMode(display=False) as counter:
        model(x)
    model.train(was)
    return int(counter.get_total_flops())


def median_seconds(fn: Callable[[], Any], warmup: int = 3, min_seconds: float = 0.5,
                   max_iters: int = 200, sync: Callable[[], None] | None = None) -> float:
    """Median wall time of ``fn()`` over at least 5 calls and ``min_seconds`` (at most
    ``max_iters`` calls), after ``warmup`` untimed calls; ``sync`` waits for a device."""
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_seconds or len(times) < 5):
        if sync:
            sync()
        t = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


@torch.no_grad()
def latency_ms(model: nn.Module, image_size: int, batch: int = 1, warmup: int = 3,
               min_seconds: float = 0.5, max_iters: int = 200) -> float:
    """Median wall time per *image* of an eval-mode forward at ``batch``, in milliseconds."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else None
    seconds = median_seconds(lambda: model(x), warmup, min_seconds, max_iters, sync)
    model.train(was)
    return 1000 * seconds / batch


def callable_latency_ms(forward: Callable[[Any], Any], make_input: Callable[[int], Any], batch: int = 1,
                        warmup: int = 3, min_seconds: float = 0.5, max_iters: int = 200) -> float:
    """Median wall time per *image* of ``forward(make_input(batch))``, in milliseconds
    (for runtimes other than torch eager, e.g. onnxruntime or TorchScript)."""
    x = make_input(batch)
    return 1000 * median_seconds(lambda: forward(x), warmup, min_seconds, max_iters) / batch


def latency_table(eager: nn.Module, image_size: int,
                  others: dict[str, Callable[[np.ndarray], Any]] | None = None,
                  batches: tuple[int, ...] = (1, 32), seconds: float = 0.5,
                  threads: int = 1) -> dict[str, dict[str, float]]:
    """ms per image of ``eager`` (a torch module on [0, 1] NCHW tensors) and of each forward
    in ``others`` (on float32 [0, 1] NCHW numpy batches, e.g. an onnxruntime session), at
    each batch size, keyed ``{"torch_eager" | name: {str(batch): ms}}``. torch runs on
    ``threads`` threads meanwhile (give other runtimes the same): a like-for-like figure that
    stays meaningful on a busy machine, where multi-threaded torch on shared cores slows down
    by orders of magnitude (its threads wait at barriers for descheduled peers)."""
    def make(batch: int) -> np.ndarray:
        return np.random.default_rng(0).random((batch, 3, image_size, image_size), dtype=np.float32)

    out: dict[str, dict[str, float]] = {"torch_eager": {}, **{name: {} for name in others or {}}}
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for b in batches:
            out["torch_eager"][str(b)] = round(latency_ms(eager, image_size, b, min_seconds=seconds), 4)
            for name, forward in (others or {}).items():
                out[name][str(b)] = round(callable_latency_ms(forward, make, b, min_seconds=seconds), 4)
    finally:
        torch.set_num_threads(before)
    return out


def profile(model: nn.Module, image_size: int) -> dict:
    return {"params": count_params(model), "flops": count_flops(model, image_size),
            "latency_ms": latency_ms(model, image_size)}


def machine() -> str:
    """One line naming the hardware and runtimes that measured a latency."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU"
    line = (f"{os.cpu_count()} cores ({cpu}){gpu}, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads)")
    try:
        from .onnx import import_onnxruntime

        line += f", onnxruntime {import_onnxruntime().__version__}"
    except ImportError:
        pass
    return f"{line}, {platform.system()}"
