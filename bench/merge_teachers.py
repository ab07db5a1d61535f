"""Issue 3 benchmark: one student from two teachers with different label sets (CIFAR-10).

    .venv/bin/python bench/merge_teachers.py [--teacher-epochs 10] [--epochs 4]

CIFAR-10 is split into two 5-class problems (classes 0-4 and 5-9, as symlinked ImageFolder
roots in bench/cache/merge); a resnet20 teacher is trained on each. A resnet20 student over
all 10 classes then learns from both: merged by subset (each teacher supervises the
student's distribution over its own classes) with and without labels, and merged by
concatenating the teachers' logits (label-free). The labels-only student of
bench/distill_methods.py (same recipe and epochs) is the baseline. Runs are cached and
resumed after a kill.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CIFAR, ensure_run, machine, save_result, today, update_section  # noqa: E402

WORK = CACHE / "merge"
KD = "cifar/kd_resnet56_resnet20"


def subset_root(name: str, classes: list[str]) -> Path:
    """An ImageFolder root with only ``classes`` (symlinks to the CIFAR-10 class folders)."""
    root = WORK / "data" / name
    for split in ("train", "val"):
        for c in classes:
            link = root / split / c
            if not link.exists():
                link.parent.mkdir(parents=True, exist_ok=True)
                link.symlink_to(Path(CIFAR).resolve() / split / c, target_is_directory=True)
    return root


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--teacher-epochs", type=int, default=10)
    ap.add_argument("--epochs", type=int, default=4, help="student epochs (as bench/distill_methods.py)")
    args = ap.parse_args()
    classes = sorted(d.name for d in (Path(CIFAR) / "train").iterdir() if d.is_dir())
    halves = {"first5": classes[:5], "last5": classes[5:]}
    teachers = {}
    for name, cls in halves.items():
        run = WORK / f"teacher-{name}"
        teachers[name] = {"classes": cls, "run": str(run), "summary": ensure_run(
            "train", run, args.teacher_epochs,
            ["-c", "cifar/resnet20_baseline", "--data", str(subset_root(name, cls))])}
    t_args = [a for t in teachers.values() for a in ("--teacher", t["run"])]
    joined = joined_teachers([t["run"] for t in teachers.values()])
    arms = {"labels only (baseline)": ensure_run(
        "train", CACHE / "distill" / "resnet56-resnet20" / "baseline", args.epochs,
        ["-c", "cifar/resnet20_baseline", "--data", CIFAR, "-o", "model.name=resnet20"])}
    kd_only = ["-o", "distill.losses=[kd:1.0]"]
    for name, slug, extra in (
            ("subset KL + labels (kd:0.9, ce:0.1)", "subset-labels", []),
            ("subset KL, no labels (kd)", "subset-nolabels", kd_only),
            ("concat logits, no labels (kd)", "concat-nolabels", [*kd_only, "-o", "distill.merge=concat"])):
        arms[name] = ensure_run("distill", WORK / slug, args.epochs,
                                ["-c", KD, "--data", CIFAR, *t_args, *extra])
    result = {"date": today(), "machine": machine(), "epochs": args.epochs,
              "teacher_epochs": args.teacher_epochs, "teachers": teachers, "joined_teachers": joined,
              "arms": arms}
    save_result("merge_teachers", result)
    write_section(result)


def joined_teachers(runs: list[str]) -> dict:
    """Val metrics over all 10 classes of the two teachers with their logits joined
    (distill.merge=concat, argmax): what a label-free student is taught."""
    import torch

    from kdistill.data.datasets import eval_dataset
    from kdistill.data.loader import eval_loader
    from kdistill.data.sources import open_source
    from kdistill.engine.evaluate import evaluate
    from kdistill.methods.teachers import load_teachers

    dev = torch.device("cpu")
    source = open_source(CIFAR, "val")
    teacher = load_teachers(runs, source.classes, dev, merge="concat")
    loader = eval_loader(eval_dataset(source, teacher.preprocessing), 256, 2, False)
    return evaluate(teacher, torch.nn.Identity(), loader, len(source.classes), dev).summary()


def write_section(r: dict) -> None:
    lines = [f"Measured {r['date']} on {r['machine']} by `python bench/merge_teachers.py`.",
             "Two resnet20 teachers, each trained on 5 of the 10 CIFAR-10 classes "
             f"({r['teacher_epochs']} epochs, cifar/resnet20_baseline):", ""]
    for name, t in r["teachers"].items():
        b = t["summary"]["best"]
        lines.append(f"- {name} ({', '.join(t['classes'])}): val top-1 {b['top1']:.4f} on its own 5 classes")
    base = next(iter(r["arms"].values()))["best"]["top1"]
    lines += ["", f"One resnet20 student over all 10 classes, {r['epochs']} epochs, recipe "
              "cifar/kd_resnet56_resnet20 with both teachers:", "",
              "| student | val top-1 (10 classes) | val MPA | vs labels only |", "|---|---|---|---|"]
    j = r["joined_teachers"]
    lines.append(f"| (the two teachers, logits joined; no student) | {j['top1']:.4f} | {j['mpa']:.4f} | "
                 f"{j['top1'] - base:+.4f} |")
    for name, s in r["arms"].items():
        b = s["best"]
        lines.append(f"| {name} | {b['top1']:.4f} | {b['mpa']:.4f} | {b['top1'] - base:+.4f} |")
    update_section("merge-teachers", "## Merging teachers with different label sets (CIFAR-10)\n\n"
                   + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
