"""Issue 17 benchmark: is a patient, consistent teacher better? Long function matching on 2,500 images.

    .venv/bin/python bench/patience.py                  # every stage in order; rerun to continue
    .venv/bin/python bench/patience.py --list           # the stages and how far each got
    .venv/bin/python bench/patience.py --only 'funmatch-*'   # comma-separated fnmatch patterns
    .venv/bin/python bench/patience.py --report         # table, plot and targets from what has finished
    # smoke run: tiny data and schedules in a throw-away cache (its own tiny SSLD teacher)
    .venv/bin/python bench/patience.py --cache /tmp/patience-smoke --ssld-cache /tmp/patience-smoke/ssld \\
        --ssld-args='--per-half 40 --per-class 12 --plants 3 --teacher-epochs 1 --batch-size 32
                     --set data.max_val_images=200' \\
        --per-class 4 --epochs 1,2 --eval-every 1 --batch-size 16 --set data.max_val_images=200 --no-write

Beyer et al. 2022 ("Knowledge distillation: a good teacher is patient and consistent") claim that
a student whose teacher sees the very same crop and mixup keeps improving over long schedules,
while one matched to fixed teacher outputs does not. Setting: a stratified subset of CIFAR-10
train, ``--per-class`` (250) images per class, the first rows per class of half A of bench/ssld.py
(A is a seeded shuffle, so these are a seeded random draw, and also the first half of the SSLD
student's labeled subset; A is reused, or made by ssld.prepare_data). Teacher: the SSLD
benchmark's resnet20 (all of A with labels), its ``last.safetensors`` (never the best on val);
when it has not finished, ``bench/ssld.py --only teacher --no-write`` trains it (``--ssld-args``
go to that command). Val: CIFAR-10 val (5,000).

Student resnet8, recipe cifar/funmatch_resnet56_resnet20 in every arm (AdamW lr 0.003, weight
decay 0.05, cosine without warm-up, grad-norm clip 1.0, batch 128, Inception crop of scale
[0.35, 1] + flip, ``train.amp=auto``: native bf16 autocast where the CPU has it, else fp32; each
run's precision is read from its metrics), KL at T = 1 only (no labels), seed 0 (and more seeds
of the arms the targets compare, below). Only the view mode (``--view``, kdistill/data/views.py) differs:

* ``fixed``: the teacher's logits on each training image's centre crop (the whole 32 px image),
  computed once before epoch 1 (engine/distill.teacher_table); the student keeps the normal
  augmentation. No teacher forward while training, so its images/s is not comparable.
* ``consistent``: the teacher runs online on the student's own augmented crop; no mixup.
* ``funmatch``: the same crop plus mixup (lambda ~ U[0, 1], a random partner), online.

Each mode trains for 100 and, separately, 300 epochs (each its own cosine schedule), val top-1
every ``--eval-every`` (10) epochs; the reported number is the last epoch's (nothing is chosen on
val). Stages, most informative first: the three 100-epoch runs, then funmatch, fixed and
consistent at 300 (seed 0), then seeds 1 to ``--seeds`` - 1 of the three arms the targets
compare (funmatch at 100 and 300, fixed at 300), so each target's difference has a spread.
Compute for seed 0: 3 modes x (100 + 300) epochs x 2,432 images (the loader drops the last
partial batch) = 2.9M student training images, 1.9M online teacher forwards (consistent,
funmatch), and 120 val passes of 5,000 images (student, and teacher for agreement). Measured on
an idle 2-core AVX512 CPU with native bf16: ~850 img/s online, ~1,350 fixed; 100 epochs in
~5 min, 300 in ~14; each further seed of the three arms ~30 min.

Runs live in ``--cache`` (default $KDISTILL_BENCH_CACHE/patience, else ~/.cache/kdistill-bench/
patience); each resumes after a kill, finished ones are reused. Results go to
bench/results/patience.json, bench/results/patience.png and BENCHMARKS.md (section patience)
after every stage; runs not finished show as pending.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import shlex
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CIFAR, LONG_CACHE, RESULTS, ROOT, ensure_run, kdistill, machine, run_progress,  # noqa: E402
                    run_record, run_stages, save_result, today, update_section)

RECIPE = "cifar/funmatch_resnet56_resnet20"
MODES = ("funmatch", "fixed", "consistent")  # the order runs start in, at each schedule length
COLOURS = {"fixed": "tab:blue", "consistent": "tab:orange", "funmatch": "tab:green"}
TARGET_PATIENCE, TARGET_CONSISTENCY = 0.01, 0.02


def parse(name: str) -> tuple[str, int, int]:
    """``funmatch-e300`` (seed 0) or ``funmatch-e300-s1`` -> (mode, epochs, seed)."""
    m = re.fullmatch(r"([a-z]+)-e(\d+)(?:-s(\d+))?", name)
    if not m:
        raise SystemExit(f"unknown stage {name}")
    return m[1], int(m[2]), int(m[3] or 0)


class Bench:
    """The stages: the SSLD teacher, then one distill run per (mode, epochs)."""

    def __init__(self, args: argparse.Namespace) -> None:
        import ssld

        self.a = args
        self.work = Path(args.cache).resolve()
        self.ssld_argv = ["--cache", str(Path(args.ssld_cache).resolve()), *shlex.split(args.ssld_args)]
        sa = ssld.parse_args(self.ssld_argv)
        self.ssld_settings = {"cache": sa.cache, "per_half": sa.per_half, "teacher_epochs": sa.teacher_epochs}
        self.ssld_data = ssld.prepare_data(Path(sa.cache), sa.per_half, sa.per_class, sa.plants)
        self.teacher_dir = Path(sa.cache) / "teacher"
        self.train_list, self.n_train = self.subset()
        self.short, self.long = min(args.epochs), max(args.epochs)

    def subset(self) -> tuple[str, int]:
        """The first ``per_class`` rows of each class of half A, as a list file (idempotent)."""
        per: dict[str, list[str]] = {}
        for line in Path(self.ssld_data.a_list).read_text().splitlines():
            if line.strip():
                per.setdefault(line.rsplit(maxsplit=1)[1], []).append(line)
        rows = [r for label in sorted(per, key=int) for r in per[label][:self.a.per_class]]
        out = self.work / "data" / "train.txt"
        text = "\n".join(rows) + "\n"
        if out.is_file() and out.read_text() != text:
            raise SystemExit(f"{out} holds another subset (other --per-class or SSLD data); use another --cache")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        return str(out), len(rows)

    def stages(self) -> list[str]:
        """Seed 0 of every arm, then more seeds of the three arms the targets compare."""
        names = ["teacher"] + [f"{m}-e{e}" for e in sorted(set(self.a.epochs)) for m in MODES]
        seeded = (("funmatch", self.short), ("funmatch", self.long), ("fixed", self.long))
        return names + [f"{m}-e{e}-s{s}" for s in range(1, self.a.seeds) for m, e in seeded]

    def folder(self, name: str) -> Path:
        return self.teacher_dir if name == "teacher" else self.work / name

    def teacher_ckpt(self) -> str:
        return str(self.teacher_dir / "last.safetensors")

    def ensure_teacher(self) -> None:
        if (self.teacher_dir / "summary.json").is_file():
            return
        if getattr(self, "teacher_error", None):  # tried once in this process: do not retry per stage
            raise SystemExit(self.teacher_error)
        cmd = [sys.executable, str(ROOT / "bench" / "ssld.py"), *self.ssld_argv, "--only", "teacher", "--no-write"]
        print("$", " ".join(cmd), flush=True)
        rc = subprocess.run(cmd, cwd=ROOT).returncode
        if rc:
            self.teacher_error = (f"the SSLD teacher is not finished and bench/ssld.py --only teacher failed ({rc}); "
                             "if another bench/ssld.py holds its cache, wait for its teacher stage")
            raise SystemExit(self.teacher_error)

    def run(self, name: str) -> None:
        self.ensure_teacher()
        if name == "teacher":
            return
        mode, epochs, seed = parse(name)
        ensure_run("distill", self.folder(name), epochs, [
            "-c", RECIPE, "--data", self.train_list, "-o", f"data.val={CIFAR}/val",
            "-o", f"data.class_map={self.ssld_data.class_map}", "--model", "resnet8",
            "--teacher", self.teacher_ckpt(), "--view", mode, "--batch-size", str(self.a.batch_size),
            "-o", "distill.losses=[kd:1.0]", "-o", "distill.loss_params={kd: {temperature: 1.0}}",
            "-o", "train.amp=auto", "-o", f"train.eval_every={self.a.eval_every}", "--seed", str(seed),
            *(x for kv in self.a.set for x in ("-o", kv))])

    def progress(self, name: str) -> str:
        return run_progress(self.folder(name))

    def record(self, name: str) -> dict | None:
        """run_record plus the val curve so far (also of unfinished runs) and the recipe it ran."""
        out = self.folder(name)
        rec = run_record(out)
        if rec:
            rec["train_fit"] = self.train_fit(name)
        if name == "teacher":
            return rec
        rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()
                if ln.strip()] if (out / "metrics.jsonl").is_file() else []
        curve = [[r["epoch"], r["val.top1"]] for r in rows if "val.top1" in r]
        return {"finished": rec, "progress": self.progress(name), "curve": curve, "recipe": recipe(out)}


    def train_fit(self, name: str) -> dict:
        """A finished run's last checkpoint on its own training images (the subset, centre
        crop, no augmentation): top-1, and agreement and KL with the teacher (not for the
        teacher). Beside the same on val it says how far a student fits the teacher on what it
        trained on and how far that carries over. ``kdistill eval``, cached under train-fit/."""
        root, report = self.work / "data" / "train-eval", self.work / "train-fit" / name
        if not (report / "metrics.json").is_file():
            root.mkdir(parents=True, exist_ok=True)  # an eval root whose 'val' split is the subset
            (root / "val_list.txt").write_text(Path(self.train_list).read_text())
            (root / "classes.txt").write_text(Path(self.ssld_data.class_map).read_text())
            teacher = [] if name == "teacher" else ["--teacher", self.teacher_ckpt()]
            kdistill("eval", str(self.folder(name) / "last.safetensors"), "--data", str(root), *teacher,
                     "--report", str(report), log=report.with_suffix(".log"))
        m = json.loads((report / "metrics.json").read_text())
        return {k: m.get(k) for k in ("top1", "agreement", "kl_to_teacher")}


def recipe(out: Path) -> dict | None:
    """What the run's config.yaml says it trained with (None before it started)."""
    import yaml

    if not (out / "config.yaml").is_file():
        return None
    c = yaml.safe_load((out / "config.yaml").read_text())
    o, d, t, dist = c["optim"], c["data"], c["train"], c["distill"]
    return {"optim": o["name"], "lr": o["lr"], "weight_decay": o["weight_decay"], "sched": o["sched"],
            "warmup_epochs": o["warmup_epochs"], "clip_grad": o["clip_grad"], "batch_size": t["batch_size"],
            "amp": t["amp"], "crop": d["crop"], "scale": d["scale"], "hflip": d["hflip"], "view": dist["view"],
            "losses": dist["losses"], "loss_params": dist["loss_params"], "teachers": dist["teachers"],
            "model": c["model"]["name"], "seed": t["seed"]}


