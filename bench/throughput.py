"""Training throughput: kdistill's loop beside a plain PyTorch loop on the same data and steps.

Both loops decode nothing per step (the same in-RAM uint8 images), apply the same
augmentation (pad-and-crop + flip), the same AMP / channels_last settings and the same SGD
update; the ratio kdistill / plain is the cost of kdistill's loop machinery.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2


class _Plain(Dataset):
    def __init__(self, source) -> None:
        self.images, self.labels = source.array, source.labels
        self.tf = v2.Compose([v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip()])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        return self.tf(self.images[i]), self.labels[i]


def plain_loop(source, student: torch.nn.Module, mean, std, steps: int, batch: int = 128,
               workers: int = 2, amp: bool = True, teacher: torch.nn.Module | None = None,
               temperature: float = 4.0, alpha: float = 0.9) -> float:
    """Images/s of a hand-written loop (KD with ``teacher``: alpha*KL*T^2 + (1-alpha)*CE)."""
    student.train()
    loader = DataLoader(_Plain(source), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    seen, start = 0, time.perf_counter()  # timed like kdistill's epoch: loader start-up included
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        x = ((x.float() / 255 - m) / s).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = student(x)
            loss = F.cross_entropy(logits.float(), y)
            if teacher is not None:
                with torch.no_grad():
                    t = teacher(x).float()
                kl = F.kl_div(F.log_softmax(logits.float() / temperature, -1),
                              F.softmax(t / temperature, -1), reduction="batchmean")
                loss = alpha * kl * temperature**2 + (1 - alpha) * loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def kdistill_loop(trainer_factory: Callable[[], object]) -> float:
    """Images/s of one capped epoch of kdistill's Trainer (``train.max_steps_per_epoch``)."""
    trainer = trainer_factory()
    stats = trainer.train_epoch(0)
    return stats.images / stats.seconds


def alternate(fns: dict[str, Callable[[], float]], rounds: int = 2) -> dict[str, float]:
    """Run each measurement ``rounds`` times, interleaved; keep the best of each."""
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in fns.items():
            v = fn()
            print(f"  {name}: {v:.0f} img/s", flush=True)
            best[name] = max(best.get(name, 0.0), v)
    return best
