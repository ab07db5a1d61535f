"""Issue 2 benchmark: the CIFAR-10 resnet56 teacher and resnet20 baseline student, and
kdistill's training throughput beside a plain PyTorch loop (same data, same steps).

    .venv/bin/python bench/train_baselines.py            # trains (or reuses) both, then measures

The teacher (bench/cache/cifar/resnet56) is reused by the distillation benchmarks. Runs are
resumable: start the script again after a kill.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CIFAR, ensure_run, machine, save_result, today, update_section  # noqa: E402


def measure_throughput(model: str, steps: int) -> dict:
    from throughput import alternate, kdistill_loop, plain_loop

    from kdistill.config import Config, build_config
    from kdistill.data.datasets import train_dataset
    from kdistill.data.loader import EpochLoader
    from kdistill.engine.run import prepare
    from kdistill.engine.trainer import Trainer
    from kdistill.methods.supervised import Supervised
    from kdistill.models import create_model

    cfg = build_config(Config, ["cifar/resnet20_baseline"], overrides=[
        f"data.root={CIFAR}", f"model.name={model}", f"train.max_steps_per_epoch={steps}",
        "train.progress=false", f"train.out={CACHE / 'throughput'}", "train.resume=true"])
    ctx = prepare(cfg)
    pp = ctx.preprocessing

    def kd_factory():
        student = create_model(model, 10).to(memory_format=__import__("torch").channels_last)
        ds = train_dataset(cfg.data, ctx.splits.train, ctx.splits.native_size, pp.image_size)
        loader = EpochLoader(ds, cfg.train.batch_size, cfg.data.workers, cfg.train.seed)
        method = Supervised(student, ctx.student_prep())
        return Trainer(cfg, method, loader, None, ctx.device, ctx.out, ctx.classes, pp)

    def plain():
        import torch
        student = create_model(model, 10).to(memory_format=torch.channels_last)
        from kdistill.engine import precision

        bf16 = precision.resolve(ctx.device, cfg.train.amp, cfg.train.amp_dtype).dtype is torch.bfloat16
        return plain_loop(ctx.splits.train, student, pp.mean, pp.std, steps, cfg.train.batch_size,
                          cfg.data.workers, amp=bf16)  # the precision kdistill's loop resolved

    best = alternate({"kdistill": lambda: kdistill_loop(kd_factory), "plain": plain})
    return {"model": model, "steps": steps, "batch": cfg.train.batch_size, **best,
            "ratio": best["kdistill"] / best["plain"]}


def evaluate_both(run: Path) -> dict:
    """`kdistill eval` of the run's best checkpoint on val, without and with TTA."""
    from kdistill.engine.run import evaluate_run

    return {("tta" if tta else "plain"): evaluate_run(str(run), CIFAR, "val", tta)[0] for tta in (False, True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--student-epochs", type=int, default=15)
    ap.add_argument("--steps", type=int, default=60, help="steps per throughput measurement")
    args = ap.parse_args()

    runs = {}
    for name, conf, epochs in (("resnet56", "resnet56_teacher", args.teacher_epochs),
                               ("resnet20", "resnet20_baseline", args.student_epochs)):
        runs[name] = ensure_run("train", CACHE / "cifar" / name, epochs,
                                ["-c", f"cifar/{conf}", "--data", CIFAR])
    tta = {name: evaluate_both(CACHE / "cifar" / name) for name in runs}
    speed = [measure_throughput(m, args.steps) for m in ("resnet20", "resnet56")]
    result = {"date": today(), "machine": machine(), "runs": runs, "tta": tta, "throughput": speed}
    save_result("train_baselines", result)

    lines = [f"Measured {today()} on {machine()} by `python bench/train_baselines.py`.", "",
             "| model | recipe | epochs | val top-1 | val MPA | top-1 with TTA | MPA with TTA | train img/s |",
             "|---|---|---|---|---|---|---|---|"]
    for name, conf in (("resnet56", "resnet56_teacher"), ("resnet20", "resnet20_baseline")):
        s, e = runs[name], tta[name]
        lines.append(f"| {name} | cifar/{conf} | {s['epochs']} | {e['plain']['top1']:.4f} | "
                     f"{e['plain']['mpa']:.4f} | {e['tta']['top1']:.4f} | {e['tta']['mpa']:.4f} | "
                     f"{s['train_images_per_s']:.0f} |")
    lines += ["", "Accuracy from `kdistill eval RUN --data CIFAR --split val [--tta]` on the best checkpoint "
              "(float32; TTA: image, flip and four 2-px diagonal shifts). train img/s: the run's mean over "
              "epochs, with other work sharing the 2 cores at times; the ratio below is the speed figure."]
    lines += ["", "Throughput, same data and steps in one process (precision train.amp=auto on this CPU, "
              "channels_last, batch 128, "
              f"{args.steps} steps, best of 2 interleaved rounds):", "",
              "| model | kdistill img/s | plain PyTorch loop img/s | ratio |", "|---|---|---|---|"]
    for t in speed:
        lines.append(f"| {t['model']} | {t['kdistill']:.0f} | {t['plain']:.0f} | {t['ratio']:.2f} |")
    update_section("train-baselines", "## Teacher and baseline student (CIFAR-10)\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
