"""Issue 5 benchmark: view modes, the soft-label cache, and patience (CIFAR-10, resnet56 -> resnet20).

    .venv/bin/python bench/funmatch.py throughput      # a. student-only vs online KD vs cached KD
    .venv/bin/python bench/funmatch.py accuracy        # b. fixed/independent/consistent/funmatch/cached
    .venv/bin/python bench/funmatch.py topk            # bytes per image and cost of top-k truncation
    .venv/bin/python bench/funmatch.py patience        # c. long funmatch vs consistent KD by epoch

Uses the teacher of bench/train_baselines.py (bench/cache/cifar/resnet56). Runs and caches
live in bench/cache/funmatch and are resumed after a kill.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CIFAR, ensure_run, kdistill, load_result, machine, memoize_splits, save_result, today, update_section  # noqa: E402

WORK = CACHE / "funmatch"
TEACHER = CACHE / "cifar" / "resnet56"
KD = "cifar/kd_resnet56_resnet20"


def cache(views: int, k: int = 10, mix: bool = False) -> Path:
    out = WORK / f"cache-v{views}-k{k}{'-mix' if mix else ''}"
    m = out / "manifest.json"
    if not (m.is_file() and len(json.loads(m.read_text())["done_views"]) == views):
        kdistill("cache", "--teacher", str(TEACHER), "--data", CIFAR, "--views", str(views), "--top-k", str(k),
                 "--out", str(out), "--no-progress", *(["--view", "funmatch"] if mix else []),
                 log=out.with_suffix(".log"))
    return out


def throughput(steps: int) -> dict:
    """Images/s of student-only training, online KD and KD from the cache, interleaved."""
    from throughput import alternate, distill_trainer, kdistill_loop

    memoize_splits()
    sl = cache(1)
    none = ["-o", "distill.teachers=[]"]
    arms = {"student only": [*none, "--loss", "ce"],
            "online KD": ["--teacher", str(TEACHER)], "KD from cache": [*none, "--soft-labels", str(sl)]}

    def factory(extra):
        return lambda: distill_trainer(
            ["distill", "-c", KD, "--data", CIFAR, "--out", str(WORK / "tp"), "--resume", "--no-progress",
             "-o", f"train.max_steps_per_epoch={steps}", "-o", "distill.agreement=false", *extra])

    best = alternate({name: (lambda e=extra: kdistill_loop(factory(e))) for name, extra in arms.items()}, rounds=2)
    return {**best, "cached / online": best["KD from cache"] / best["online KD"],
            "cached / student only": best["KD from cache"] / best["student only"]}


def accuracy(epochs: int) -> dict:
    arms = {}
    for view in ("fixed", "independent", "consistent", "funmatch"):
        extra = ["-o", "distill.losses=[kd:1.0]", "-o", "distill.loss_params={kd: {temperature: 1.0}}"] \
            if view == "funmatch" else []
        arms[view] = ensure_run("distill", WORK / f"view-{view}", epochs,
                                ["-c", KD, "--data", CIFAR, "--teacher", str(TEACHER), "--view", view, *extra])
    sl = cache(epochs)
    arms["cached"] = ensure_run("distill", WORK / "view-cached", epochs,
                                ["-c", KD, "--data", CIFAR, "--soft-labels", str(sl), "-o", "distill.teachers=[]"])
    return arms


def topk(epochs: int) -> dict:
    out = {}
    for k in (1, 5, 10):
        sl = cache(1, k)
        m = json.loads((sl / "manifest.json").read_text())
        run = ensure_run("distill", WORK / f"topk-{k}", epochs,
                         ["-c", KD, "--data", CIFAR, "--soft-labels", str(sl), "-o", "distill.teachers=[]"])
        out[k] = {"bytes_per_image": m["bytes_per_image"], "best": run["best"]}
    return out


def patience(epochs: int, train_images: int | None) -> dict:
    """The funmatch recipe and consistent KD for ``epochs`` each, on the same (optionally
    stratified-subset) training images: long schedules at an affordable cost."""
    runs = {}
    subset = ["-o", f"data.max_train_images={train_images}"] if train_images else []
    for name, extra in (("funmatch", ["-c", "cifar/funmatch_resnet56_resnet20"]),
                        ("consistent KD", ["-c", KD])):
        runs[name] = ensure_run("distill", WORK / f"patience-{name.split()[0]}", epochs,
                                [*extra, "--data", CIFAR, "--teacher", str(TEACHER), *subset])
    curves = {}
    for name in runs:
        rows = [json.loads(x) for x in (WORK / f"patience-{name.split()[0]}" / "metrics.jsonl").read_text().splitlines()]
        curves[name] = [r.get("val.top1") for r in rows]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(range(1, len(ys) + 1), ys, label=name)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    png = Path(__file__).resolve().parent / "results" / "funmatch_patience.png"
    png.parent.mkdir(exist_ok=True)
    fig.savefig(png, dpi=100)
    return {"curves": curves, "png": str(png.relative_to(png.parents[2])), "train_images": train_images or 50000,
            "best": {name: r["best"] for name, r in runs.items()}}


def write_section(r: dict) -> None:
    lines = [f"Measured on {r.get('machine', machine())} by `python bench/funmatch.py PART`; teacher "
             "resnet56 (bench/cache/cifar/resnet56), student resnet20, recipe cifar/kd_resnet56_resnet20."]
    if "throughput" in r:
        t = r["throughput"]
        lines += ["", f"a. Throughput ({r['throughput_date']}, one process, best of 2 interleaved rounds):", "",
                  "| loop | img/s |", "|---|---|"]
        lines += [f"| {k} | {t[k]:.0f} |" for k in ("student only", "online KD", "KD from cache")]
        lines += ["", f"KD from cache / online KD = {t['cached / online']:.2f}; "
                      f"cache / student only = {t['cached / student only']:.2f}."]
    if "accuracy" in r:
        lines += ["", f"b. Accuracy at equal epochs ({r['accuracy_date']}):", "",
                  "| view mode | epochs | val top-1 | val MPA | train img/s |", "|---|---|---|---|---|"]
        for name, s in r["accuracy"].items():
            lines.append(f"| {name} | {s['epochs']} | {s['best']['top1']:.4f} | {s['best']['mpa']:.4f} "
                         f"| {s['train_images_per_s']:.0f} |")
    if "topk" in r:
        lines += ["", f"Top-k truncation ({r['topk_date']}, 1 cached view, students trained from the cache):", "",
                  "| k | bytes per image (per view) | val top-1 | val MPA |", "|---|---|---|---|"]
        for k, s in r["topk"].items():
            lines.append(f"| {k}{' (all classes)' if int(k) == 10 else ''} | {s['bytes_per_image']:.0f} | {s['best']['top1']:.4f} | {s['best']['mpa']:.4f} |")
    if "patience" in r:
        p = r["patience"]
        lines += ["", f"c. Patience ({r['patience_date']}; {p['train_images']} training images, "
                  f"cifar/funmatch_resnet56_resnet20 vs {KD}, same epochs): val top-1 by "
                  f"epoch, ![patience]({p['png']})", ""]
        for name, ys in p["curves"].items():
            lines.append(f"- {name}: " + ", ".join(f"{y:.3f}" for y in ys))
    update_section("funmatch", "## Function matching and the soft-label cache (CIFAR-10)\n\n" + "\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("part", choices=["throughput", "accuracy", "topk", "patience"])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--train-images", type=int, help="patience: a stratified subset of train/")
    args = ap.parse_args()
    try:
        r = load_result("funmatch")
    except FileNotFoundError:
        r = {}
    r["machine"] = machine()
    if args.part == "throughput":
        r["throughput"] = throughput(args.steps)
    elif args.part == "accuracy":
        r["accuracy"] = accuracy(args.epochs)
    elif args.part == "topk":
        r["topk"] = topk(args.epochs)
    else:
        r["patience"] = patience(args.epochs, args.train_images)
    r[f"{args.part}_date"] = today()
    save_result("funmatch", r)
    write_section(r)


if __name__ == "__main__":
    main()
