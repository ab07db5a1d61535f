"""torchrun / DistributedDataParallel helpers (nccl on CUDA, gloo on CPU).

``KDISTILL_FORCE_DDP=1`` takes the DDP path (process group, DDP wrapper) under torchrun at
world size 1 too, e.g. to check it on one GPU with ``torchrun --nproc_per_node=1``."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

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


def forced() -> bool:
    """``KDISTILL_FORCE_DDP=1`` under a launcher that gives the rendezvous (torchrun)."""
    return os.environ.get("KDISTILL_FORCE_DDP") == "1" and {"MASTER_ADDR", "MASTER_PORT"} <= os.environ.keys()


def launched_by_torchrun() -> bool:
    """Several processes under torchrun, or one with :func:`forced`: join a process group."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 or forced()


def init(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun; returns this rank's device
    (also when the group is already up, e.g. held by :func:`one_group`)."""
    if not launched_by_torchrun():
        return device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if is_distributed():
        return device
    if device.type == "cuda":
        torch.cuda.set_device(device)
        td.init_process_group("nccl", device_id=device)
    else:
        td.init_process_group("gloo")
    if forced() and world_size() == 1:
        from .console import log

        log(f"KDISTILL_FORCE_DDP=1: process group ({td.get_backend()}) and DDP at world size 1")
    return device


_held = 0  # open one_group() blocks; while > 0, cleanup() leaves the group up


@contextlib.contextmanager
def one_group(device: torch.device) -> Iterator[torch.device]:
    """One process group for a command of several stages (ssld, born-again generations).

    Each stage joins with :func:`init` and leaves with :func:`cleanup`; inside this block
    the group stays up between them and is destroyed at the end (if this block made it).
    Destroying and re-creating the default group under torchrun reuses the first group's
    rendezvous keys in the agent's store, so ranks may dial each other's closed ports: the
    second stage hangs or fails with 'Connection refused' / 'Connection closed by peer'."""
    global _held
    owner = launched_by_torchrun() and not is_distributed()
    device = init(device)
    _held += 1
    try:
        yield device
    finally:
        _held -= 1
        if owner and not _held:
            cleanup()


def barrier() -> None:
    if is_distributed():
        td.barrier()


def cleanup() -> None:
    """Leave the process group (unless a :func:`one_group` block holds it)."""
    if is_distributed() and not _held:
        td.destroy_process_group()


def all_gather_object(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` in a single process."""
    if not is_distributed():
        return [obj]
    parts: list = [None] * world_size()
    td.all_gather_object(parts, obj)
    return parts


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        values = values.clone()
        td.all_reduce(values)
    return values


#: fp32 bytes per reduce of a block of rows (4 MiB: 1,000 rows of 1,000 classes), e.g. the
#: fixed-view teacher table (engine/table.py), which is never whole in memory or on the device
REDUCE_CHUNK_BYTES = 4 << 20


def reduce_sum_to_main(block: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """The sum over ranks of every rank's host ``block`` (same shape everywhere), as fp32 on
    the host of rank 0; None on the other ranks. The block goes through ``device`` (nccl
    reduces CUDA tensors), so callers keep it small (:data:`REDUCE_CHUNK_BYTES`)."""
    if not is_distributed():
        return block.float()
    sent = block.to(device, torch.float32, copy=True)
    td.reduce(sent, dst=0)
    return sent.cpu() if rank() == 0 else None


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    td.broadcast_object_list(box, src=0)
    return box[0]
