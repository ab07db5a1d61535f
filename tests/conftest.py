"""Shared fixtures: tiny generated image datasets and a CLI runner."""
from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

torch.set_num_threads(2)
ROOT = Path(__file__).resolve().parent.parent
CLASSES = ["circle", "square", "stripes"]


def make_image(cls: int, size: int, rng: np.random.Generator) -> Image.Image:
    """A learnable toy image: class-specific colour and pattern plus noise."""
    img = rng.integers(0, 60, (size, size, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:size, :size]
    c = size / 2 + rng.uniform(-2, 2, 2)
    if cls == 0:
        mask = (yy - c[0]) ** 2 + (xx - c[1]) ** 2 < (size / 3) ** 2
        img[mask] = [220, 40, 40]
    elif cls == 1:
        a, b = int(size / 4), int(3 * size / 4)
        img[a:b, a:b] = [40, 220, 40]
    else:
        img[(xx // 3) % 2 == 0] = [40, 40, 220]
    return Image.fromarray(img)


def make_folder(root: Path, per_class: dict[str, int], size: int = 32, seed: int = 0,
                classes: list[str] = CLASSES, ext: str = "png") -> Path:
    rng = np.random.default_rng(seed)
    for split, n in per_class.items():
        for ci, name in enumerate(classes):
            d = root / split / name
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                make_image(ci, size, rng).save(d / f"{i:03d}.{ext}")
    return root


def png_bytes(size: int = 32, seed: int = 0, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


def corrupt_png(size: int = 64) -> bytes:
    """A PNG with one flipped byte in its compressed data and a valid CRC: passes every
    header check; torchvision's native decoder segfaults on it (why kdistill decodes with PIL)."""
    data = bytearray(png_bytes(size))
    i = data.index(b"IDAT")
    n = struct.unpack(">I", data[i - 4:i])[0]
    data[i + 20] ^= 0xFF
    data[i + 4 + n:i + 8 + n] = struct.pack(">I", zlib.crc32(bytes(data[i:i + 4 + n])) & 0xFFFFFFFF)
    return bytes(data)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """train/ (3 x 24 images), val/ (3 x 8), test/ (3 x 6), 32 px PNG."""
    return make_folder(tmp_path_factory.mktemp("tiny"), {"train": 24, "val": 8, "test": 6})


@pytest.fixture(scope="session")
def trained_run(tiny_root, tmp_path_factory) -> Path:
    """A finished 2-epoch resnet8 run on the tiny data (shared by eval/export tests)."""
    from kdistill.cli import main

    out = tmp_path_factory.mktemp("runs") / "r8"
    assert main(["train", "--data", str(tiny_root), "--model", "resnet8", "--epochs", "2",
                 "--batch-size", "16", "--out", str(out), "--workers", "0", "--no-progress",
                 "--lr", "0.05"]) == 0
    return out


@pytest.fixture(scope="session")
def distilled_run(tiny_root, trained_run, tmp_path_factory) -> Path:
    """A 1-epoch resnet8 distilled (KD) from ``trained_run`` (shared by the report tests)."""
    from kdistill.cli import main

    out = tmp_path_factory.mktemp("runs") / "kd"
    assert main(["distill", "--data", str(tiny_root), "--model", "resnet8", "--teacher", str(trained_run),
                 "--loss", "kd:0.9", "--loss", "ce:0.1", "--epochs", "1", "--batch-size", "16",
                 "--out", str(out), "--workers", "0", "--no-progress", "--lr", "0.05"]) == 0
    return out


def run_cli(*args: str, timeout: int = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python -m kdistill ARGS`` in a subprocess (for exit codes and stderr)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "kdistill", *args], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=ROOT)


TRAIN_ARGS = ["--workers", "0", "--no-progress", "--batch-size", "16"]


def torchrun(script: Path | str, *args: str, nproc: int = 2, cwd: Path = ROOT, env: dict | None = None,
             timeout: int = 180) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node=NPROC SCRIPT ARGS`` on CPU in ``cwd``;
    on a timeout (a hung collective) the launcher and its ranks are killed, then the test fails."""
    import signal

    full = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--standalone",
           str(script), *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full,
                            cwd=cwd, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"torchrun hung for {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


class Killed(Exception):
    """Stands in for a kill: raised at the start of a chosen epoch."""


def train_killed_at_epoch(monkeypatch, args: list[str], epoch: int = 1) -> None:
    """``kdistill train ARGS`` killed as epoch ``epoch`` begins (epochs before it are saved)."""
    from kdistill.cli import main
    from kdistill.engine.trainer import Trainer

    train_epoch = Trainer.train_epoch

    def dying(self, e):
        if e == epoch:
            raise Killed
        return train_epoch(self, e)

    with monkeypatch.context() as m:
        m.setattr(Trainer, "train_epoch", dying)
        with pytest.raises(Killed):
            main(["train", *args])
