"""Issue 26 benchmark: data that does not fit in a folder (shards, streaming, mining a million images).

    .venv/bin/python bench/scale.py STAGE [--smoke] [--cache DIR]

Stages (each cached and resumable; rerun a stage to continue it, a finished one is reused):

* ``pool``: 1,000,000 distinct 32-px JPEGs (random resized crop, flip and colour jitter of the
  CIFAR-10 train images, re-encoded; deterministic from a seed) written straight into
  WebDataset shards of 10,000 (``unlabeled-*.tar`` + ``_info.json``), bench/scale_pool.py;
* ``teacher``: a resnet20 trained on CIFAR-10 (``kdistill train``, ``--teacher-epochs``);
* ``mine``: ``kdistill mine --pool wds:... --top-k 1500 --out wds:...`` on the first 100,000
  and on all 1,000,000 pool images; memory = the summed PSS (``/proc/PID/smaps_rollup``) of
  the main process and all its descendants, sampled every 0.5 s; peak, wall time, images/s;
* ``rates``: (a) the data path alone: the pool's JPEGs decoded and preprocessed as mining
  does (``kdistill.images.read_image``, the pHash, the teacher's eval transform), the same
  DataLoader workers and batch, no teacher; (b) the teacher alone on pre-decoded uint8
  batches (loaded and put on its runtime as ``mine`` does), the same cores; (c) mining end
  to end (from ``mine``);
* ``kill-resume``: the 1M mine killed with SIGKILL (the whole process group) once half the
  pool tars are scored (its per-tar results in ``OUT/mined.work``), rerun with the same
  command: its selection (keys and labels of the written shards, and ``OUT/mined.txt``)
  against the uninterrupted run's;
* ``train-speed``: ``kdistill pack`` of CIFAR-10 (timed), then interleaved rounds of 60-step
  resnet8 epochs (``-o train.max_steps_per_epoch=60``) from ``wds:SHARDS`` and from the folder
  with ``-o data.in_memory=no``; images/s per round from each run's metrics.jsonl;
* ``train-acc``: resnet8, 4 epochs, 3 seeds, from the shards and from the folder (in_memory=no);
* ``input224``: ~2,000 JPEGs of 256-500 px (CIFAR-10 upscaled + noise), decoded, random-
  resized-cropped to 224 and flipped: kdistill's training dataset + ``EpochLoader`` vs
  ``timm.data.create_loader`` on the same folder and workers, images/s per worker;
* ``decode``: the decoder alone, in this process on 1 thread, in interleaved rounds:
  ``kdistill.images`` as it is (JPEGs through torchvision's libjpeg-turbo) vs the same code
  with that path off (every image through PIL): one pool tar through ``ShardStream`` (img/s)
  and ``read_image`` of each input224 JPEG (us per image);
* ``report``: the BENCHMARKS.md section (section ``scale``) from bench/results/scale.json.

``all`` runs every stage in order. ``--smoke`` runs a tiny version of a stage (a few thousand
images, tiny budgets) in a throw-away cache (``--cache``, default a temp folder) and writes its
results there, never to bench/results or BENCHMARKS.md.

The cache is $KDISTILL_BENCH_CACHE/scale, else ~/.cache/kdistill-bench/scale.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CIFAR, LONG_CACHE, ROOT, ensure_run, machine, run_record, today, update_section  # noqa: E402
from scale_pool import build_pool, count_distinct  # noqa: E402

STAGES = ("pool", "teacher", "mine", "rates", "kill-resume", "train-speed", "train-acc", "input224", "decode",
          "report")
PY = sys.executable


@dataclass
class Plan:
    """The sizes of one benchmark run (full or ``--smoke``)."""

    work: Path
    results: Path  # scale.json
    publish: bool  # write BENCHMARKS.md (full runs only)
    pool_n: int = 1_000_000
    pool_shard: int = 10_000
    small_tars: int = 10  # the "100k" run: the first 10 tars
    big_tars: int | None = None  # the big run: the first N tars (None: the whole pool, wds:DIR)
    top_k: int = 1500
    procs: int = 2
    teacher_epochs: int = 3
    teacher_args: list = field(default_factory=list)
    workers: int = 2
    batch: int = 256
    rate_images: int = 50_000  # (a): images decoded; (b): images through the teacher
    speed_steps: int = 60
    speed_rounds: int = 3
    speed_batch: int = 128
    acc_epochs: int = 4
    acc_seeds: int = 3
    acc_args: list = field(default_factory=list)
    train_root: str = CIFAR  # what pack / train-speed / train-acc read
    pack_shard: int | None = None  # kdistill pack --shard-size (None: its default)
    in224_images: int = 2000
    in224_rounds: int = 3
    in224_batch: int = 64
    in224_workers: tuple = (1, 2)

    @property
    def pool(self) -> Path:
        return self.work / "pool"


def full_plan(cache: Path | None) -> Plan:
    from common import RESULTS

    return Plan(work=cache or LONG_CACHE / "scale", results=RESULTS / "scale.json", publish=True)


def smoke_plan(cache: Path | None) -> Plan:
    work = cache or Path(tempfile.mkdtemp(prefix="kdistill-scale-smoke-"))
    return Plan(work=work, results=work / "scale.json", publish=False, pool_n=3000, pool_shard=500,
                small_tars=2, top_k=20, teacher_epochs=1,
                teacher_args=["-o", "data.max_train_images=1000", "-o", "data.max_val_images=200",
                              "--batch-size", "64"],
                batch=64, rate_images=1000, speed_steps=5, speed_rounds=2, speed_batch=32,
                acc_epochs=1, acc_seeds=2, acc_args=["--batch-size", "32"],
                train_root=str(work / "cifar-tiny"), pack_shard=50, in224_images=48, in224_rounds=1, in224_batch=16,
                in224_workers=(1,))


# ------------------------------------------------------------------ results


def load(plan: Plan) -> dict:
    return json.loads(plan.results.read_text()) if plan.results.is_file() else {}


def store(plan: Plan, stage: str, record: dict) -> None:
    data = load(plan)
    data[stage] = {**record, "date": today(), "machine": machine(), "cpu_capability": cpu_capability()}
    plan.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = plan.results.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(plan.results)


def cpu_capability() -> str:
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:
        return platform.machine()


def run_cmd(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); its wall seconds; SystemExit on failure."""
    print("$", " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(log, "a") as fh:
        proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}; see {log}")
    return time.time() - start


