"""Training throughput: kdistill's loop beside a plain PyTorch loop on the same data and steps.

Both loops decode nothing per step (the same in-RAM uint8 images), apply the same
augmentation (pad-and-crop + flip), the same AMP / channels_last settings and the same SGD
update; the ratio kdistill / plain is the cost of kdistill's loop machinery.

    .venv/bin/python bench/throughput.py [--steps 40] [--amp auto|true|false]
    .venv/bin/python bench/throughput.py --baseline-src /path/to/older/checkout

Arms, interleaved over rounds (best of each kept): resnet20 alone and KD from a resnet56
(randomly initialised: speed does not depend on the weights), each in kdistill's Trainer and
in the plain loop, each measurement in a fresh process. ``--baseline-src`` also times the
kdistill arms of another checkout (that tree first on ``sys.path``), so a change can be
checked to be no slower.
Results: bench/results/throughput.json and the "throughput" section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
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
               workers: int = 2, amp: bool = True, teacher: torch.nn.Module | None = None) -> float:
    """Images/s of a hand-written loop, its DataLoader and optimizer made here."""
    loader = DataLoader(_Plain(source), batch_size=batch, shuffle=True, drop_last=True, num_workers=workers)
    opt = torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    return plain_steps(loader, student, opt, mean, std, steps, amp, teacher)


def plain_steps(loader, student: torch.nn.Module, opt, mean, std, steps: int, amp: bool = True,
                teacher: torch.nn.Module | None = None, temperature: float = 4.0, alpha: float = 0.9) -> float:
    """Images/s of ``steps`` steps of a competent hand-written loop (channels_last; KD with
    ``teacher`` in eval mode under ``inference_mode``: alpha*KL*T^2 + (1-alpha)*CE), timed
    like kdistill's epoch: loader start-up included."""
    student.train()
    m = torch.tensor(mean).view(1, 3, 1, 1)
    s = torch.tensor(std).view(1, 3, 1, 1)
    seen, start = 0, time.perf_counter()
    for i, (x, y) in enumerate(loader):
        if i >= steps:
            break
        x = ((x.float() / 255 - m) / s).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            logits = student(x)
            loss = F.cross_entropy(logits.float(), y)
            if teacher is not None:
                with torch.inference_mode():
                    t = teacher(x).float()
                kl = F.kl_div(F.log_softmax(logits.float() / temperature, -1),
                              F.softmax(t.clone() / temperature, -1), reduction="batchmean")
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


# ---------------------------------------------------------------- the benchmark

sys.path.insert(0, str(Path(__file__).resolve().parent))
TRAIN_IMAGES = 10000  # decoded once per process; more than one capped epoch needs


def _cfg_args(arm: str, steps: int, amp: str, teacher: Path) -> list[str]:
    from common import CACHE, CIFAR

    recipe = Path(__file__).resolve().parent.parent / "kdistill/configs/cifar/kd_resnet56_resnet20.yaml"
    args = ["distill", "-c", str(recipe), "--data", CIFAR, "--out", str(CACHE / "throughput" / arm),
            "--resume", "--no-progress", "-o", f"train.max_steps_per_epoch={steps}", "-o", "distill.agreement=false",
            "-o", f"data.max_train_images={TRAIN_IMAGES}", "-o", "data.max_val_images=128", "-o", f"train.amp={amp}"]
    return args + (["--teacher", str(teacher)] if arm == "kd" else ["-o", "distill.teachers=[]", "--loss", "ce"])


def kdistill_arm(arm: str, steps: int, amp: str, teacher: Path) -> float:
    """Images/s of one capped epoch of kdistill's Trainer: ``student`` (CE) or ``kd``."""
    from common import distill_trainer

    return kdistill_loop(lambda: distill_trainer(_cfg_args(arm, steps, amp, teacher)))


def plain_arm(arm: str, steps: int, amp: str, teacher: Path) -> float:
    from kdistill.engine import precision
    from kdistill.engine.run import prepare
    from kdistill.cli import build_parser, distill_config
    from kdistill.models import create_model
    from kdistill.models.checkpoint import load_model

    cfg = distill_config(build_parser().parse_args(_cfg_args("student", steps, amp, teacher)))
    ctx = prepare(cfg)
    bf16 = precision.resolve(ctx.device, cfg.train.amp, "bf16").dtype is torch.bfloat16
    student = create_model("resnet20", 10).to(memory_format=torch.channels_last)
    t = None
    if arm == "kd":
        t = load_model(str(teacher))[0].eval().to(memory_format=torch.channels_last)
    pp = ctx.preprocessing
    return plain_loop(ctx.splits.train, student, pp.mean, pp.std, steps, cfg.train.batch_size,
                      cfg.data.workers, amp=bf16, teacher=t)


