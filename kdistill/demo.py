"""``kdistill demo``: teacher, baseline student and KD student on Fashion-MNIST in a few
minutes on 2 CPU cores.

Each arm is an ordinary run folder under ``--out``; a finished arm is reused and an
interrupted one resumed, so the demo can be stopped and started again.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import Config, build_config
from .console import log
from .models.checkpoint import load_model, meta_preprocessing
from .models.profile import profile
from .utils import atomic_write_text, ensure_writable_dir, write_json

# (model, epochs, training images) per role, sized for under 4 minutes in all on 2 CPU cores
# without native bf16 (fp32; bench/demo_time.py); the report of the three arms adds a few
# tens of seconds (5,000 val images evaluated per arm, brief latency timing), under 4.5
# minutes in all. The teacher sees more images than the students, as a real teacher would.
# At 6 x 5,000 images KD at T = 2 beat the baseline student on each of 3 seeds, by +0.57
# points on average (T = 4: +0.15, one seed below; BENCHMARKS.md "The first run"; T was
# picked on those same val images, so that edge is not evidence for T = 2 in general).
# Validation runs once, after the last epoch, on 5,000 val images.
FULL = {"val_images": 5000, "teacher": ("resnet20", 3, 10000), "student": ("resnet8", 6, 5000)}
QUICK = {"val_images": 600, "teacher": ("resnet14", 1, 1200), "student": ("resnet8", 1, 1200)}
REPORT_BENCH_SECONDS = 0.2  # per latency cell of the report: 4 cells x 3 models
KD = ["distill.losses=[kd:0.9, ce:0.1]", "distill.loss_params={kd: {temperature: 2.0}}"]


@dataclass
class Arm:
    name: str
    model: str
    epochs: int
    images: int
    run: Callable[[Config], dict]
    overrides: list[str]
    config: type = Config


def demo_config(out: Path, data: str, arm: Arm, size: dict, extra: list[str]) -> Config:
    return build_config(arm.config, overrides=[
        f"data.root={data}", f"model.name={arm.model}", f"train.epochs={arm.epochs}", f"train.out={out}",
        f"data.max_train_images={arm.images}", f"data.max_val_images={size['val_images']}",
        f"train.eval_every={arm.epochs}",
        "train.batch_size=128", "optim.lr=0.1", "optim.warmup_epochs=0", "data.workers=0",
        "data.hflip=0.5", "data.padding=2", "model.channels_last=true",
        f"train.progress={str(size['progress']).lower()}", *extra])


def run_arm(arm: Arm, out: Path, data: str, size: dict) -> dict:
    """Train an arm, reuse it if finished, resume it if interrupted; a finished arm of
    another size (epochs or training images) is refused, never silently reused."""
    from .engine.run import run_stage

    run = out / arm.name
    cfg = demo_config(run, data, arm, size, arm.overrides)

    def start(resume: bool) -> dict:
        log(f"[{arm.name}] training {arm.model} for {arm.epochs} epoch(s) of {arm.images} images -> {run}")
        cfg.train.resume = resume
        return arm.run(cfg)

    return run_stage(run, cfg, start, arm.name, "demo arm")


def arms(size: dict, out: Path) -> list[Arm]:
    from .engine.distill import DistillConfig, distill
    from .engine.run import train

    teacher, student = size["teacher"], size["student"]
    return [Arm("teacher", *teacher, train, []),
            Arm("student", *student, train, []),
            Arm("kd-student", *student, distill, [*KD, f"distill.teachers=[{out / 'teacher'}]"], DistillConfig)]


def row(name: str, run: Path, summary: dict) -> dict:
    model, meta = load_model(str(run))
    cost = profile(model, meta_preprocessing(meta).image_size)
    final = summary.get("final") or summary["best"]  # the last epoch, not a val-selected one
    return {"arm": name, "model": summary["model"], "top1": final["top1"], "mpa": final["mpa"],
            "params": cost["params"], "mflops": cost["flops"] / 1e6,
            "latency_ms": cost["latency_ms"], "epochs": summary["epochs"]}


def table(rows: list[dict]) -> str:
    head = ("| arm | model | epochs | top-1 | MPA | top-1 vs student | params | MFLOPs "
            "| CPU ms/img (batch 1) |")
    lines = [head, "|" + "---|" * 9]
    base = next((r for r in rows if r["arm"] == "student"), None)
    for r in rows:
        gain = f"{r['top1'] - base['top1']:+.4f}" if base and r["arm"] != "teacher" else "-"
        lines.append(f"| {r['arm']} | {r['model']} | {r['epochs']} | {r['top1']:.4f} | {r['mpa']:.4f} "
                     f"| {gain} | {r['params'] / 1e6:.3f}M | {r['mflops']:.1f} | {r['latency_ms']:.2f} |")
    return "\n".join(lines)


def run_demo(out: str = "runs/demo", data: str = "fashion-mnist", quick: bool = False,
             progress: bool = True) -> list[dict]:
    size = dict(QUICK if quick else FULL, progress=progress)
    out_dir = ensure_writable_dir(out, "--out")
    rows = []
    for arm in arms(size, out_dir):
        summary = run_arm(arm, out_dir, data, size)
        rows.append(row(arm.name, out_dir / arm.name, summary))
    text = table(rows)
    print(text)
    atomic_write_text(out_dir / "demo.md", text + "\n")
    write_json(out_dir / "demo.json", rows)
    print(f"report: {write_report(out_dir, data, 0.05 if quick else REPORT_BENCH_SECONDS)}")
    return rows


def write_report(out: Path, data: str, bench_seconds: float = REPORT_BENCH_SECONDS) -> Path:
    """``kdistill report`` of the three arms on the val split, beside them; latency is
    timed briefly (``bench_seconds`` per cell) to keep the demo within its few minutes."""
    from .report.build import build_report

    log("[report] evaluating teacher, student and kd-student on the val split")
    runs = [str(out / name) for name in ("teacher", "student", "kd-student")]
    return Path(build_report(runs, data, out / "report.html", "val", teacher=runs[0], workers=0,
                             bench_seconds=bench_seconds)["out"])
