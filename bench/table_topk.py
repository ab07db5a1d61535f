"""Issue 26 item 5 benchmark: what keeping only the top k of the view-'fixed' teacher table
costs KD at T = 4 (CIFAR-10, resnet20 teacher -> resnet8 student).

    .venv/bin/python bench/table_topk.py            # teacher (cached), 4 arms x 2 seeds, fidelity
    .venv/bin/python bench/table_topk.py --smoke    # 256 images, 1 epoch each, throw-away cache
    .venv/bin/python bench/table_topk.py --report   # only rebuild the JSON and BENCHMARKS.md section

The table (engine/table.py) holds the teacher's output on each training image's centre crop:
all C fp16 logits (``full``), or with ``-o distill.table_top_k=K`` the K largest probabilities
at T=1 renormalised to sum 1, the other classes at the floor probability 1e-8, exactly as the
soft-label cache (data/softlabels.py) stores and replays them. Arms: full, K = 1, 5, 10 (on
CIFAR-10's 10 classes K = 10 keeps everything: it checks that the top-k path itself costs
nothing). Every arm: ``-c cifar/kd_resnet56_resnet20`` (0.9 KD at T=4 + 0.1 CE, SGD, cosine)
with ``--model resnet8 --view fixed``, ``--epochs`` epochs, seeds ``--seeds``; the metric is the
last epoch's val top-1 (nothing is chosen on val).

Fidelity, from the full arm's own table (the teacher's logits z over the training set):
KL(p || q) at T = 4 with p = softmax(z / 4) and q = softmax(log(top-k floor probs) / 4), the
target the student gets instead, in nats per image (the KD term multiplies it by T^2 = 16);
the mass dropped before renormalising (1 - top-k mass of softmax(z)); the mass p puts outside
the kept classes; and the mass q puts on the floored classes (the floor is not zero: at T = 4 a
floored class weighs (1e-8 / p_kept)^(1/4) against a kept one).

Teacher: ``--teacher CKPT``, else resnet20 trained ``--teacher-epochs`` epochs on CIFAR-10 train
(``-c cifar/resnet20_baseline``), cached in ``--cache``/teacher and resumed after a kill, as is
every arm (bench/common.ensure_run); a killed run picks up where it stopped. Expected time on 2
otherwise idle CPU cores: about 1 h for the teacher (30 epochs of resnet20), 10-12 min per arm
(decoding CIFAR-10 into RAM, one teacher pass to fill the table, 10 epochs of resnet8): 2.5-3 h
in all for 8 arms; ``--smoke`` takes about 2 min.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (CIFAR, LONG_CACHE, ensure_run, fmt_mean_std, machine, run_record, save_result,  # noqa: E402
                    today, update_section)

from kdistill.data.softlabels import TeacherTable, topk_log_probs, topk_renormalised  # noqa: E402

T = 4.0
ARMS = {"full": 0, "k1": 1, "k5": 5, "k10": 10}
SECTION = "table-topk"


def options(a: argparse.Namespace) -> list[str]:
    """Data and schedule overrides every run shares (a subset for --smoke)."""
    extra = ["-o", f"train.batch_size={a.batch_size}"]
    if a.train_images:
        extra += ["-o", f"data.max_train_images={a.train_images}", "-o", f"data.max_val_images={a.val_images}"]
    return extra


def teacher(a: argparse.Namespace) -> str:
    if a.teacher:
        return a.teacher
    out = Path(a.cache) / "teacher"
    ensure_run("train", out, a.teacher_epochs, ["-c", "cifar/resnet20_baseline", "--data", a.data, *options(a)])
    return str(out / "last.safetensors")  # the last epoch: nothing chosen on val


def arm(a: argparse.Namespace, name: str, seed: int, ckpt: str) -> Path:
    out = Path(a.cache) / f"{name}-s{seed}"
    ensure_run("distill", out, a.epochs,
               ["-c", "cifar/kd_resnet56_resnet20", "--data", a.data, "--teacher", ckpt, "--model", "resnet8",
                "--view", "fixed", "-o", f"distill.table_top_k={ARMS[name]}", "-o", f"train.seed={seed}",
                *options(a)])
    return out


@torch.no_grad()
def fidelity(table: TeacherTable, ks: list[int], chunk: int = 4096) -> dict:
    """Per k: mean KL(p_T || q_T) and tail masses over the full table's rows (see the module
    docstring), in blocks of ``chunk`` rows of the memory-mapped logits."""
    sums = {k: np.zeros(4) for k in ks}
    rows = 0
    for start in range(0, len(table), chunk):
        z = table[np.arange(start, min(start + chunk, len(table)))].float()
        z = z[z.abs().sum(1) > 0]  # unreadable images have no row
        rows += len(z)
        p1, log_p = z.softmax(-1), (z / T).log_softmax(-1)
        for k in ks:
            probs, index = topk_renormalised(p1, k)
            log_q = (topk_log_probs(probs.float(), index, z.shape[1]) / T).log_softmax(-1)
            kept = torch.zeros_like(z, dtype=torch.bool).scatter_(1, index, True)
            kl = (log_p.exp() * (log_p - log_q)).sum(1)
            sums[k] += [kl.sum().item(), (1 - p1.topk(k, -1).values.sum(1)).clamp_min(0).sum().item(),
                        (log_p.exp() * ~kept).sum().item(), (log_q.exp() * ~kept).sum().item()]
    keys = ("kl_T4_nats", "dropped_mass_T1", "teacher_mass_outside_T4", "floor_mass_T4")
    return {"images": rows, **{str(k): {key: v / max(rows, 1) for key, v in zip(keys, sums[k])} for k in ks}}


def collect(a: argparse.Namespace) -> dict:
    arms = {}
    for name in ARMS:
        runs = {s: run_record(Path(a.cache) / f"{name}-s{s}") for s in a.seeds}
        done = {s: r for s, r in runs.items() if r}
        folder = Path(a.cache) / f"{name}-s{a.seeds[0]}" / "teacher-table"
        arms[name] = {"k": ARMS[name], "runs": done,
                      "bytes_per_image": TeacherTable(folder).bytes_per_image() if (folder / "manifest.json").is_file() else None}
    full = Path(a.cache) / f"full-s{a.seeds[0]}" / "teacher-table"
    fid = fidelity(TeacherTable(full), [k for k in ARMS.values() if k]) if (full / "manifest.json").is_file() else None
    return {"machine": machine(), "date": today(), "temperature": T, "epochs": a.epochs, "seeds": a.seeds,
            "teacher": a.teacher or str(Path(a.cache) / "teacher"), "teacher_epochs": a.teacher_epochs,
            "train_images": a.train_images, "arms": arms, "fidelity": fid}


def markdown(r: dict) -> str:
    cmd = "python bench/table_topk.py"
    lines = ["## The view-fixed teacher table: full logits vs top k (CIFAR-10)", "",
             f"Measured on {r['machine']} ({r['date']}) by `{cmd}`: resnet8 distilled (0.9 KD at T={r['temperature']:g} "
             f"+ 0.1 CE, `-c cifar/kd_resnet56_resnet20 --view fixed`) from a resnet20 teacher "
             f"({r['teacher_epochs']} epochs), {r['epochs']} epochs, seeds {', '.join(map(str, r['seeds']))}; "
             "last-epoch val top-1 (mean ± sd over seeds). Top-k rows are the cache's: the k largest "
             "probabilities at T=1 renormalised, the other classes at 1e-8.", "",
             "| table | bytes / image | val top-1 | agreement | KL(p_T4 ‖ q_T4) nats | mass dropped (T=1) | "
             "teacher mass outside the k (T=4) | floor mass of the target (T=4) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    fid = r["fidelity"] or {}
    for name, a in r["arms"].items():
        top1 = [x["top1"] for x in a["runs"].values() if x.get("top1") is not None]
        agree = [x["agreement"] for x in a["runs"].values() if x.get("agreement") is not None]
        f = fid.get(str(a["k"])) if a["k"] else {"kl_T4_nats": 0.0, "dropped_mass_T1": 0.0,
                                                   "teacher_mass_outside_T4": 0.0, "floor_mass_T4": 0.0}
        bpi = f"{a['bytes_per_image']:.0f}" if a["bytes_per_image"] else "pending"
        cells = [f"{f[key]:.4f}" for key in ("kl_T4_nats", "dropped_mass_T1", "teacher_mass_outside_T4",
                                              "floor_mass_T4")] if f else ["pending"] * 4
        lines.append(f"| {name} | {bpi} | {fmt_mean_std(top1)} | {fmt_mean_std(agree)} | " + " | ".join(cells) + " |")
    if fid:
        lines += ["", f"Fidelity over the {fid['images']} training images' centre crops (the full arm's table). "
                  "Bytes per image include the .npy headers; with 10 classes a top-k table saves nothing, "
                  "at ImageNet's 1,000 the full table is 2,000 bytes per image (2.6 GB) and a top-10 one 60."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=CIFAR)
    ap.add_argument("--cache", default=None, help="run folder root (default ~/.cache/kdistill-bench/table-topk)")
    ap.add_argument("--teacher", default=None, help="a teacher checkpoint or run (default: train a resnet20)")
    ap.add_argument("--teacher-epochs", type=int, default=30)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--train-images", type=int, default=None, help="a seeded subset of CIFAR-10 train")
    ap.add_argument("--val-images", type=int, default=None)
    ap.add_argument("--smoke", action="store_true", help="256 train / 128 val images, 1 epoch each, "
                    "its own cache; writes neither bench/results nor BENCHMARKS.md")
    ap.add_argument("--report", action="store_true", help="publish what has finished; train nothing")
    ap.add_argument("--no-write", action="store_true", help="print, but write neither results nor BENCHMARKS.md")
    a = ap.parse_args()
    if a.smoke:
        a.teacher_epochs, a.epochs, a.seeds, a.batch_size = 1, 1, "0", 64
        a.train_images, a.val_images, a.no_write = 256, 128, True
        a.cache = a.cache or str(LONG_CACHE / "table-topk-smoke")
    a.cache = a.cache or str(LONG_CACHE / "table-topk")
    a.val_images = a.val_images or a.train_images
    a.seeds = [int(s) for s in a.seeds.split(",")]
    if not a.report:
        ckpt = teacher(a)
        for seed in a.seeds:
            for name in ARMS:
                arm(a, name, seed, ckpt)
    r = collect(a)
    text = markdown(r)
    print(text)
    if a.no_write:
        (Path(a.cache) / "table_topk.json").write_text(json.dumps(r, indent=2) + "\n")
    else:
        save_result("table_topk", r)
        update_section(SECTION, text)


if __name__ == "__main__":
    main()
