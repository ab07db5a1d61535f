"""Issue 16 benchmark: does SSLD lift a student with few labels? CIFAR-10, the paper's setting.

    .venv/bin/python bench/ssld.py                      # every stage in order; rerun to continue
    .venv/bin/python bench/ssld.py --list               # the stages and how far each got
    .venv/bin/python bench/ssld.py --only teacher       # one stage (comma-separated fnmatch patterns)
    .venv/bin/python bench/ssld.py --only 'kd-s*,ssld-k1500-s0'
    .venv/bin/python bench/ssld.py --report             # tables from what has finished, no training
    # smoke run: tiny data and budgets in a throw-away cache
    .venv/bin/python bench/ssld.py --cache /tmp/ssld-smoke --per-half 40 --per-class 12 --plants 3 \\
        --batch-size 32 --budget 640 --long-budget 1280 --teacher-epochs 1 --top-k 8 --sweep 4,8,16 --no-write \\
        --set data.max_val_images=200

CIFAR-10 train is split into two stratified halves, A and B (25,000 images each, seeded). The
teacher (resnet20) learns all of A with labels for 30 epochs; its last checkpoint is used
everywhere (never the best on val). The student (resnet8) has 500 labels per class, a subset
of A; B is the unlabeled pool: mining sees paths only, its labels (the class folders) are read
afterwards to report the precision of the teacher's selection. 50 val images per kind of copy
(exact, resized to 40 px, JPEG q70, 90% centre crop) are planted in the mining pool to measure
dedup; the unmined pool of SKL-UGI is B alone (no val copies to train on).

Every arm trains the same number of optimizer steps of the same batch (fine-tuning counts):
``--budget`` images / batch, split as epochs x steps per epoch by ``common.fit_steps``
(``-o train.max_steps_per_epoch`` caps an epoch where the data has more batches); the images
each run saw are counted from its metrics.jsonl. A long pair (labeled-only KD and SSLD with KL,
seed 0) trains ``--long-budget`` (900,000) images: does the gain grow with the schedule? Val
top-1 is the last epoch's, on CIFAR-10's 5,000 val images, which select nothing. Precision:
``train.amp=auto`` (native bf16 autocast on CPUs with AVX512-BF16/AMX, fp32 elsewhere); each
run's precision and CPU capability are read from its metrics.

Runs live in ``--cache`` (default $KDISTILL_BENCH_CACHE/ssld, else ~/.cache/kdistill-bench/ssld);
each resumes after a kill, finished ones are reused. Results go to bench/results/ssld.json and
BENCHMARKS.md (section ssld) after every stage; arms not run yet show as pending.
"""
from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, LONG_CACHE, ensure_run, fit_steps, kdistill, run_progress, run_record, run_stages  # noqa: E402
from ssld_report import KINDS, dedup_result, flag_montage, mining_record, write_outputs  # noqa: E402

KD_T4 = "distill.loss_params={kd: {temperature: 4.0}}"


@dataclass
class Data:
    a_list: str
    labeled: str
    pool_b: str
    pool_mine: str
    class_map: str
    plants: dict
    n_labeled: int
    n_b: int


