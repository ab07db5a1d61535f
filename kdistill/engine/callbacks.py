"""Run-folder logging: metrics.jsonl and TensorBoard (console lines and progress bars
live in :mod:`kdistill.console`)."""
from __future__ import annotations

import json
from pathlib import Path

from .. import distributed as dist
from ..utils import append_jsonl


class RunLogger:
    """Appends one JSON object per epoch to ``metrics.jsonl`` and mirrors scalars to
    TensorBoard. Rank 0 only; on resume, rows past the resumed epoch are dropped."""

    def __init__(self, out: Path, resume_epoch: int | None = None, tensorboard: bool = True) -> None:
        self.path = out / "metrics.jsonl"
        self.enabled = dist.is_main()
        self.writer = None
        if not self.enabled:
            return
        if resume_epoch is not None and self.path.exists():
            rows = [r for r in self.read(self.path) if r.get("epoch", 0) <= resume_epoch]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        elif self.path.exists():
            self.path.unlink()
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tb"))

    @staticmethod
    def read(path: Path) -> list[dict]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def epoch(self, row: dict) -> None:
        if not self.enabled:
            return
        append_jsonl(self.path, row)
        if self.writer is not None:
            step = row["epoch"]
            for key, value in row.items():
                if key != "epoch" and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace(".", "/", 1), value, step)
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
