"""torchrun / DistributedDataParallel helpers (nccl on CUDA, gloo on CPU)."""
from __future__ import annotations

import os

import torch
import torch.distributed as td


def is_distributed() -> bool:
    return td.is_available() and td.is_initialized()


def rank() -> int:
    """This process's rank (from the environment before init and after cleanup)."""
    return td.get_rank() if is_distributed() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return td.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun; returns this rank's device."""
    if not launched_by_torchrun() or is_distributed():
        return device
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        td.init_process_group("nccl", device_id=device)
    else:
        td.init_process_group("gloo")
    return device


def barrier() -> None:
    if is_distributed():
        td.barrier()


def cleanup() -> None:
    if is_distributed():
        td.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        td.all_reduce(values)
        values /= world_size()
    return values


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        td.all_reduce(values)
    return values


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
