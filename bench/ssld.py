"""Issue 4 benchmark: SSLD on CIFAR-10 with 10% labels.

    .venv/bin/python bench/ssld.py [--budget 150000] [--top-k 2000]

Labeled set: 500 images per class of train/ (seeded); the other 45,000 train images form
the unlabeled pool (a list of paths only: mining never sees their labels, which are used
afterwards to report the precision of the teacher's selection). 200 val images are planted
in the pool (exact copies, resized to 40 px, re-encoded at JPEG quality 70, 90% centre crops)
to measure dedup. Teacher resnet56 trained on the labeled set only; student resnet20. Every
arm sees the same number of training images (``--budget``), so arms differ in data, not
compute. Runs are cached in bench/cache/ssld and resumed after a kill.
"""
from __future__ import annotations

import argparse
import csv
import json
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, CIFAR, RESULTS, ensure_run, kdistill, machine, save_result, today, update_section  # noqa: E402

WORK = CACHE / "ssld"
PER_CLASS = 500
PLANTS = 50  # val images per kind of copy


def prepare_data() -> dict:
    """Labeled list, pool list, class map and planted copies of val images (idempotent)."""
    data = WORK / "data"
    lab, pool, cmap = data / "train_list.txt", data / "pool.txt", data / "classes.txt"
    if pool.is_file():
        return json.loads((data / "plants.json").read_text()) | {"labeled": str(lab), "pool": str(pool),
                                                                   "class_map": str(cmap)}
    from PIL import Image

    data.mkdir(parents=True, exist_ok=True)
    train = Path(CIFAR) / "train"
    classes = sorted(d.name for d in train.iterdir() if d.is_dir())
    rng = random.Random(0)
    lab_rows, pool_rows = [], []
    for ci, c in enumerate(classes):
        files = sorted(str(p) for p in (train / c).iterdir())
        rng.shuffle(files)
        lab_rows += [f"{p} {ci}" for p in files[:PER_CLASS]]
        pool_rows += files[PER_CLASS:]
    val = sorted(str(p) for p in (Path(CIFAR) / "val").rglob("*.*"))
    rng.shuffle(val)
    plants, planted_dir = {}, data / "planted"
    planted_dir.mkdir(exist_ok=True)
    for k, kind in enumerate(("exact", "resized40", "jpeg70", "crop90")):
        for j, src in enumerate(val[k * PLANTS:(k + 1) * PLANTS]):
            im = Image.open(src).convert("RGB")
            dst = planted_dir / f"{kind}_{j:03d}.{'png' if kind == 'exact' else 'jpg'}"
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
            plants[str(dst)] = {"kind": kind, "source": src}
            pool_rows.append(str(dst))
    rng.shuffle(pool_rows)
    lab.write_text("\n".join(lab_rows) + "\n")
    pool.write_text("\n".join(pool_rows) + "\n")
    cmap.write_text("".join(f"{i} {c}\n" for i, c in enumerate(classes)))
    (data / "plants.json").write_text(json.dumps({"plants": plants}))
    return {"plants": plants, "labeled": str(lab), "pool": str(pool), "class_map": str(cmap)}


def selection_precision(mined: Path, classes: list[str]) -> dict:
    """Per class: share of mined images whose (hidden) folder class is the assigned class."""
    hit, total = [0] * len(classes), [0] * len(classes)
    for line in mined.read_text().splitlines():
        line = line.split(" #", 1)[0].strip()
        if not line:
            continue
        path, label = line.rsplit(maxsplit=1)
        label = int(label)
        total[label] += 1
        hit[label] += Path(path).parent.name == classes[label]
    return {c: (hit[i] / total[i] if total[i] else None, total[i]) for i, c in enumerate(classes)}


def dedup_result(report: Path, plants: dict) -> dict:
    with open(report) as fh:
        removed = {row["pool_image"] for row in csv.DictReader(fh)}
    found = {k: 0 for k in ("exact", "resized40", "jpeg70", "crop90")}
    for p, info in plants.items():
        found[info["kind"]] += p in removed
    false_pos = [p for p in removed if p not in plants]
    return {"found": found, "planted_per_kind": PLANTS, "missed": sum(PLANTS - v for v in found.values()),
            "flagged_unplanted": len(false_pos), "flagged_unplanted_examples": false_pos[:5],
            "sweep": dedup_sweep(report, plants)}


