"""Issue 3 benchmark: every distillation method on CIFAR-10, two teacher-student pairs.

    .venv/bin/python bench/distill_methods.py [--epochs 4] [--pairs resnet20,mobilenetv2]

Pairs: resnet56 -> resnet20 (same family) and resnet56 -> a cross-family student. All arms
of a pair use the same epochs, seed, recipe family (cifar/<method>_resnet56_resnet20,
student overridden) and data. Then the training throughput of every method, measured in
this process, interleaved with a plain PyTorch KD loop on the same pair and data.
Runs are cached in bench/cache/distill and resumed after a kill.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CIFAR, ensure_run, load_result, machine, memoize_splits, save_result, today, update_section  # noqa: E402

METHODS = ["kd", "dkd", "dist", "fitnet", "at", "sp", "mgd", "rkd", "pkt", "crd"]
TEACHER = CACHE / "cifar" / "resnet56"


def arm_args(method: str, student: str, train_images: int | None) -> tuple[str, list[str]]:
    common = ["--data", CIFAR, "-o", f"model.name={student}"]
    if train_images:
        common += ["-o", f"data.max_train_images={train_images}"]
    if method == "baseline":
        return "train", ["-c", "cifar/resnet20_baseline", *common]
    extra = ["-o", "distill.feature_pairs=[]"] if student != "resnet20" else []
    return "distill", ["-c", f"cifar/{method}_resnet56_resnet20", "--teacher", str(TEACHER),
                       *common, *extra]


def throughput(student: str, methods: list[str], steps: int, train_images: int | None) -> dict:
    """img/s of each method's kdistill loop and of a plain PyTorch KD loop, interleaved."""
    import torch
    from throughput import alternate, kdistill_loop, plain_loop

    memoize_splits()

    from kdistill.cli import build_parser, distill_config
    from kdistill.data.datasets import train_dataset
    from kdistill.data.loader import EpochLoader
    from kdistill.engine.distill import build_method
    from kdistill.engine.run import prepare
    from kdistill.engine.trainer import Trainer
    from kdistill.models import create_model
    from kdistill.models.checkpoint import load_model

    def cfg_for(method):
        command, args = arm_args(method, student, train_images)
        args = [command, *args, "--out", str(CACHE / "throughput_distill"), "--resume", "--no-progress",
                "-o", f"train.max_steps_per_epoch={steps}"]
        return distill_config(build_parser().parse_args(args))

    ctx0 = prepare(cfg_for("kd"))

    def factory(method):
        def make():
            ctx = prepare(cfg_for(method))
            m, crop = build_method(ctx, ctx.cfg.distill)
            loader = EpochLoader(train_dataset(ctx.cfg.data, ctx.splits.train, ctx.splits.native_size, crop),
                                 ctx.cfg.train.batch_size, ctx.cfg.data.workers, ctx.cfg.train.seed)
            return Trainer(ctx.cfg, m, loader, None, ctx.device, ctx.out, ctx.classes, ctx.preprocessing)
        return make

    teacher, _ = load_model(str(TEACHER))
    teacher = teacher.to(memory_format=torch.channels_last)
    pp = ctx0.preprocessing

    def plain():
        s = create_model(student, 10).to(memory_format=torch.channels_last)
        return plain_loop(ctx0.splits.train, s, pp.mean, pp.std, steps, 128, 2, teacher=teacher)

    fns = {"plain_kd": plain, **{m: (lambda m=m: kdistill_loop(factory(m))) for m in methods}}
    return alternate(fns, rounds=2)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--pairs", default="resnet20,mobilenetv2", help="students, comma-separated")
    ap.add_argument("--cross-train-images", type=int, default=10000,
                    help="training images for the cross-family pair (a seeded stratified subset)")
    ap.add_argument("--steps", type=int, default=25, help="steps per throughput measurement")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--skip-throughput", action="store_true", help="accuracy arms only")
    ap.add_argument("--throughput-only", action="store_true", help="reuse finished arms; measure speed")
    args = ap.parse_args()
    methods = args.methods.split(",")
    if not (TEACHER / "summary.json").is_file():
        raise SystemExit(f"train the teacher first: python bench/train_baselines.py ({TEACHER})")

    result = {"date": today(), "machine": machine(), "epochs": args.epochs, "pairs": {}}
    if args.throughput_only:
        result = load_result("distill_methods")
        result["throughput"] = throughput("resnet20", methods, args.steps, None)
        result["throughput_date"] = today()
        save_result("distill_methods", result)
        write_section(result)
        return
    for i, student in enumerate(args.pairs.split(",")):
        images = None if i == 0 else args.cross_train_images
        arms = {}
        for method in ["baseline", *methods]:
            command, a = arm_args(method, student, images)
            out = CACHE / "distill" / f"resnet56-{student}" / method
            arms[method] = ensure_run(command, out, args.epochs, a)
        result["pairs"][student] = {"train_images": images or 50000, "arms": arms}
        save_result("distill_methods", result)
    if not args.skip_throughput:
        result["throughput"] = throughput("resnet20", methods, args.steps, None)
        save_result("distill_methods", result)
    write_section(result)


def write_section(result: dict) -> None:
    speed = result.get("throughput", {})
    lines = [f"Measured {result['date']} on {result['machine']} by `python bench/distill_methods.py`.",
             f"Teacher: resnet56 (bench/cache/cifar/resnet56, cifar/resnet56_teacher). Every "
             f"arm: {result['epochs']} epochs, seed 0, SGD + cosine, bf16 AMP, recipe "
             "cifar/<method>_resnet56_resnet20 (student overridden for the second pair).", ""]
    for student, pair in result["pairs"].items():
        base = pair["arms"]["baseline"]["best"]
        lines += [f"### resnet56 -> {student} ({pair['train_images']} training images)", "",
                  "| arm | val top-1 | val MPA | vs baseline | agreement | KL to teacher | train img/s |",
                  "|---|---|---|---|---|---|---|"]
        for name, s in pair["arms"].items():
            b = s["best"]
            agree = f"{b['agreement']:.4f}" if "agreement" in b else "-"
            kl = f"{b['kl_to_teacher']:.3f}" if "kl_to_teacher" in b else "-"
            lines.append(f"| {name} | {b['top1']:.4f} | {b['mpa']:.4f} | {b['top1'] - base['top1']:+.4f} | "
                         f"{agree} | {kl} | {s['train_images_per_s']:.0f} |")
        lines.append("")
    if speed:
        plain = speed["plain_kd"]
        lines += ["Throughput on resnet56 -> resnet20, measured in one process (best of 2 interleaved "
                  "rounds; the plain loop is a hand-written PyTorch KD loop on the same data, AMP and "
                  "channels_last):", "", "| loop | img/s | ÷ plain PyTorch KD |", "|---|---|---|"]
        for name, v in speed.items():
            lines.append(f"| {name} | {v:.0f} | {v / plain:.2f} |")
    update_section("distill-methods", "## Distillation methods (CIFAR-10)\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