def kd(*args: str) -> list[str]:
    return [PY, "-m", "kdistill", *args]


# ------------------------------------------------------------------ memory of a process tree


def descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (from /proc/PID/task/TID/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except OSError:
            continue
    return out


def pss_bytes(pid: int) -> int:
    """Proportional set size of one process (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_pss(pid: int) -> list[int]:
    """The PSS of ``pid`` and of each of its descendants (``pid`` first)."""
    return [pss_bytes(p) for p in descendants(pid)]


class Watched:
    """A command in its own process group, its tree's PSS sampled every ``interval`` s."""

    def __init__(self, cmd: list[str], log: Path, interval: float = 0.5) -> None:
        print("$", " ".join(cmd), flush=True)
        log.parent.mkdir(parents=True, exist_ok=True)
        self.fh = open(log, "a")  # noqa: SIM115 - closed in wait()
        self.start = time.time()
        self.proc = subprocess.Popen(cmd, stdout=self.fh, stderr=subprocess.STDOUT, cwd=ROOT,
                                     start_new_session=True)
        self.interval, self.peak, self.peak_procs, self.peak_each, self.samples = interval, 0, 0, [], []

    def poll(self) -> bool:
        """Sample once; True while the command runs."""
        if self.proc.poll() is not None:
            return False
        each = tree_pss(self.proc.pid)
        pss = sum(each)
        self.samples.append((round(time.time() - self.start, 2), pss, each))
        if pss > self.peak:
            self.peak, self.peak_procs, self.peak_each = pss, len(each), each
        return True

    def wait(self, stop_after: float | None = None, stop_when=None) -> int | None:
        """Sample until the command ends (its exit status), or SIGKILL its process group
        once ``stop_when()`` is true or after ``stop_after`` seconds (None returned)."""
        try:
            while self.poll():
                if (stop_when is not None and stop_when()) or \
                        (stop_after is not None and time.time() - self.start >= stop_after):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
                    return None
                time.sleep(self.interval)
            return self.proc.wait()
        finally:
            self.seconds = time.time() - self.start
            self.fh.close()

    def record(self) -> dict:
        every = max(1, len(self.samples) // 200)
        return {"peak_pss_mib": round(self.peak / 2**20, 1), "processes_at_peak": self.peak_procs,
                "pss_at_peak_mib": [round(b / 2**20, 1) for b in self.peak_each],  # the main process first
                "wall_seconds": round(self.seconds, 1), "pss_samples": len(self.samples),
                "pss_trace_mib": [(t, round(b / 2**20, 1)) for t, b, _ in self.samples[::every]],
                "pss_trace_each_mib": [(t, [round(x / 2**20, 1) for x in e]) for t, _, e in self.samples[::every]]}


# ------------------------------------------------------------------ stages


def stage_pool(plan: Plan) -> dict:
    build_pool(plan.pool, plan.work, plan.pool_n, plan.pool_shard, seed=0, procs=plan.procs,
               log=plan.work / "pool.log")
    s = count_distinct(plan.pool)
    rec = {"images": s["samples"], "shards": s["shards"], "mib": round(s["bytes"] / 2**20, 1),
           "procs": s["procs"], "images_per_s_per_process": s["images_per_s_per_process"],
           "process_seconds": s["process_seconds"], "path": str(plan.pool),
           "distinct_images": s["distinct_images"], "distinct_keys": s["distinct_keys"],
           "precision": "uint8 JPEG q90 (PIL encoder)",
           "command": f"python bench/scale.py pool  (bench/scale_pool.py --n {plan.pool_n} --procs {plan.procs}; workers at nice 19)"}
    store(plan, "pool", rec)
    return rec


def teacher_dir(plan: Plan) -> Path:
    return plan.work / f"teacher-resnet20-e{plan.teacher_epochs}"


def stage_teacher(plan: Plan) -> dict:
    out = teacher_dir(plan)
    args = ["train", "--data", CIFAR, "--model", "resnet20", *plan.teacher_args]
    s = ensure_run("train", out, plan.teacher_epochs, args[1:])
    rec = run_record(out) or {}
    rec = {"run": str(out), "epochs": plan.teacher_epochs, "top1": rec.get("top1"),
           "train_seconds": rec.get("train_seconds"), "precision": rec.get("precision"),
           "command": "kdistill " + " ".join(args) + f" --out {out} -o train.epochs={plan.teacher_epochs}",
           "summary_epochs": s.get("epochs")}
    store(plan, "teacher", rec)
    return rec


def pool_tars(plan: Plan) -> list[str]:
    return sorted(p.name for p in plan.pool.glob("unlabeled-*.tar"))


def label(n: int) -> str:
    return f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n // 1000}k" if n % 1000 == 0 else str(n)


def pool_specs(plan: Plan) -> dict[str, tuple[str, int]]:
    """The mined pools, ``label: (spec, images)``: the first ``small_tars`` tars (a brace
    pattern) and the whole pool (``wds:DIR``)."""
    if len(pool_tars(plan)) == 0 or not (plan.pool / "_info.json").is_file():
        raise SystemExit(f"the pool in {plan.pool} is not finished; run the pool stage first")
    n_small = plan.small_tars * plan.pool_shard
    small = f"wds:{plan.pool}/unlabeled-{{000000..{plan.small_tars - 1:06d}}}.tar"
    if plan.big_tars and plan.big_tars * plan.pool_shard < plan.pool_n:  # a machine too slow for the whole pool
        n_big = plan.big_tars * plan.pool_shard
        big = f"wds:{plan.pool}/unlabeled-{{000000..{plan.big_tars - 1:06d}}}.tar"
        return {label(n_small): (small, n_small), label(n_big): (big, n_big)}
    return {label(n_small): (small, n_small), label(plan.pool_n): (f"wds:{plan.pool}", plan.pool_n)}


def mine_args(plan: Plan, spec: str, out: Path) -> list[str]:
    return kd("mine", "--teacher", str(teacher_dir(plan)), "--pool", spec, "--top-k", str(plan.top_k),
              "--out", f"wds:{out}", "--batch-size", str(plan.batch), "--workers", str(plan.workers),
              "--keep-work", "--no-progress")


def need_teacher(plan: Plan) -> None:
    if not (teacher_dir(plan) / "summary.json").is_file():
        raise SystemExit(f"no finished teacher in {teacher_dir(plan)}; run the teacher stage first")


def selection(out: Path) -> list[tuple[str, str, int | None]]:
    """(split, __key__, label) of every sample in the shards ``mine`` wrote, in shard order."""
    from kdistill.data.shards import read_info, read_shard

    info = read_info(out)
    if info is None:
        raise SystemExit(f"{out} has no _info.json: the mine did not finish")
    rows = []
    for split, entry in sorted(info["splits"].items()):
        for name in entry["filenames"]:
            rows += [(split, s.key, s.label) for s in read_shard(str(out / name), 0, (), "cls", None)]
    return rows


def mine_done(out: Path) -> bool:
    return (out / "_info.json").is_file() and (out.parent / f"{out.name}.mine.json").is_file()


def run_mine(plan: Plan, name: str, spec: str, images: int, out: Path, stop_after: float | None = None,
             stop_when=None, fresh: bool = True) -> dict:
    """One measured mine into ``out`` (reused when finished: the record beside it). ``fresh``:
    a run without a record starts over (what an interrupted bench left would make its time
    and memory those of a resumed run); else the mine resumes from its work folder."""
    rec_path = out.parent / f"{out.name}.mine.json"
    if stop_after is None and stop_when is None and mine_done(out):
        return json.loads(rec_path.read_text())
    if fresh:
        shutil.rmtree(out, ignore_errors=True)
    cmd = mine_args(plan, spec, out)
    log = plan.work / "logs" / f"mine-{out.name}.log"
    start_line = sum(1 for _ in open(log)) if log.is_file() else 0
    w = Watched(cmd, log)
    rc = w.wait(stop_after, stop_when)
    lines = log.read_text().splitlines()[start_line:]
    rec = {"name": name, "pool": spec, "command": " ".join(["kdistill", *cmd[3:]]), **w.record(),
           "log_tail": lines[-6:], "runtime_lines": [ln for ln in lines if "runtime" in ln or "onnx" in ln][:5]}
    if rc is None:
        rec["killed_after_s"] = round(w.seconds, 1)
        return rec
    if rc:
        raise SystemExit(f"mine failed ({rc}); see {plan.work / 'logs' / f'mine-{out.name}.log'}")
    rec.update(images=images, images_per_s=round(images / w.seconds, 1), selected=len(selection(out)),
               scoring_images_per_s=scoring_rate(out, images),
               note="images_per_s: the whole command (start-up, teacher runtime check, merge, copying the "
                    "selection into shards); scoring_images_per_s: between the first and the last pool "
                    "tar's result file (mtimes in OUT/mined.work, kept with --keep-work)")
    rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def scoring_rate(out: Path, images: int) -> float | None:
    """Pool images/s while scoring: from the first to the last per-tar result file."""
    times = sorted(p.stat().st_mtime for p in (out / "mined.work").glob("shard-*.pt"))
    if len(times) < 3 or times[-1] <= times[0]:
        return None
    return round(images / len(times) * (len(times) - 1) / (times[-1] - times[0]), 1)


def stage_mine(plan: Plan) -> dict:
    need_teacher(plan)
    runs = {}
    for name, (spec, images) in pool_specs(plan).items():
        runs[name] = run_mine(plan, name, spec, images, plan.work / f"mined-{name}")
        print(f"mine {name}: peak {runs[name]['peak_pss_mib']} MiB, {runs[name]['wall_seconds']} s", flush=True)
    small, big = list(runs.values())
    rec = {"runs": runs, "top_k": plan.top_k, "workers": plan.workers, "batch": plan.batch,
           "commands": [r["command"] for r in runs.values()],
           "teacher_runtime": next((ln for r in runs.values() for ln in r.get("runtime_lines", [])), None),
           "peak_ratio_big_to_small": round(big["peak_pss_mib"] / small["peak_pss_mib"], 3),
           "target": "peak < 2 GiB; 1M peak within 10% of 100k peak",
           "meets_target": big["peak_pss_mib"] < 2048 and big["peak_pss_mib"] <= 1.10 * small["peak_pss_mib"]}
    store(plan, "mine", rec)
    return rec


# --- rates


def rate_tars(plan: Plan) -> int:
    """How many pool tars (a) reads: ``rate_images`` worth, a multiple of the workers (each
    worker reads whole tars, so the last ones do not run alone)."""
    w = max(1, plan.workers)
    tars = -(-plan.rate_images // plan.pool_shard)
    return min(len(pool_tars(plan)), -(-tars // w) * w)


def pool_batches(plan: Plan, size: int, crop_pct: float):
    """The batches of the first ``rate_tars`` pool tars as ``kdistill mine`` makes them:
    ``kdistill.mining.pool.ShardStream`` (JPEG bytes of a tar -> ``read_images`` ->
    pHash of the whole image -> the teacher's eval transform) in a DataLoader with
    ``plan.workers`` workers, each reading whole tars, batches of ``plan.batch``."""
    from torch.utils.data import DataLoader

    from kdistill.data.transforms import eval_transform
    from kdistill.mining.pool import ShardStream, open_pool

    n = rate_tars(plan)
    pool = open_pool(f"wds:{plan.pool}/unlabeled-{{000000..{n - 1:06d}}}.tar")
    ds = ShardStream(pool, range(pool.num_shards), eval_transform(size, crop_pct), plan.batch)
    loader = DataLoader(ds, batch_size=None, num_workers=plan.workers)
    return loader, {"image_size": size, "crop_pct": crop_pct, "tars": n, "images": len(pool)}


def load_teacher(plan: Plan):
    """The teacher as ``kdistill mine`` loads it (before its runtime is chosen)."""
    import torch

    from kdistill.methods.teachers import load_teachers
    from kdistill.models.checkpoint import read_meta, resolve_checkpoint

    ckpt = resolve_checkpoint(str(teacher_dir(plan)))
    classes = list(read_meta(ckpt)["classes"])
    return load_teachers([str(teacher_dir(plan))], classes, torch.device("cpu"))


def compile_like_mine(plan: Plan, teacher, sample) -> str:
    """``compile_teachers`` with runtime auto and no autocast, as ``mine`` calls it; the
    runtime the teacher ended up on."""
    import torch

    from kdistill.methods.compiled import CompiledTeacher, compile_teachers

    compile_teachers(teacher, "auto", torch.device("cpu"), lambda: sample[:32], batch_size=plan.batch)
    return next((x.runtime for x in teacher.teachers if isinstance(x, CompiledTeacher)), "eager")


def stage_rates(plan: Plan) -> dict:
    need_teacher(plan)
    if not (plan.pool / "_info.json").is_file():
        raise SystemExit("run the pool stage first")
    import torch

    teacher = load_teacher(plan)
    pp = teacher.preprocessing
    # (a) the data path alone
    loader, pre = pool_batches(plan, pp.image_size, pp.crop_pct)
    it = iter(loader)
    first = next(it)  # worker start-up is not the data path's rate
    start, n, batches = time.time(), 0, [first["image"]]
    for b in it:
        n += len(b["index"]) + len(b["skipped"])
        if len(batches) * plan.batch < 4096 and "image" in b:
            batches.append(b["image"])
    data_rate = n / (time.time() - start)
    # (b) the teacher alone on pre-decoded batches
    images = torch.cat(batches)
    runtime = compile_like_mine(plan, teacher, images)
    chunks = [images[i:i + plan.batch] for i in range(0, len(images) - plan.batch + 1, plan.batch)]
    with torch.inference_mode():
        teacher.view_of(chunks[0])  # warm-up
        start, n = time.time(), 0
        while n < plan.rate_images:
            for c in chunks:
                teacher.view_of(c).logits.float()
                n += len(c)
        teacher_rate = n / (time.time() - start)
    data = load(plan)
    end_to_end = {k: v.get("images_per_s") for k, v in data.get("mine", {}).get("runs", {}).items()}
    rec = {"data_images_per_s": round(data_rate, 1), "teacher_images_per_s": round(teacher_rate, 1),
           "data_over_teacher": round(data_rate / teacher_rate, 2),
           "mine_images_per_s": end_to_end,
           "mine_over_teacher": {k: (round(v / teacher_rate, 2) if v else None) for k, v in end_to_end.items()},
           "images": pre["images"], "workers": plan.workers, "batch": plan.batch,
           "torch_threads": torch.get_num_threads(), "teacher_runtime": runtime, "precision": "fp32",
           "preprocess": {**pre, "decoder": "torchvision decode_jpeg (libjpeg-turbo), a batch per call "
                                      "(kdistill.images.read_images; PIL for non-JPEGs)",
                          "steps": "kdistill.mining.pool.ShardStream: tar -> read_images(batch of bytes) -> "
                                   "pHash(whole image) -> eval_transform"},
           "target": "data >= 3x teacher; mine end to end >= 0.8x teacher",
           "command": "python bench/scale.py rates"}
    store(plan, "rates", rec)
    return rec


# --- kill-resume


def stage_kill_resume(plan: Plan) -> dict:
    need_teacher(plan)
    name, (spec, images) = list(pool_specs(plan).items())[-1]
    full = plan.work / f"mined-{name}"
    if not mine_done(full):
        raise SystemExit(f"run the mine stage first (the uninterrupted {name} run is the reference)")
    ref = json.loads((full.parent / f"{full.name}.mine.json").read_text())
    out = plan.work / f"mined-{name}-killed"
    state_file = plan.work / "kill-resume.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {}
    if not state.get("killed"):
        shutil.rmtree(out, ignore_errors=True)
        for extra in out.parent.glob(f"{out.name}.*"):
            shutil.rmtree(extra, ignore_errors=True) if extra.is_dir() else extra.unlink()
        half = images // plan.pool_shard // 2
        work = out / "mined.work"
        scored = lambda: len(list(work.glob("shard-*.pt")))  # noqa: E731 - finished pool tars
        t0 = time.time()
        # at half the pool tars finished (the mine's own per-tar results in DIR/mined.work);
        # only if that folder never appears, at half the uninterrupted run's wall time
        killed = run_mine(plan, name, spec, images, out, stop_when=lambda: scored() >= half or (
            time.time() - t0 >= ref["wall_seconds"] / 2 and not work.is_dir()))
        if "killed_after_s" not in killed:
            raise SystemExit("the mine finished before it could be killed")
        state = {"killed": killed, "work_files_at_kill": len(work_files(out)),
                 "scored_tars_at_kill": scored(), "kill_rule": f"{half} of {2 * half} pool tars scored"
                 if scored() >= half else "half the reference wall time (no mined.work folder seen)"}
        state_file.write_text(json.dumps(state, indent=1) + "\n")
    resumed = run_mine(plan, name, spec, images, out, fresh=False)
    a, b = selection(full), selection(out)
    listing = [(p / "mined.txt").read_text() if (p / "mined.txt").is_file() else None for p in (full, out)]
    log_text = (plan.work / "logs" / f"mine-{out.name}.log").read_text()
    resumed_line = next((ln for ln in log_text.splitlines() if "resuming" in ln), None)
    rec = {"pool": spec, "killed_after_s": state["killed"]["killed_after_s"],
           "reference_wall_s": ref["wall_seconds"], "work_files_at_kill": state["work_files_at_kill"],
           "scored_tars_at_kill": state["scored_tars_at_kill"], "pool_tars": plan.pool_n // plan.pool_shard,
           "kill_rule": state.get("kill_rule"),
           "resume_wall_s": resumed["wall_seconds"], "selected": len(b), "reference_selected": len(a),
           "identical": a == b and listing[0] == listing[1], "shards_identical": a == b,
           "mined_txt_identical": listing[0] == listing[1] if listing[0] is not None else None,
           "resume_log": resumed_line,
           "first_difference": next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None),
           "command": resumed["command"] + "  (SIGKILL to its process group at half the pool tars scored, then the same command)"}
    store(plan, "kill-resume", rec)
    return rec


def work_files(out: Path) -> list[str]:
    """Whatever mining left next to / inside ``out`` (its finished-tar results)."""
    found = []
    for base in [out, *out.parent.glob(f"{out.name}.*")]:
        if base.is_dir():
            found += [str(p.relative_to(out.parent)) for p in sorted(base.rglob("*")) if p.is_file()]
    return found[:400]


# --- train-speed, train-acc


def tiny_cifar(plan: Plan, per_class_train: int = 40, per_class_val: int = 10) -> None:
    """The --smoke data: a few CIFAR-10 images per class, as an ImageFolder."""
    root = Path(plan.train_root)
    if (root / "done").is_file():
        return
    for split, n in (("train", per_class_train), ("val", per_class_val)):
        for c in sorted(p for p in (Path(CIFAR) / split).iterdir() if p.is_dir()):
            dest = root / split / c.name
            dest.mkdir(parents=True, exist_ok=True)
            for f in sorted(c.glob("*.jpg"))[:n]:
                shutil.copy(f, dest / f.name)
    (root / "done").write_text("ok\n")


def packed(plan: Plan) -> tuple[Path, dict]:
    if plan.train_root != CIFAR:
        tiny_cifar(plan)
    out = plan.work / "cifar10-shards"
    rec_path = plan.work / "pack.json"
    if rec_path.is_file() and (out / "_info.json").is_file():
        return out, json.loads(rec_path.read_text())
    shutil.rmtree(out, ignore_errors=True)
    cmd = kd("pack", plan.train_root, "--out", str(out), "--workers", str(plan.workers), "--no-progress",
             *(["--shard-size", str(plan.pack_shard)] if plan.pack_shard else []))
    secs = run_cmd(cmd, plan.work / "logs" / "pack.log")
    info = json.loads((out / "_info.json").read_text())
    images = sum(e["num_samples"] for e in info["splits"].values())
    mib = sum(f.stat().st_size for f in out.glob("*.tar")) / 2**20
    src = sum(f.stat().st_size for f in Path(plan.train_root).rglob("*.jpg")) / 2**20
    rec = {"command": " ".join(["kdistill", *cmd[3:]]), "seconds": round(secs, 1), "images": images,
           "images_per_s": round(images / secs, 1), "shards_mib": round(mib, 1), "source_jpeg_mib": round(src, 1),
           "splits": {k: e["num_samples"] for k, e in info["splits"].items()},
           "note": "wall time of the whole command, start-up included"}
    rec_path.write_text(json.dumps(rec, indent=1) + "\n")
    return out, rec


def arms(plan: Plan, shards: Path) -> dict[str, list[str]]:
    """Both read and decode every image each epoch: shards always stream (in_memory=no is a
    no-op there, given for symmetry), the folder is kept from being decoded into RAM."""
    return {"shards": ["--data", f"wds:{shards}", "-o", "data.in_memory=no"],
            "folder": ["--data", plan.train_root, "-o", "data.in_memory=no"]}


def pack_val_shard(shards: Path) -> int:
    """Samples in the first val shard of a pack (the shards arm's short val pass)."""
    return int(json.loads((shards / "_info.json").read_text())["splits"]["val"]["shard_lengths"][0])


def last_metrics(out: Path) -> dict:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    return rows[-1]


def stage_train_speed(plan: Plan) -> dict:
    shards, pack = packed(plan)
    rounds_file = plan.work / "train-speed-rounds.jsonl"
    done = [json.loads(ln) for ln in rounds_file.read_text().splitlines()] if rounds_file.is_file() else []
    for r in range(len({d["round"] for d in done if d.get("complete")}), plan.speed_rounds):
        order = list(arms(plan, shards).items())
        if r % 2:
            order.reverse()  # ABBA: neither arm always runs first
        for name, data in order:
            if any(d["round"] == r and d["arm"] == name for d in done):
                continue
            out = plan.work / "speed-runs" / f"{name}-r{r}"
            shutil.rmtree(out, ignore_errors=True)
            # a short val pass (not in train images/s): one val shard, or as many folder images
            short_val = (["-o", f"data.val=wds:{shards}/val-000000.tar"] if name == "shards"
                         else ["-o", f"data.max_val_images={pack_val_shard(shards)}"])
            cmd = kd("train", *data, "--model", "resnet8", "--epochs", "1", "--batch-size", str(plan.speed_batch),
                     "--workers", str(plan.workers), "--out", str(out), "--no-progress", "--seed", str(r),
                     "-o", f"train.max_steps_per_epoch={plan.speed_steps}", *short_val)
            run_cmd(cmd, plan.work / "logs" / f"speed-{name}-r{r}.log")
            m = last_metrics(out)
            row = {"round": r, "arm": name, "images_per_s": m["train.images_per_s"],
                   "seconds": m["train.seconds"], "precision": m.get("precision"),
                   "cpu_capability": m.get("cpu_capability"), "command": " ".join(["kdistill", *cmd[3:]])}
            done.append(row)
            with open(rounds_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
        with open(rounds_file, "a") as fh:
            fh.write(json.dumps({"round": r, "complete": True}) + "\n")
        done.append({"round": r, "complete": True})
    per = {a: [d["images_per_s"] for d in done if d.get("arm") == a] for a in ("shards", "folder")}
    med = {a: statistics.median(v) for a, v in per.items()}
    rec = {"pack": pack, "rounds": plan.speed_rounds, "steps": plan.speed_steps, "batch": plan.speed_batch,
           "workers": plan.workers, "images_per_s": per, "median": med,
           "ratio_shards_to_folder": round(med["shards"] / med["folder"], 3),
           "precision": sorted({f"{d.get('precision')} on {d.get('cpu_capability')}" for d in done if d.get("arm")}),
           "commands": sorted({d["command"].split(" --out ")[0] for d in done if d.get("arm")}),
           "target": "shards >= 0.95x folder (data.in_memory=no)"}
    store(plan, "train-speed", rec)
    return rec


def stage_train_acc(plan: Plan) -> dict:
    shards, _ = packed(plan)
    res, cmds = {}, {}
    for name, data in arms(plan, shards).items():
        res[name] = []
        for seed in range(plan.acc_seeds):
            out = plan.work / "acc-runs" / f"{name}-s{seed}"
            args = [*data, "--model", "resnet8", "--seed", str(seed), "--workers", str(plan.workers),
                    *plan.acc_args]
            ensure_run("train", out, plan.acc_epochs, args)
            r = run_record(out)
            res[name].append({"seed": seed, "top1": r["top1"], "precision": r["precision"],
                              "train_seconds": r["train_seconds"]})
            cmds[name] = "kdistill train " + " ".join(args) + f" -o train.epochs={plan.acc_epochs}"
    stats = {}
    for name, rows in res.items():
        v = [r["top1"] for r in rows]
        stats[name] = {"mean": round(statistics.mean(v), 4), "min": min(v), "max": max(v),
                       "std": round(statistics.stdev(v), 4) if len(v) > 1 else None}
    a, b = stats["shards"], stats["folder"]
    within = a["min"] <= b["mean"] <= a["max"] or b["min"] <= a["mean"] <= b["max"]
    rec = {"epochs": plan.acc_epochs, "seeds": plan.acc_seeds, "runs": res, "stats": stats,
           "mean_difference": round(a["mean"] - b["mean"], 4), "within_spread": within, "commands": cmds,
           "target": "shards' mean top-1 within the folder's seed spread (or the reverse)"}
    store(plan, "train-acc", rec)
    return rec


# --- input224


def make_224_images(plan: Plan) -> Path:
    """``in224_images`` JPEGs of 256-500 px: CIFAR-10 train images upscaled (bicubic) to a
    random size with Gaussian noise, in an ImageFolder (train/ and a tiny val/)."""
    import numpy as np
    from PIL import Image

    root = plan.work / f"jpeg224-{plan.in224_images}"
    if (root / "done").is_file():
        return root
    rng = np.random.default_rng(0)
    classes = sorted(p for p in (Path(CIFAR) / "train").iterdir() if p.is_dir())
    per = plan.in224_images // len(classes)
    for c in classes:
        files = sorted(c.glob("*.jpg"))[:per + 2]
        for split, chosen in (("train", files[:per]), ("val", files[per:per + 2])):
            d = root / split / c.name
            d.mkdir(parents=True, exist_ok=True)
            for f in chosen:
                w, h = (int(x) for x in rng.integers(256, 501, size=2))
                a = np.asarray(Image.open(f).convert("RGB").resize((w, h), Image.BICUBIC), dtype=np.float32)
                a = np.clip(a + rng.normal(0, 8, a.shape), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(d / f.name, quality=90)
    (root / "done").write_text("ok\n")
    return root


def kdistill_224_rate(root: Path, workers: int, batch: int) -> float:
    from kdistill.config import DataConfig
    from kdistill.data.datasets import open_splits, train_dataset
    from kdistill.data.loader import EpochLoader

    cfg = DataConfig(root=str(root), in_memory="no", crop="rrc", workers=workers)
    splits = open_splits(cfg, need_val=False)
    ds = train_dataset(cfg, splits.train, splits.native_size, 224)
    loader = EpochLoader(ds, batch, workers, seed=0)
    loader.set_epoch(0)
    return _timed(loader, lambda b: len(b["image"]))


def timm_224_rate(root: Path, workers: int, batch: int, prefetcher: bool = True) -> float:
    """timm's loader: with ``prefetcher`` (timm's default) workers hand over uint8 batches and
    the PrefetchLoader normalises them (here on the CPU); without, workers make float tensors."""
    import torch
    from timm.data import ImageDataset, create_loader

    ds = ImageDataset(str(root / "train"))
    loader = create_loader(ds, input_size=(3, 224, 224), batch_size=batch, is_training=True,
                           scale=(0.08, 1.0), hflip=0.5, color_jitter=0.0, re_prob=0.0, num_workers=workers,
                           device=torch.device("cpu"), use_prefetcher=prefetcher, persistent_workers=False,
                           interpolation="bilinear")
    return _timed(loader, lambda b: len(b[0]))


def timm_float_224_rate(root: Path, workers: int, batch: int) -> float:
    return timm_224_rate(root, workers, batch, prefetcher=False)


def _timed(loader, count) -> float:
    """Images/s of one whole pass, worker start-up included: loaders prefetch differently
    (timm's PrefetchLoader holds one batch more than a DataLoader), so a clock started at
    the first batch would favour one of them."""
    start, n = time.time(), 0
    for b in loader:
        n += count(b)
    return n / (time.time() - start)


def stage_input224(plan: Plan) -> dict:
    import PIL
    import torchvision
    from PIL import features

    root = make_224_images(plan)
    batch = plan.in224_batch
    rows = []
    for r in range(plan.in224_rounds):
        for w in plan.in224_workers:
            trio = [("kdistill", kdistill_224_rate), ("timm", timm_224_rate), ("timm-float", timm_float_224_rate)]
            for name, fn in (trio if r % 2 == 0 else trio[::-1]):
                rate = fn(root, w, batch)
                rows.append({"round": r, "workers": w, "loader": name, "images_per_s": round(rate, 1)})
                print(f"input224 round {r} workers {w} {name}: {rate:.1f} img/s", flush=True)
    summary = {}
    for w in plan.in224_workers:
        med = {n: statistics.median(x["images_per_s"] for x in rows if x["workers"] == w and x["loader"] == n)
               for n in ("kdistill", "timm", "timm-float")}
        best = max(med["timm"], med["timm-float"])
        summary[str(w)] = {"kdistill_per_worker": round(med["kdistill"] / w, 1),
                           "timm_per_worker": round(med["timm"] / w, 1),
                           "timm_float_per_worker": round(med["timm-float"] / w, 1),
                           "ratio": round(med["kdistill"] / best, 3)}
    turbo = features.check_feature("libjpeg_turbo")
    rec = {"images": plan.in224_images, "batch": batch, "rounds": rows, "by_workers": summary,
           "decoder": f"kdistill: torchvision {torchvision.__version__} decode_jpeg (libjpeg-turbo); timm: PIL "
                      f"{PIL.__version__} (libjpeg-turbo: {turbo})",
           "why_decoder": "kdistill.images.read_image hands JPEGs to torchvision's libjpeg-turbo: the same "
                          "pixels as PIL's, without PIL's Python header parsing, and libjpeg's errors raise "
                          "(tests/test_images.py decodes hundreds of corrupted JPEGs in a child process); every "
                          "other format, and any JPEG libjpeg rejects, goes to PIL, because torchvision.io "
                          "crashes the process on a corrupt PNG (libpng's error path segfaults); timm's "
                          "ImageDataset decodes with PIL",
           "kdistill": "train_dataset(crop=rrc, scale 0.08-1, hflip 0.5) + EpochLoader, uint8 out, in_memory=no",
           "timm": "timm.data.create_loader(timm.data.ImageDataset, is_training, scale 0.08-1, hflip 0.5, "
                   "color_jitter 0, re_prob 0, device cpu): 'timm' with use_prefetcher=True (its default: uint8 "
                   "from the workers, normalised by the PrefetchLoader), 'timm-float' with use_prefetcher=False "
                   "(the workers make normalised float tensors); ratio = kdistill / the faster of the two",
           "statistic": "median over interleaved rounds of one whole pass each (worker start-up included)",
           "precision": "uint8 / fp32 tensors (no model)",
           "target": "kdistill >= 1.0x timm per worker", "command": "python bench/scale.py input224"}
    store(plan, "input224", rec)
    return rec


# ------------------------------------------------------------------ report


def stage_decode(plan: Plan) -> dict:
    import contextlib
    from unittest import mock

    import torch

    from kdistill import images
    from kdistill.data.transforms import eval_transform
    from kdistill.mining.pool import ShardStream, open_pool

    need_teacher(plan)
    torch.set_num_threads(1)
    pp = load_teacher(plan).preprocessing
    pool = open_pool(f"wds:{plan.pool}/unlabeled-000000.tar")
    files = sorted(str(f) for f in (make_224_images(plan) / "train").rglob("*.jpg"))

    def measure() -> dict:
        start = time.time()
        n = sum(len(b["index"]) + len(b["skipped"])
                for b in ShardStream(pool, [0], eval_transform(pp.image_size, pp.crop_pct), plan.batch))
        tar_rate = n / (time.time() - start)
        start = time.time()
        for f in files:
            images.read_image(f)
        return {"pool_tar_images_per_s": round(tar_rate, 1),
                "jpeg224_us_per_image": round((time.time() - start) / len(files) * 1e6, 1)}

    measure()  # warm-up: imports, torchvision's decoder, the page cache
    rows = []
    for r in range(3):
        for arm in (("turbo", "pil") if r % 2 == 0 else ("pil", "turbo")):
            off = mock.patch.object(images, "_jpeg_input", lambda data, max_pixels: None)
            with off if arm == "pil" else contextlib.nullcontext():
                rows.append({"round": r, "decoder": arm, **measure()})
    med = {arm: {k: statistics.median(x[k] for x in rows if x["decoder"] == arm)
                 for k in ("pool_tar_images_per_s", "jpeg224_us_per_image")} for arm in ("turbo", "pil")}
    rec = {"rounds": rows, "median": med, "pool_tar_images": len(pool), "jpeg224_files": len(files),
           "turbo": "kdistill.images as shipped: JPEGs through torchvision decode_jpeg (read_images: a batch per call)",
           "pil": "the same code with the JPEG path off (images._jpeg_input -> None): every image through PIL",
           "setting": "this process, 1 thread; median of 3 interleaved rounds",
           "precision": "uint8", "command": "python bench/scale.py decode"}
    store(plan, "decode", rec)
    return rec


def _mib(x) -> str:
    if not isinstance(x, (int, float)):
        return "?"
    return f"{x:,.0f} MiB" if x >= 10 else f"{x:.1f} MiB"


def cpu_name(machine: str | None) -> str:
    """The CPU model of a ``common.machine()`` string ("2 cores (AMD EPYC), ..." -> "AMD EPYC")."""
    m = machine or ""
    return m[m.find("(") + 1:m.find("),")] if "(" in m and ")," in m else m


def report(plan: Plan) -> str:
    d = load(plan)
    lines = ["## Data at scale: shards, streaming, mining a million images (issue 26)", "",
             "`bench/scale.py`; each stage cached and resumable under ~/.cache/kdistill-bench/scale. "
             "CPU capability and precision are named beside every speed.", ""]
    machines = sorted({(v.get("machine"), v.get("cpu_capability")) for v in d.values() if isinstance(v, dict)})
    for m, cap in machines:
        lines.append(f"Machine: {m} (CPU capability {cap}).")
    lines += ["", "| stage | measured | target | met | date | command |", "|---|---|---|---|---|---|"]
    missing = [s for s in STAGES[:-1] if s not in d]

    def row(stage, measured, target, met):
        v = d[stage]
        cmd = v.get("command") or "; ".join(v.get("commands", {}).values() if isinstance(v.get("commands"), dict)
                                            else v.get("commands", []))
        flag = "yes" if met else ("no" if met is not None else "-")
        date = v["date"] + (f" ({cpu_name(v.get('machine'))})" if len(machines) > 1 else "")
        lines.append(f"| {stage} | {measured} | {target} | {flag} | {date} | `{cmd}` |")

    if "pool" in d:
        p = d["pool"]
        row("pool", f"{p['images']:,} JPEGs ({p['distinct_images']:,} distinct) in {p['shards']} tars, {_mib(p['mib'])}; "
            f"{p['images_per_s_per_process']} img/s per process ({p['procs']} processes, nice 19, {p['cpu_capability']})",
            "-", None)
    if "teacher" in d:
        t = d["teacher"]
        row("teacher", f"resnet20, {t['epochs']} epochs, val top-1 {t['top1']}, {t['train_seconds']} s "
            f"({', '.join(t.get('precision') or [])})", "-", None)
    if "mine" in d:
        m = d["mine"]
        parts = [f"{k}: peak {_mib(r['peak_pss_mib'])} PSS, {r['wall_seconds']} s, {r.get('images_per_s')} img/s "
                 f"end to end ({r.get('scoring_images_per_s')} while scoring)" for k, r in m["runs"].items()]
        rt = (m.get("teacher_runtime") or "teacher runtime not logged").split(": ", 1)[-1]
        row("mine", "; ".join(parts) + f"; big/small peak {m['peak_ratio_big_to_small']} "
            f"(teacher: {rt}; CPU {m['cpu_capability']}, {m['workers']} workers)", m["target"], m["meets_target"])
    if "rates" in d:
        r = d["rates"]
        if "mine" in d:  # the mine may have finished after the rates stage
            r["mine_images_per_s"] = {k: v.get("images_per_s") for k, v in d["mine"]["runs"].items()}
            r["mine_over_teacher"] = {k: round(v / r["teacher_images_per_s"], 2)
                                      for k, v in r["mine_images_per_s"].items() if v}
        e2e = ", ".join(f"{k} {v} img/s ({r['mine_over_teacher'].get(k)}x)" for k, v in r["mine_images_per_s"].items())
        met = r["data_over_teacher"] >= 3 and all(x is not None and x >= 0.8 for x in r["mine_over_teacher"].values()) \
            if r["mine_over_teacher"] else None
        row("rates", f"(a) data {r['data_images_per_s']} img/s; (b) teacher {r['teacher_images_per_s']} img/s "
            f"({r['teacher_runtime']}, {r['precision']} on {r['cpu_capability']}, {r['torch_threads']} threads); "
            f"(a)/(b) {r['data_over_teacher']}x; (c) mine {e2e or 'pending'}", r["target"], met)
    if "kill-resume" in d:
        k = d["kill-resume"]
        row("kill-resume", f"killed at {k['killed_after_s']} s of {k['reference_wall_s']} s, resumed in "
            f"{k['resume_wall_s']} s; {k['selected']} selected vs {k['reference_selected']}; "
            f"identical: {k['identical']}", "identical selection", k["identical"])
    if "train-speed" in d:
        s = d["train-speed"]
        pk = s["pack"]
        row("train-speed", f"pack: {pk['images']:,} images in {pk['seconds']} s ({pk['images_per_s']} img/s), "
            f"{_mib(pk['shards_mib'])} of shards from {_mib(pk['source_jpeg_mib'])} of JPEGs; training resnet8: "
            f"shards {s['median']['shards']:.0f} vs folder {s['median']['folder']:.0f} img/s (median of "
            f"{s['rounds']} interleaved {s['steps']}-step rounds, {', '.join(s['precision'])}), "
            f"ratio {s['ratio_shards_to_folder']}", s["target"], s["ratio_shards_to_folder"] >= 0.95)
    if "train-acc" in d:
        a = d["train-acc"]
        st = a["stats"]
        row("train-acc", f"resnet8 {a['epochs']} epochs x {a['seeds']} seeds: shards {st['shards']['mean']} "
            f"[{st['shards']['min']}, {st['shards']['max']}] vs folder {st['folder']['mean']} "
            f"[{st['folder']['min']}, {st['folder']['max']}]", a["target"], a["within_spread"])
    if "input224" in d:
        i = d["input224"]
        parts = [f"{w} worker(s): kdistill {v['kdistill_per_worker']} vs timm {v['timm_per_worker']} "
                 f"(prefetcher) / {v['timm_float_per_worker']} (float) img/s per worker ({v['ratio']}x the faster)"
                 for w, v in i["by_workers"].items()]
        met = all(v["ratio"] >= 1.0 for v in i["by_workers"].values())
        row("input224", "; ".join(parts) + f"; decoder {i['decoder']}; {i['precision']}, {i['cpu_capability']}",
            i["target"], met)
    if "decode" in d:
        m = d["decode"]["median"]
        t, p = m["turbo"], m["pil"]
        row("decode", f"{d['decode']['setting']}: a pool tar (32 px) through ShardStream {t['pool_tar_images_per_s']:.0f} "
            f"img/s with libjpeg-turbo vs {p['pool_tar_images_per_s']:.0f} with PIL "
            f"({t['pool_tar_images_per_s'] / p['pool_tar_images_per_s']:.2f}x); 256-500 px JPEGs "
            f"{t['jpeg224_us_per_image']:.0f} vs {p['jpeg224_us_per_image']:.0f} us per image; "
            f"{d['decode']['precision']}, {d['decode']['cpu_capability']}", "-", None)
    lines.append("")
    if "input224" in d:
        lines.append(f"Decoder: {d['input224']['decoder']}. Why: {d['input224']['why_decoder']}.")
    if "rates" in d:
        lines.append(f"Data path (a): {d['rates']['preprocess']['steps']}, {d['rates']['workers']} DataLoader "
                     f"workers, batch {d['rates']['batch']}, {d['rates']['images']:,} pool images.")
    lines.append("Not measured yet: " + (", ".join(missing) if missing else "none") + ".")
    body = "\n".join(lines)
    if plan.publish:
        update_section("scale", body)
    else:
        (plan.work / "BENCHMARKS-smoke.md").write_text(body + "\n")
    return body


# ------------------------------------------------------------------ main


RUNNERS = {"pool": stage_pool, "teacher": stage_teacher, "mine": stage_mine, "rates": stage_rates,
           "kill-resume": stage_kill_resume, "train-speed": stage_train_speed, "train-acc": stage_train_acc,
           "input224": stage_input224, "decode": stage_decode}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("stage", choices=[*STAGES, "all"])
    p.add_argument("--smoke", action="store_true", help="a tiny version in a throw-away cache")
    p.add_argument("--cache", type=Path, default=None, help="the cache folder (default: see above)")
    p.add_argument("--teacher-epochs", type=int, default=None, help="teacher epochs (default 3, ~10 min)")
    p.add_argument("--big-tars", type=int, default=None,
                   help="mine and kill-resume the first N pool tars instead of all of them (a slow machine)")
    a = p.parse_args()
    plan = smoke_plan(a.cache) if a.smoke else full_plan(a.cache)
    if a.big_tars:
        plan.big_tars = a.big_tars
    if a.teacher_epochs:
        plan.teacher_epochs = a.teacher_epochs
    plan.work.mkdir(parents=True, exist_ok=True)
    print(f"== scale bench, cache {plan.work}", flush=True)
    stages = [s for s in STAGES if s != "report"] if a.stage == "all" else [a.stage]
    failed = []
    for s in stages:
        if s == "report":
            continue
        try:
            rec = RUNNERS[s](plan)
            print(json.dumps({s: {k: v for k, v in rec.items() if k not in ("runs", "rounds")}}, indent=1,
                             default=str), flush=True)
        except SystemExit as err:
            if a.stage != "all":
                raise
            print(f"== stage {s} FAILED: {err}", flush=True)
            failed.append(s)
    print(report(plan))
    if failed:
        raise SystemExit(f"failed stages: {', '.join(failed)}")


if __name__ == "__main__":
    main()