def dedup_sweep(report: Path, plants: dict) -> list[dict]:
    """Planted copies found and unplanted pool images flagged at stricter thresholds than the
    run's (a subset of its report: each row holds both the pHash distance and the cosine)."""
    with open(report) as fh:
        rows = list(csv.DictReader(fh))
    out = []
    for bits in (2, 4, 6, 8):
        for cos in (0.99, 0.995, None):
            hit = [r for r in rows if int(r["phash_distance"]) <= bits or (cos and float(r["cosine"]) >= cos)]
            planted = sum(r["pool_image"] in plants for r in hit)
            out.append({"phash_bits": bits, "cosine": cos, "planted_found": planted,
                        "unplanted_flagged": len(hit) - planted})
    return out


def flag_montage(report: Path, plants: dict, png: Path, n: int = 32) -> None:
    """Random unplanted flagged pairs (pool image | val match) side by side, for a visual check."""
    from PIL import Image

    with open(report) as fh:
        rows = [r for r in csv.DictReader(fh) if r["pool_image"] not in plants]
    random.Random(0).shuffle(rows)
    rows, cols, cell = rows[:n], 8, 70
    sheet = Image.new("RGB", (cols * cell, -(-len(rows) // cols) * 36), "white")
    for i, r in enumerate(rows):
        x, y = (i % cols) * cell, (i // cols) * 36
        for j, path in enumerate((r["pool_image"], r["eval_image"])):
            sheet.paste(Image.open(path).convert("RGB").resize((32, 32)), (x + 33 * j, y))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(png)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--budget", type=int, default=150_000, help="training images seen by every arm")
    ap.add_argument("--top-k", type=int, default=2000)
    ap.add_argument("--teacher-epochs", type=int, default=40)
    ap.add_argument("--finetune-epochs", type=int, default=3)
    args = ap.parse_args()
    d = prepare_data()
    common = ["--data", d["labeled"], "-o", f"data.val={CIFAR}/val", "-o", f"data.class_map={d['class_map']}"]
    teacher = WORK / "resnet56"
    ensure_run("train", teacher, args.teacher_epochs, ["-c", "cifar/resnet56_teacher", *common])
    labeled = 10 * PER_CLASS
    ep_lab = max(args.budget // labeled, 1)
    every = ["-o", f"train.eval_every={max(ep_lab // 10, 1)}"]  # ~10 val passes per labeled-only arm
    arms = {}
    arms["baseline (labeled only)"] = ensure_run(
        "train", WORK / "baseline", ep_lab, ["-c", "cifar/resnet20_baseline", *common, *every])
    arms["KD (labeled only)"] = ensure_run(
        "distill", WORK / "kd", ep_lab, ["-c", "cifar/kd_resnet56_resnet20", *common, *every,
                                        "--teacher", str(teacher)])
    ssld_out = WORK / "ssld"
    ep_ssld = max(args.budget // (labeled + 10 * args.top_k), 1)
    if not (ssld_out / "ssld.md").is_file():
        kdistill("ssld", "-c", "cifar/resnet20_baseline", *common, "--teacher", str(teacher),
                 "--pool", d["pool"], "--top-k", str(args.top_k), "--dedup-against", f"{CIFAR}/val",
                 "--model", "resnet20", "--epochs", str(ep_ssld), "--finetune-epochs", str(args.finetune_epochs),
                 "--out", str(ssld_out), "--no-progress", log=WORK / "ssld.log")
    stages = json.loads((ssld_out / "summary.json").read_text())["stages"]
    arms["SSLD (labeled + mined, JS)"] = stages["distill (labeled + mined)"]
    arms["SSLD + fine-tune"] = stages["fine-tune (labeled)"]
    mined = ssld_out / "mine" / "mined.txt"
    # the same mined images with the loss of the labeled-only KD arm (label-free KL at T=4 on every
    # image, ce 0.1 on the labeled ones): separates the value of the data from that of the loss
    arms["SSLD data, KD loss (labeled + mined)"] = ensure_run(
        "distill", WORK / "ssld_kd", ep_ssld, ["-c", "cifar/kd_resnet56_resnet20", *common,
                                              "--teacher", str(teacher), "--unlabeled", str(mined)])
    pool_n = sum(1 for _ in open(d["pool"]))
    ep_ugi = max(round(args.budget / (labeled + pool_n)), 1)
    arms["SKL-UGI (labeled + whole pool, SKL)"] = ensure_run(
        "distill", WORK / "skl_ugi", ep_ugi, ["-c", "cifar/kd_resnet56_resnet20", *common,
                                             "--teacher", str(teacher), "--unlabeled", d["pool"],
                                             "-o", "distill.losses=[skl:1.0, ce:0.1]", "-o",
                                             "distill.loss_params={}"])
    classes = [ln.split(maxsplit=1)[1] for ln in Path(d["class_map"]).read_text().splitlines()]
    precision = selection_precision(mined, classes)
    report = next(iter(sorted(mined.parent.glob("mined.txt*dedup*.csv"))), None)
    dedup = dedup_result(report, d["plants"]) if report else {}
    if report:
        flag_montage(report, d["plants"], RESULTS / "ssld_dedup_flags.png")
    t = json.loads((teacher / "summary.json").read_text())
    result = {"date": today(), "machine": machine(), "budget": args.budget, "top_k": args.top_k,
              "teacher": t["best"], "arms": arms, "precision": precision, "dedup": dedup,
              "epochs": {"labeled": ep_lab, "ssld": ep_ssld, "skl_ugi": ep_ugi}}
    save_result("ssld", result)
    write_section(result)


def write_section(r: dict) -> None:
    base = r["arms"]["baseline (labeled only)"]["best"]["top1"]
    lines = [f"Measured {r['date']} on {r['machine']} by `python bench/ssld.py`.",
             f"CIFAR-10, 5,000 labeled images (500 per class), pool of 45,000 other train images plus "
             f"200 planted val copies; teacher resnet56 trained on the labeled set only (val top-1 "
             f"{r['teacher']['top1']:.4f}); student resnet20; every arm sees {r['budget']:,} training images "
             f"(epochs: labeled-only {r['epochs']['labeled']}, SSLD {r['epochs']['ssld']} + fine-tune, "
             f"SKL-UGI {r['epochs']['skl_ugi']}); top-{r['top_k']} per class.", "",
             "| arm | val top-1 | val MPA | vs baseline |", "|---|---|---|---|"]
    for name, s in r["arms"].items():
        b = s["best"]
        lines.append(f"| {name} | {b['top1']:.4f} | {b['mpa']:.4f} | {b['top1'] - base:+.4f} |")
    prec = [v for v, n in r["precision"].values() if v is not None]
    lines += ["", f"Teacher's selection precision (mined images whose hidden label is the assigned class): "
              f"mean {sum(prec) / max(len(prec), 1):.3f}; per class: " +
              ", ".join(f"{c} {v:.2f} ({n})" for c, (v, n) in r["precision"].items() if v is not None)]
    if r["dedup"]:
        dd = r["dedup"]
        lines += ["", f"Dedup of planted val copies ({dd['planted_per_kind']} per kind): found " +
                  ", ".join(f"{k} {v}" for k, v in dd["found"].items()) +
                  f"; missed {dd['missed']}; pool images flagged that were not planted: "
                  f"{dd['flagged_unplanted']} (CIFAR-10 train has near-copies of some val images; random "
                  "flagged pairs: ![flags](bench/results/ssld_dedup_flags.png)).", "",
                  "Stricter thresholds, from the same report (pHash distance <= bits, or teacher-embedding "
                  "cosine >= c):", "", "| pHash bits | cosine | planted found (of 200) | unplanted flagged |",
                  "|---|---|---|---|"]
        lines += [f"| {x['phash_bits']} | {x['cosine'] or 'off'} | {x['planted_found']} | {x['unplanted_flagged']} |"
                  for x in dd["sweep"]]
        lines += [""]
    update_section("ssld", "## SSLD with 10% labels (CIFAR-10)\n\n" + "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