# ------------------------------------------------------------------ outputs


def plot(r: dict, png: Path) -> None:
    """Val top-1 against epoch, one colour per mode; short schedules dashed, long solid."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, run in r["runs"].items():
        if not run["curve"]:
            continue
        mode, epochs, seed = parse(name)
        xs, ys = zip(*run["curve"])
        state = "" if run["finished"] else f" ({run['progress']})"
        ax.plot(xs, [100 * y for y in ys], color=COLOURS[mode], marker="." if seed == 0 else None,
                alpha=1.0 if seed == 0 else 0.35, linestyle="--" if epochs == r["short"] else "-",
                label=f"{mode}, {epochs} epochs{state}" if seed == 0 else None)
    if r["teacher"]:
        ax.axhline(100 * r["teacher"]["top1"], color="black", linewidth=0.8, linestyle=":",
                   label="teacher resnet20 (last epoch)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("val top-1 (%), CIFAR-10 val")
    ax.set_title(f"resnet8 distilled on {r['n_train']:,} CIFAR-10 images, KL only\n"
                 "(seed 0 marked; faint lines: other seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=110)
    plt.close(fig)


def top1s(r: dict, mode: str, epochs: int) -> list[float]:
    """The finished runs' last-epoch val top-1 of one arm, seed 0 first."""
    runs = sorted((parse(n)[2], run["finished"]["top1"]) for n, run in r["runs"].items()
                  if run["finished"] and parse(n)[:2] == (mode, epochs))
    return [t for _, t in runs]