def prepare_data(work: Path, per_half: int, per_class: int, plants: int) -> Data:
    """Lists for halves A/B, the labeled subset, the pools and the planted copies (idempotent)."""
    data = work / "data"
    done = data / "data.json"
    settings = {"per_half": per_half, "per_class": per_class, "plants": plants, "cifar": CIFAR}
    if done.is_file():
        saved = json.loads(done.read_text())
        if saved["settings"] != settings:
            raise SystemExit(f"{work} was prepared with {saved['settings']}, not {settings}; use another --cache")
        return Data(**saved["data"])
    from PIL import Image

    data.mkdir(parents=True, exist_ok=True)
    train = Path(CIFAR) / "train"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    rng = random.Random(0)
    a_rows, lab_rows, b_rows = [], [], []
    for ci, c in enumerate(classes):
        files = sorted(str(p) for p in (train / c).iterdir())
        rng.shuffle(files)
        half = min(per_half, len(files) // 2)
        a, b = files[:half], files[half:2 * half]
        a_rows += [f"{p} {ci}" for p in a]
        lab_rows += [f"{p} {ci}" for p in a[:per_class]]
        b_rows += b
    val = sorted(str(p) for p in (Path(CIFAR) / "val").rglob("*.*"))
    rng.shuffle(val)
    planted, planted_dir = {}, data / "planted"
    planted_dir.mkdir(exist_ok=True)
    for k, kind in enumerate(KINDS):
        for j, src in enumerate(val[k * plants:(k + 1) * plants]):
            im = Image.open(src).convert("RGB")
            dst = planted_dir / f"{kind}_{j:03d}.jpg"
            if kind == "exact":
                dst = dst.with_suffix(Path(src).suffix)
                dst.write_bytes(Path(src).read_bytes())
            elif kind == "resized40":
                im.resize((40, 40), Image.BICUBIC).save(dst, quality=95)
            elif kind == "jpeg70":
                im.save(dst, quality=70)
            else:
                w, h = im.size
                im.crop((int(w * 0.05), int(h * 0.05), int(w * 0.95), int(h * 0.95))).save(dst, quality=95)
            planted[str(dst)] = {"kind": kind, "source": src}
    mine_rows = b_rows + list(planted)
    rng.shuffle(b_rows)
    rng.shuffle(mine_rows)
    out = Data(str(data / "A.txt"), str(data / "labeled.txt"), str(data / "pool_B.txt"),
               str(data / "pool_B_planted.txt"), str(data / "classes.txt"), planted, len(lab_rows), len(b_rows))
    for path, rows in ((out.a_list, a_rows), (out.labeled, lab_rows), (out.pool_b, b_rows),
                       (out.pool_mine, mine_rows)):
        Path(path).write_text("\n".join(rows) + "\n")
    Path(out.class_map).write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes)))
    done.write_text(json.dumps({"settings": settings, "data": out.__dict__}))
    return out