def fresh_process(loop: str, arm: str, steps: int, amp: str, src: str | None = None) -> float:
    """One measurement in a new process (every arm starts alike: no allocator or thread-pool
    state left by the others), with the kdistill package from ``src`` (default: this tree)."""
    src = src or str(Path(__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, __file__, "--one", loop, arm, "--steps", str(steps), "--amp", amp]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["img_s"]


def _commit(src: str | None) -> str | None:
    if not src:
        return None
    out = subprocess.run(["git", "-C", src, "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return out.stdout.strip() or None


def random_teacher() -> Path:
    """A resnet56 run folder (1 step of training: weights do not matter for speed)."""
    from common import CACHE, CIFAR, kdistill

    out = CACHE / "throughput" / "teacher-resnet56"
    if not (out / "best.safetensors").is_file():
        kdistill("train", "--data", CIFAR, "--model", "resnet56", "--epochs", "1", "--out", str(out), "--no-progress",
                 "-o", "train.max_steps_per_epoch=1", "-o", f"data.max_train_images={TRAIN_IMAGES}",
                 "-o", "data.max_val_images=128", *(["--resume"] if (out / "last.pt").exists() else []))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--amp", default="auto", choices=["auto", "true", "false"])
    ap.add_argument("--baseline-src", help="another checkout whose kdistill package to time beside this one")
    ap.add_argument("--one", nargs=2, metavar=("LOOP", "ARM"), help=argparse.SUPPRESS)  # fresh_process
    args = ap.parse_args()
    from common import memoize_splits

    memoize_splits()
    teacher = random_teacher()
    if args.one:
        loop, arm = args.one
        print(json.dumps({"img_s": (kdistill_arm if loop == "kdistill" else plain_arm)(arm, args.steps, args.amp,
                                                                                        teacher)}))
        return
    from common import machine, save_result, today, update_section
    from kdistill.engine import precision

    asked = args.amp
    prec = precision.resolve(torch.device("cpu"), {"true": True, "false": False}.get(args.amp, "auto"))
    args.amp = "true" if prec.dtype is not None else "false"  # explicit, so an older checkout reads it too
    fns = {}
    for arm in ("student", "kd"):
        fns[f"{arm}: kdistill"] = lambda a=arm: fresh_process("kdistill", a, args.steps, args.amp)
        fns[f"{arm}: plain"] = lambda a=arm: fresh_process("plain", a, args.steps, args.amp)
        if args.baseline_src:
            fns[f"{arm}: kdistill baseline"] = lambda a=arm: fresh_process("kdistill", a, args.steps, args.amp,
                                                                            args.baseline_src)
    best = alternate(fns, rounds=args.rounds)
    result = {"date": today(), "machine": machine(), "cpu_capability": precision.cpu_capability(),
              "precision": prec.name, "steps": args.steps, "rounds": args.rounds, "img_s": best,
              "baseline_src": args.baseline_src, "baseline_commit": _commit(args.baseline_src)}
    save_result("throughput", result)
    lines = ["## Training loop throughput (CIFAR-10)", "",
             f"Measured {today()} on {machine()}, CPU capability {result['cpu_capability']}, "
             f"precision {prec.name}, by `python bench/throughput.py --amp {asked} --steps {args.steps}"
             + (" --baseline-src OLD_CHECKOUT" if args.baseline_src else "") + "`: batch 128, channels_last, "
             f"{args.steps} steps, best of {args.rounds} interleaved rounds, each in a fresh process, CIFAR-10 "
             "decoded in RAM; the KD teacher is an untrained resnet56 (speed does not depend on weights), "
             "run by kdistill with `distill.teacher_runtime=auto` (ONNX Runtime in fp32 on a CPU, eager under "
             "bf16; a baseline checkout from before issue 15 runs it eager) and by the plain loop eagerly"
             + (f"; baseline: kdistill at commit {result['baseline_commit']}" if args.baseline_src else "")
             + ".", "",
             "| arm | kdistill img/s | plain PyTorch loop img/s | kdistill / plain |"
             + (" baseline kdistill img/s | this / baseline |" if args.baseline_src else ""),
             "|---|---|---|---|" + ("---|---|" if args.baseline_src else "")]
    for arm, label in (("student", "resnet20 alone"), ("kd", "KD resnet56 -> resnet20")):
        k, p = best[f"{arm}: kdistill"], best[f"{arm}: plain"]
        row = f"| {label} | {k:.0f} | {p:.0f} | {k / p:.2f} |"
        if args.baseline_src:
            b = best[f"{arm}: kdistill baseline"]
            row += f" {b:.0f} | {k / b:.2f} |"
        lines.append(row)
    update_section("throughput", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