def top1(r: dict, mode: str, epochs: int) -> float | None:
    """Mean over the finished seeds (None: none finished)."""
    t = top1s(r, mode, epochs)
    return sum(t) / len(t) if t else None


def fmt(t: list[float]) -> str:
    if len(t) < 2:
        return f"{t[0]:.4f}"
    return f"{sum(t) / len(t):.4f} ± {statistics.stdev(t):.4f} ({len(t)} seeds)"


def pts(x: float) -> str:
    return f"{100 * x:+.2f} points"


def targets(r: dict) -> list[dict]:
    s, lg = r["short"], r["long"]
    out = []
    for what, (a, b), need in (("patience", (("funmatch", lg), ("funmatch", s)), TARGET_PATIENCE),
                               ("consistency", (("funmatch", lg), ("fixed", lg)), TARGET_CONSISTENCY)):
        ta, tb = top1s(r, *a), top1s(r, *b)
        diff = None if not ta or not tb else sum(ta) / len(ta) - sum(tb) / len(tb)
        spread = statistics.stdev(ta) + statistics.stdev(tb) if len(ta) > 1 and len(tb) > 1 else None
        out.append({"target": what, "a": f"{a[0]} {a[1]} epochs", "b": f"{b[0]} {b[1]} epochs", "need": need,
                    "a_top1": ta, "b_top1": tb, "diff": diff, "spread": spread,
                    "verdict": "pending" if diff is None else "PASS" if diff >= need - 1e-12 else "MISS"})
    return out