class Bench:
    """The stages of the benchmark: what each runs, in which folder, and its record."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.a = args
        self.work = Path(args.cache).resolve()
        self.d = prepare_data(self.work, args.per_half, args.per_class, args.plants)
        self.steps = max(round(args.budget / args.batch_size), 1)
        self.long_steps = max(round(args.long_budget / args.batch_size), 1) if args.long_budget else 0
        self.val = f"{CIFAR}/val"
        self.common = ["-o", f"data.val={self.val}",
                       "-o", f"data.class_map={self.d.class_map}", "--batch-size", str(args.batch_size),
                       "--no-progress", *(x for kv in args.set for x in ("-o", kv))]
        self.student = ["--data", self.d.labeled, *self.common, "--model", "resnet8"]

    # ------------------------------------------------------------------ stages, in order

    def stages(self) -> list[str]:
        a, k = self.a, self.a.top_k
        seeds = range(a.seeds)
        names = ["teacher", f"mine-k{k}"]
        names += [f"{arm}-s{s}" for s in seeds for arm in ("baseline", "kd", f"ssld-k{k}", f"ssld-kl-k{k}")]
        names += ["skl-ugi-s0"]
        for kk in a.sweep:  # with the loss the seeded arms support (KL at T = 4, kdistill ssld's default)
            if kk != k:
                names += [f"mine-k{kk}", f"ssld-kl-k{kk}-s0"]
        names += ["oracle-s0"]
        if a.long_budget:  # does the gain over labeled-only KD grow with the schedule?
            names += ["kd-long-s0", f"ssld-kl-long-k{k}-s0"]
        return names

    def folder(self, name: str) -> Path:
        return self.work / name

    def teacher_ckpt(self) -> str:
        return str(self.folder("teacher") / "last.safetensors")

    def per_epoch(self, n_images: int) -> int:
        return max(n_images // self.a.batch_size, 1)  # the training loader drops the last partial batch

    def run(self, name: str) -> None:
        if name == "teacher":
            ensure_run("train", self.folder(name), self.a.teacher_epochs,
                       ["-c", "cifar/resnet20_baseline", *self.common, "--data", self.d.a_list,
                        "--model", "resnet20"])
            return
        self.run("teacher")
        kind, seed = name.rsplit("-s", 1) if "-s" in name else (name, "0")
        steps = self.long_steps if "-long" in kind else self.steps
        kind = kind.replace("-long", "")
        if kind.startswith("mine-k"):
            self.mine(int(kind[6:]))
        elif kind in ("baseline", "kd"):
            self.labeled_only(name, kind, int(seed), steps)
        elif kind == "oracle":
            self.oracle(name, int(seed))
        elif kind == "skl-ugi":
            self.skl_ugi(name, int(seed))
        elif kind.startswith("ssld-"):
            loss = "kl" if kind.startswith("ssld-kl-") else "js"
            self.ssld(name, int(kind.rsplit("-k", 1)[1]), loss, int(seed), steps)
        else:
            raise SystemExit(f"unknown stage {name}")

    def mine(self, k: int) -> Path:
        out = self.folder(f"mine-k{k}") / "mined.txt"
        if not Path(f"{out}.summary.json").is_file():
            kdistill("mine", "--teacher", self.teacher_ckpt(), "--pool", self.d.pool_mine, "--top-k", str(k),
                     "--dedup-against", self.val, "--out", str(out), "--no-progress",
                     log=out.parent.with_suffix(".log"))
        return out

    def plan(self, n_images: int, reserved: int = 0, total: int | None = None) -> tuple[int, int, list[str]]:
        """Epochs, steps per epoch and the cap flags for ``total`` (default: the budget's)
        steps less ``reserved`` over a training set of ``n_images``."""
        per = self.per_epoch(n_images)
        epochs, steps = fit_steps((total or self.steps) - reserved, per)
        cap = ["-o", f"train.max_steps_per_epoch={steps}"] if steps < per else []
        return epochs, steps, cap

    def labeled_only(self, name: str, kind: str, seed: int, total: int) -> None:
        epochs, _, cap = self.plan(self.d.n_labeled, total=total)
        every = ["-o", f"train.eval_every={max(epochs // 6, 1)}"]  # a curve; the last epoch is reported
        if kind == "baseline":
            args = ["-c", "cifar/resnet20_baseline"]
        else:  # Hinton KD: 0.9 KL(T=4) T^2 + 0.1 CE
            args = ["-c", "cifar/kd_resnet56_resnet20", "--teacher", self.teacher_ckpt(),
                    "-o", "distill.losses=[kd:0.9, ce:0.1]", "-o", KD_T4]
        ensure_run("train" if kind == "baseline" else "distill", self.folder(name), epochs,
                   [*args, *self.student, "--seed", str(seed), *cap, *every])

    def oracle(self, name: str, seed: int) -> None:
        """The baseline recipe with B's hidden labels revealed (all 50,000 of A + B), at the same
        budget: what labels alone give this student, beside what the teacher's soft labels give."""
        listed = self.work / "data" / "AB.txt"
        if not listed.is_file():
            classes = [line.split(" ", 1)[1] for line in Path(self.d.class_map).read_text().splitlines()]
            rows = [f"{p} {classes.index(Path(p).parent.name)}" for p in Path(self.d.pool_b).read_text().split()]
            listed.write_text(Path(self.d.a_list).read_text() + "\n".join(rows) + "\n")
        epochs, _, cap = self.plan(len(listed.read_text().splitlines()))
        ensure_run("train", self.folder(name), epochs,
                   ["-c", "cifar/resnet20_baseline", *self.common, "--data", str(listed), "--model", "resnet8",
                    "--seed", str(seed), *cap])

    def skl_ugi(self, name: str, seed: int) -> None:
        """PaddleClas SKL-UGI: symmetric KL on labeled + the whole pool B (no mining), ce on labels."""
        epochs, _, cap = self.plan(self.d.n_labeled + self.d.n_b)
        ensure_run("distill", self.folder(name), epochs,
                   ["-c", "cifar/kd_resnet56_resnet20", *self.student,
                    "--teacher", self.teacher_ckpt(), "--unlabeled", self.d.pool_b, "--seed", str(seed),
                    "-o", "distill.losses=[skl:1.0, ce:0.1]", "-o", "distill.loss_params={}", *cap,
                    "-o", f"train.eval_every={max(epochs // 6, 1)}"])

    def ssld_plan(self, k: int, total: int | None = None) -> tuple[int, int, list[str], int] | None:
        """Distill-stage epochs, steps per epoch, cap flags and fine-tune steps; None before mining."""
        mined = self.folder(f"mine-k{k}") / "mined.txt"
        if not Path(f"{mined}.summary.json").is_file():
            return None
        n_mined = json.loads(Path(f"{mined}.summary.json").read_text())["selected"]
        ft = self.a.finetune_epochs * self.per_epoch(self.d.n_labeled)
        for _ in range(3):  # the distill stage's cap also caps the fine-tune's epochs (one config)
            epochs, steps, cap = self.plan(self.d.n_labeled + n_mined, ft, total)
            ft_new = self.a.finetune_epochs * min(self.per_epoch(self.d.n_labeled), steps)
            if ft_new == ft:
                break
            ft = ft_new
        return epochs, steps, cap, ft

    def ssld(self, name: str, k: int, loss: str, seed: int, total: int) -> None:
        """``kdistill ssld`` as shipped (mine -> distill on labeled + mined -> fine-tune on labeled),
        its mine stage seeded from the shared mine-k run (the same teacher, pool and k)."""
        out = self.folder(name)
        if (out / "summary.json").is_file():
            return
        mined = self.mine(k)
        epochs, _, cap, _ = self.ssld_plan(k, total)
        own = out / "mine" / "mined.txt"
        if not Path(f"{own}.summary.json").is_file():  # absolute paths: rows are relative to the list
            own.parent.mkdir(parents=True, exist_ok=True)
            rows = []
            for line in mined.read_text().splitlines():
                path, rest = line.split(" ", 1)
                rows.append(f"{(mined.parent / path).resolve()} {rest}\n")
            own.write_text("".join(rows))
            for suffix in (".dedup.csv", ".hist.png"):
                if Path(f"{mined}{suffix}").is_file():
                    shutil.copyfile(f"{mined}{suffix}", f"{own}{suffix}")
            shutil.copyfile(f"{mined}.summary.json", f"{own}.summary.json")
        terms = ["--loss", "js:1.0"] if loss == "js" else ["--loss", "kd:1.0", "-o", KD_T4]
        # eval only at the end of each stage: best.safetensors is then the last epoch, so the
        # fine-tune starts from the distill stage's last weights, not from a val-selected epoch
        kdistill("ssld", "-c", "cifar/resnet20_baseline", *self.student,
                 "--teacher", self.teacher_ckpt(), "--pool", self.d.pool_mine, "--top-k", str(k),
                 "--dedup-against", self.val, "--epochs", str(epochs), "--seed", str(seed),
                 "--finetune-epochs", str(self.a.finetune_epochs), *terms, *cap,
                 "-o", f"train.eval_every={epochs}", "--out", str(out), log=out.with_suffix(".log"))

    # ------------------------------------------------------------------ records

    def progress(self, name: str) -> str:
        out = self.folder(name)
        if name.startswith("mine-"):
            return "done" if Path(f"{out}/mined.txt.summary.json").is_file() else "pending"
        if name.startswith("ssld-") and not (out / "summary.json").is_file():
            stages = [f"{s}: {run_progress(out / s)}" for s in ("distill", "finetune") if (out / s).exists()]
            return "; ".join(stages) or "pending"
        return run_progress(out)

    def record(self, name: str) -> dict | None:
        out = self.folder(name)
        if name.startswith("mine-"):
            mined = out / "mined.txt"
            return mining_record(mined, self.d.plants) if Path(f"{mined}.summary.json").is_file() else None
        if not name.startswith("ssld-"):
            return run_record(out)
        if not (out / "summary.json").is_file():
            return None
        dist, ft = run_record(out / "distill"), run_record(out / "finetune")
        return {**ft, "images": dist["images"] + ft["images"], "train_seconds": dist["train_seconds"] +
                ft["train_seconds"], "precision": sorted(set(dist["precision"]) | set(ft["precision"])),
                "distill_stage": dist, "finetune_stage": ft}

    def schedules(self) -> dict:
        """Planned epochs x steps per arm family (for the table), as far as known."""
        b, out = self.a.batch_size, {}
        e, s, _ = self.plan(self.d.n_labeled)
        out["labeled"] = f"{e} x {s} x {b}"
        if self.long_steps:
            e, s, _ = self.plan(self.d.n_labeled, total=self.long_steps)
            out["labeled-long"] = f"{e} x {s} x {b}"
        e, s, _ = self.plan(self.d.n_labeled + self.d.n_b)
        out["skl-ugi"] = f"{e} x {s} x {b}"
        e, s, _ = self.plan(len(Path(self.d.a_list).read_text().splitlines()) + self.d.n_b)
        out["oracle"] = f"{e} x {s} x {b}"
        for k in sorted({self.a.top_k, *self.a.sweep}):
            p = self.ssld_plan(k)
            if p:
                out[f"k{k}"] = f"{p[0]} x {p[1]} x {b} + fine-tune {p[3]} x {b}"
        p = self.ssld_plan(self.a.top_k, self.long_steps) if self.long_steps else None
        if p:
            out[f"k{self.a.top_k}-long"] = f"{p[0]} x {p[1]} x {b} + fine-tune {p[3]} x {b}"
        return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache", default=str(LONG_CACHE / "ssld"), help="run folder root (default %(default)s)")
    ap.add_argument("--only", help="comma-separated stage names or fnmatch patterns (see --list)")
    ap.add_argument("--list", action="store_true", help="print the stages and their state")
    ap.add_argument("--report", action="store_true", help="write the tables from finished runs; train nothing")
    ap.add_argument("--no-write", action="store_true", help="leave BENCHMARKS.md and bench/results alone")
    ap.add_argument("--budget", type=int, default=300_000, help="student images per arm, fine-tuning included")
    ap.add_argument("--long-budget", type=int, default=900_000,
                    help="budget of the long pair (labeled-only KD and SSLD-KL, seed 0); 0: no long pair")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--per-half", type=int, default=2500, help="images per class in each half A, B")
    ap.add_argument("--per-class", type=int, default=500, help="labels per class (a subset of A)")
    ap.add_argument("--plants", type=int, default=50, help="planted val copies per kind")
    ap.add_argument("--top-k", type=int, default=1500, help="k of the main SSLD arm (3 seeds, KL arm)")
    ap.add_argument("--sweep", default="500,1500,2500", help="k of the top-k sweep (seed 0)")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--finetune-epochs", type=int, default=2, help="SSLD's labeled fine-tune (ssld default 2)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra -o for every student and teacher run (e.g. smoke: data.max_val_images=200)")
    args = ap.parse_args(argv)
    args.sweep = [int(x) for x in args.sweep.split(",") if x]
    return args


def main() -> None:
    args = parse_args()
    run_stages(Bench(args), args, publish, "bench/ssld.py")


def publish(bench: Bench, names: list[str], no_write: bool) -> None:
    """Records of every stage (None: pending), the dedup measurement and the tables."""
    records = {n: bench.record(n) for n in names}
    teacher = records.get("teacher")
    main_mine = bench.folder(f"mine-k{bench.a.top_k}") / "mined.txt"
    dedup = None
    report = Path(f"{main_mine}.dedup.csv")
    if report.is_file():
        dedup = dedup_result(report, bench.d.plants, bench.a.plants)
        if not no_write:
            flag_montage(report, bench.d.plants)
    tsum = bench.folder("teacher") / "summary.json"
    write_outputs({
        "settings": {k: v for k, v in vars(bench.a).items() if k not in ("only", "list", "report", "no_write")},
        "steps": bench.steps, "long_steps": bench.long_steps, "n_labeled": bench.d.n_labeled, "n_pool": bench.d.n_b,
        "schedules": bench.schedules(), "cache": str(bench.work), "teacher": teacher,
        "teacher_best": json.loads(tsum.read_text()).get("best") if tsum.is_file() else None,
        "runs": records, "dedup": dedup}, no_write)


if __name__ == "__main__":
    main()
