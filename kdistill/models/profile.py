"""Cost of a model: parameters, FLOPs (torch.utils.flop_counter) and CPU latency."""
from __future__ import annotations

import time

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


@torch.no_grad()
def latency_ms(model: nn.Module, image_size: int, batch: int = 1, warmup: int = 3,
               min_seconds: float = 0.5, max_iters: int = 200) -> float:
    """Median wall time per *image* of an eval-mode forward at ``batch``, in milliseconds."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    x = torch.randn(batch, 3, image_size, image_size, device=device)
    for _ in range(warmup):
        model(x)
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < max_iters and (time.perf_counter() - start < min_seconds or len(times) < 5):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(x)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    model.train(was)
    times.sort()
    return 1000 * times[len(times) // 2] / batch


def profile(model: nn.Module, image_size: int) -> dict:
    return {"params": count_params(model), "flops": count_flops(model, image_size),
            "latency_ms": latency_ms(model, image_size)}
