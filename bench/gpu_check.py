"""GPU check (issue 15): kdistill's training loop on one GPU, on synthetic data.

    bash bench/gpu_check.sh            # on the GPU machine: PYTHONPATH=., no installs
    python bench/gpu_check.py --tiny   # anywhere: tiny models, CUDA-only parts skipped

For each pair (resnet56 -> resnet20 at 32 px; timm resnet50 -> mobilenetv3_large_100 at
224 px, random weights) and each setting (fp32; AMP, fp16 on CUDA; AMP + channels_last;
AMP + channels_last + torch.compile of the student), it prints images/s and peak GPU memory
of kdistill's Trainer for: the student alone, online KD with the eager teacher, online KD
with the compiled teacher (``distill.teacher_runtime=compile``) and cached-style KD (view
``fixed``: teacher outputs computed once, read with the batch). The timed epoch runs under
``torch.cuda.set_sync_debug_mode("warn")``; the host syncs it reports are counted per step
(the lean loop's target is 0 per step, a few per ``train.sync_every`` steps).

Synthetic data: random JPEGs written to a temporary folder (nothing to carry).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

PAIRS = {"resnet56 -> resnet20 (32 px)": ("resnet56", "resnet20", 32),
         "resnet50 -> mobilenetv3_large_100 (224 px)": ("timm:resnet50", "timm:mobilenetv3_large_100", 224)}
TINY = {"resnet8 -> resnet8 (16 px)": ("resnet8", "resnet8", 16)}
SETTINGS = {"fp32": ["train.amp=false"],
            "amp": ["train.amp=true"],
            "amp+cl": ["train.amp=true", "model.channels_last=true"],
            "amp+cl+compile": ["train.amp=true", "model.channels_last=true", "model.compile=true"]}


def synthetic(root: Path, size: int, per_class: int, classes: int = 10) -> Path:
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", per_class), ("val", 2)):
        for c in range(classes):
            d = root / str(size) / split / f"c{c}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(img).save(d / f"{i}.jpg", quality=90)
    return root / str(size)


def teacher_run(root: Path, data: Path, arch: str, size: int, device: str) -> Path:
    """A 1-step run of the teacher architecture (speed does not depend on its weights)."""
    from kdistill.cli import main

    out = root / f"teacher-{arch.replace(':', '_')}"
    if not (out / "best.safetensors").is_file():
        main(["train", "--data", str(data), "--model", arch, "--epochs", "1", "--out", str(out), "--no-progress",
              "--batch-size", "8", "-o", "train.max_steps_per_epoch=1", "-o", f"data.image_size={size}",
              "-o", f"train.device={device}", "-o", "data.workers=0"])
    return out


def measure(argv: list[str], overrides: list[str], cuda: bool) -> tuple[float, float, float]:
    """(img/s, peak GB, host syncs per step) of the second of two capped epochs."""
    from common import distill_trainer

    t = distill_trainer(argv + [a for o in overrides for a in ("-o", o)])
    t.train_epoch(0)  # warm-up: compilation, cuDNN autotuning, worker start
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if cuda:
            torch.cuda.set_sync_debug_mode("warn")
        start = time.perf_counter()
        stats = t.train_epoch(1)
        if cuda:
            torch.cuda.set_sync_debug_mode("default")
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    syncs = sum("synchroniz" in str(w.message) for w in caught)
    steps = t.cfg.train.max_steps_per_epoch
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return stats.images / seconds, peak, syncs / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="tiny models and images, 2 steps (a smoke test)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=128)
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.tiny
    device = "cuda" if cuda else "cpu"
    pairs = TINY if args.tiny else PAIRS
    steps = 2 if args.tiny else args.steps
    batch = 4 if args.tiny else args.batch_size
    settings = {k: v for k, v in SETTINGS.items() if cuda or "compile" not in k}  # CUDA parts only on CUDA
    print(f"gpu_check: {torch.cuda.get_device_name() if cuda else 'CPU (CUDA parts skipped)'}, torch "
          f"{torch.__version__}, {steps} steps x batch {batch}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"{'pair':44s} {'setting':15s} {'arm':12s} {'img/s':>8s} {'peak GB':>8s} {'syncs/step':>10s}")
        for label, (t_arch, s_arch, size) in pairs.items():
            data = synthetic(root / "data", size, max(2 * steps * batch // 10, 4))
            teacher = teacher_run(root, data, t_arch, size, device)
            base = ["distill", "--data", str(data), "--model", s_arch, "--no-progress", "--batch-size", str(batch)]
            common = [f"train.max_steps_per_epoch={steps}", f"train.device={device}", "distill.agreement=false",
                      f"data.image_size={size}", "data.workers=0" if args.tiny else "data.workers=4",
                      "train.sync_every=1000", "train.epochs=2"]
            arms = {"student": ["--loss", "ce"],
                    "KD eager": ["--teacher", str(teacher), "--teacher-runtime", "eager"],
                    "KD compiled": ["--teacher", str(teacher), "--teacher-runtime", "compile" if cuda else "auto"],
                    "KD cached": ["--teacher", str(teacher), "--view", "fixed"]}
            for setting, extra in settings.items():
                for arm, arm_args in arms.items():
                    out = root / "runs" / f"{abs(hash((label, setting, arm)))}"
                    rate, peak, syncs = measure(base + arm_args + ["--out", str(out)], common + extra, cuda)
                    print(f"{label:44s} {setting:15s} {arm:12s} {rate:8.0f} {peak:8.2f} {syncs:10.2f}", flush=True)


if __name__ == "__main__":
    main()