def table(r: dict) -> list[str]:
    lines = ["| view mode | epochs | seed | val top-1, last epoch | val MPA | agreement with teacher (val) | "
             "top-1 on its training images | agreement with teacher on them | precision | train img/s | train min | "
             "state |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, run in sorted(r["runs"].items(), key=lambda nr: parse(nr[0])[1:] + (MODES.index(parse(nr[0])[0]),)):
        mode, epochs, seed = parse(name)
        f = run["finished"]
        if not f:
            lines.append(f"| {mode} | {epochs} | {seed} | pending | | | | | | | | {run['progress']} |")
            continue
        agree = f"{f['agreement']:.4f}" if f.get("agreement") is not None else "-"
        fit = f.get("train_fit") or {}
        own = " | ".join(f"{fit[k]:.4f}" if fit.get(k) is not None else "-" for k in ("top1", "agreement"))
        lines.append(f"| {mode} | {epochs} | {seed} | {f['top1']:.4f} | {f['mpa']:.4f} | {agree} | {own} | "
                     f"{', '.join(f['precision'])} | "
                     f"{f['images_per_s']:.0f} | {f['train_seconds'] / 60:.1f} | done {f['finished']} |")
    return lines


def findings(r: dict) -> list[str]:
    """Only what finished runs measured."""
    s, lg = r["short"], r["long"]
    done = {n: run["finished"] for n, run in r["runs"].items() if run["finished"]}
    lines = []
    for what, t in ((f"Patience: funmatch at {lg} − funmatch at {s} epochs", r["targets"][0]),
                    (f"Consistency: funmatch at {lg} − fixed at {lg} epochs", r["targets"][1])):
        got = "pending" if t["diff"] is None else f"{pts(t['diff'])}: **{t['verdict']}**"
        detail = "" if t["diff"] is None else f"; {fmt(t['a_top1'])} vs {fmt(t['b_top1'])}"
        if t["spread"] is not None:
            beyond = "larger" if abs(t["diff"]) > t["spread"] else "not larger"
            detail += (f"; the two standard deviations add up to {100 * t['spread']:.2f} points, so the "
                       f"difference is {beyond} than the seed spread")
        lines.append(f"- {what} = {got} (target ≥ {pts(t['need'])}{detail}).")
    for e in (s, lg):
        fm = top1(r, "funmatch", e)
        for other in ("consistent", "fixed"):
            o = top1(r, other, e)
            if fm is not None and o is not None and not (other == "fixed" and e == lg):
                lines.append(f"- At {e} epochs: funmatch − {other} = {pts(fm - o)}.")
    for m in MODES:
        a, b = top1(r, m, s), top1(r, m, lg)
        if m != "funmatch" and a is not None and b is not None:
            lines.append(f"- {m}: {lg} − {s} epochs = {pts(b - a)}.")
    for e in (s, lg):
        gaps = []
        for m in MODES:
            f = (r["runs"].get(f"{m}-e{e}") or {}).get("finished") or {}
            fit = f.get("train_fit") or {}
            if fit.get("agreement") is not None and f.get("agreement") is not None:
                gaps.append(f"{m} {fit['agreement']:.3f} vs {f['agreement']:.3f} ({pts(fit['agreement'] - f['agreement'])})")
        if gaps:
            lines.append(f"- Agreement with the teacher on the student's own training images (centre crop) vs on val, "
                         f"{e} epochs, seed 0: " + "; ".join(gaps) + ".")
    for name, run in r["runs"].items():
        if run["finished"] and len(run["curve"]) > 1 and parse(name)[2] == 0:
            e, y = max(run["curve"], key=lambda ey: (ey[1], -ey[0]))
            last = run["curve"][-1]
            lines.append(f"- {name} curve: highest logged val top-1 {y:.4f} at epoch {e}, last {last[1]:.4f} at "
                         f"epoch {last[0]} ({pts(last[1] - y)} from its highest; a description of the curve, "
                         "not a selected result).")
    pending = [n for n, run in r["runs"].items() if not run["finished"]]
    if pending:
        lines.append(f"- Not finished yet: {', '.join(pending)}; the targets that need them are pending.")
    if done:
        multi = sorted({parse(n)[:2] for n, run in r["runs"].items() if run["finished"] and parse(n)[2] > 0})
        lines.append("- Means are over the finished seeds; " + (
            "arms with more than one seed: " + ", ".join(f"{m} {e}" for m, e in multi) + "; the others are one run "
            "(seed 0), and their differences come with no error bar of their own."
            if multi else "every arm is one run (seed 0) so far, so no difference comes with an error bar."))
    return lines


def write_outputs(r: dict, no_write: bool, png: Path) -> None:
    r = {"date": today(), "machine": machine(), **r}
    r["targets"] = targets(r)
    plot(r, png)
    done = [run["finished"] for run in r["runs"].values() if run["finished"]]
    dates = sorted(f["finished"] for f in done)
    when = f"runs finished {dates[0]} to {dates[-1]}" if dates else "no run finished yet"
    rc = next((run["recipe"] for run in r["runs"].values() if run["recipe"]), None)
    t = r["teacher"]
    teacher = (f"val top-1 {t['top1']:.4f} at its last epoch ({t['epochs']}), the checkpoint used, and "
               f"{t['train_fit']['top1']:.4f} on the {r['n_train']:,} training images; precision "
               f"{', '.join(t['precision'])}" if t else "pending")
    recipe_text = (f"{rc['optim']} lr {rc['lr']}, weight decay {rc['weight_decay']}, {rc['sched']} with "
                   f"{rc['warmup_epochs']} warm-up epochs, grad-norm clip {rc['clip_grad']}, batch {rc['batch_size']}, "
                   f"crop {rc['crop']} scale {rc['scale']} + flip {rc['hflip']}, losses {rc['losses']} "
                   f"{rc['loss_params']}, train.amp={rc['amp']}" if rc
                   else f"as in kdistill/configs/{RECIPE}.yaml, with KL at T = 1 and train.amp=auto; no run started")
    lines = [f"Written {r['date']} ({when}, {len(done)} of {len(r['runs'])} runs done) on {r['machine']} by "
             f"`python bench/patience.py`; runs cached in `{r['cache']}` (rerun the script to continue).", "",
             f"Setting (issue 17, after Beyer et al. 2022): {r['n_train']:,} CIFAR-10 training images "
             f"({r['per_class']} per class, drawn from half A of the SSLD benchmark); val: CIFAR-10 val. Teacher: "
             f"the SSLD benchmark's resnet20 trained on all of half A with labels ({teacher}). Student resnet8, "
             f"the same recipe in every arm ({RECIPE}: {recipe_text}); KL only, no labels. Only the view mode "
             "differs: `fixed` = the teacher's logits on each image's centre crop (the whole image), computed once, "
             "while the student's crops are augmented as usual; `consistent` = the teacher runs on the student's own "
             "crop; `funmatch` = the same crop plus mixup (λ ~ U[0, 1], a random partner). Each mode runs a "
             f"{r['short']}-epoch and, separately, a {r['long']}-epoch cosine schedule; val top-1 every "
             f"{r['eval_every']} epochs; the number reported is the last epoch's (nothing is chosen on val). "
             "`fixed` runs no teacher forward while training, so its images/s is not comparable to the others'; "
             "train min counts training epochs only (not val passes).", ""]
    lines += table(r) + ["", f"Val top-1 by epoch ({r['short']} epochs dashed, {r['long']} solid): "
                             "![patience curves](bench/results/patience.png)", "",
                         "Targets and what the finished runs measured:", ""] + findings(r)
    text = (f"## Patient and consistent teaching: long function matching on {r['n_train']:,} images (CIFAR-10)\n\n"
            + "\n".join(lines))
    print(text, flush=True)
    print(f"plot: {png}", flush=True)
    if not no_write:
        save_result("patience", r)
        update_section("patience", text)


def publish(bench: Bench, names: list[str], no_write: bool) -> None:
    a = bench.a
    png = RESULTS / "patience.png" if not no_write else bench.work / "patience.png"
    write_outputs({
        "settings": {k: v for k, v in vars(a).items() if k not in ("only", "list", "report", "no_write")},
        "ssld": bench.ssld_settings, "cache": str(bench.work), "train_list": bench.train_list,
        "n_train": bench.n_train, "per_class": a.per_class, "short": bench.short, "long": bench.long,
        "eval_every": a.eval_every, "teacher_ckpt": bench.teacher_ckpt(), "teacher": bench.record("teacher"),
        "runs": {n: bench.record(n) for n in names if n != "teacher"}}, no_write, png)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(LONG_CACHE / "patience"), help="run folder root (default %(default)s)")
    ap.add_argument("--ssld-cache", default=str(LONG_CACHE / "ssld"), help="bench/ssld.py's cache: half A, teacher")
    ap.add_argument("--ssld-args", default="", help="extra flags for bench/ssld.py (data split, teacher), "
                    "e.g. smoke sizes; must match how that cache was made")
    ap.add_argument("--only", help="comma-separated stage names or fnmatch patterns (see --list)")
    ap.add_argument("--list", action="store_true", help="print the stages and their state")
    ap.add_argument("--report", action="store_true",
                    help="write table, plot and targets from finished runs; train nothing")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and bench/results alone "
                    "(the plot goes to CACHE/patience.png)")
    ap.add_argument("--per-class", type=int, default=250, help="training images per class, from half A")
    ap.add_argument("--epochs", default="100,300", help="the two schedule lengths")
    ap.add_argument("--eval-every", type=int, default=10)
    ap.add_argument("--seeds", type=int, default=3,
                    help="seeds of the three arms the targets compare (funmatch short and long, fixed long)")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra -o for every student run (e.g. smoke: data.max_val_images=200)")
    args = ap.parse_args(argv)
    args.epochs = sorted({int(x) for x in args.epochs.split(",") if x})
    if len(args.epochs) != 2:
        ap.error("--epochs takes two schedule lengths, e.g. 100,300")
    return args


def main() -> None:
    args = parse_args()
    run_stages(Bench(args), args, publish, "bench/patience.py")


if __name__ == "__main__":
    main()
