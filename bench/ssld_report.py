"""bench/ssld.py's measurements and tables: mining precision, dedup of planted copies, the arms
(mean ± std over seeds, last epoch) and what they say about SSLD's claim."""
from __future__ import annotations

import csv
import json
import random
from pathlib import Path

from common import RESULTS, fmt_mean_std, machine, mean_std, save_result, today, update_section

KINDS = ("exact", "resized40", "jpeg70", "crop90")
TARGET_GAIN, TARGET_PRECISION = 0.05, 0.9


# ------------------------------------------------------------------ mining and dedup

def read_mined(mined: Path) -> list[tuple[str, int, float]]:
    """``(absolute path, class, teacher prob)`` per row of a mined list."""
    rows = []
    for line in mined.read_text().splitlines():
        body, _, comment = line.partition("#")
        if not body.strip():
            continue
        path, label = body.rsplit(maxsplit=1)
        prob = float(comment.strip()[2:]) if comment.strip().startswith("p=") else float("nan")
        rows.append((str((mined.parent / path).resolve()), int(label), prob))
    return rows


def mining_record(mined: Path, plants: dict) -> dict:
    """Selection precision against B's hidden labels (class folders), planted copies left out;
    how many planted val copies got through dedup into the list."""
    summary = json.loads(Path(f"{mined}.summary.json").read_text())
    classes = list(summary["per_class"])
    planted = {str(Path(p).resolve()) for p in plants}
    hit, total, through = [0] * len(classes), [0] * len(classes), 0
    for path, c, _ in read_mined(mined):
        if path in planted:
            through += 1
            continue
        total[c] += 1
        hit[c] += Path(path).parent.name == classes[c]
    return {"top_k": summary["top_k"], "pool_size": summary["pool_size"], "selected": summary["selected"],
            "duplicates_removed": summary["duplicates_removed"], "planted_selected": through,
            "mean_prob": summary["mean_prob"], "precision": sum(hit) / max(sum(total), 1),
            "per_class": {c: (hit[i] / total[i] if total[i] else None, total[i]) for i, c in enumerate(classes)}}


def dedup_result(report: Path, plants: dict, per_kind: int) -> dict:
    with open(report) as fh:
        rows = list(csv.DictReader(fh))
    removed = {r["pool_image"] for r in rows}
    found = {k: sum(p in removed for p, info in plants.items() if info["kind"] == k) for k in KINDS}
    unplanted = [p for p in removed if p not in plants]
    sweep = []
    for bits in (2, 4, 6, 8):
        for cos in (0.99, 0.995, None):
            hit = [r for r in rows if int(r["phash_distance"]) <= bits or (cos and float(r["cosine"]) >= cos)]
            n = sum(r["pool_image"] in plants for r in hit)
            sweep.append({"phash_bits": bits, "cosine": cos, "planted_found": n, "unplanted_flagged": len(hit) - n})
    return {"found": found, "planted_per_kind": per_kind, "missed": len(plants) - sum(found.values()),
            "flagged_unplanted": len(unplanted), "flagged_unplanted_examples": unplanted[:5], "sweep": sweep}


def flag_montage(report: Path, plants: dict, n: int = 32) -> None:
    """Random unplanted flagged pairs (pool image | val match) side by side, for a visual check."""
    from PIL import Image

    with open(report) as fh:
        rows = [r for r in csv.DictReader(fh) if r["pool_image"] not in plants]
    if not rows:
        return
    random.Random(0).shuffle(rows)
    rows, cols, cell = rows[:n], 8, 70
    sheet = Image.new("RGB", (cols * cell, -(-len(rows) // cols) * 36), "white")
    for i, r in enumerate(rows):
        x, y = (i % cols) * cell, (i // cols) * 36
        for j, path in enumerate((r["pool_image"], r["eval_image"])):
            sheet.paste(Image.open(path).convert("RGB").resize((32, 32)), (x + 33 * j, y))
    RESULTS.mkdir(parents=True, exist_ok=True)
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(RESULTS / "ssld_dedup_flags.png")


# ------------------------------------------------------------------ arms

def arm_rows(r: dict) -> list[tuple[str, str, str, str, int | None]]:
    """(label, stage name without its seed, which record, schedule key, seed or None: all) per row."""
    k, rows = r["settings"]["top_k"], [
        ("labeled-only baseline (ce)", "baseline", "", "labeled", None),
        ("labeled-only KD (0.9 kd at T = 4 + 0.1 ce)", "kd", "", "labeled", None)]
    rows += [(f"SSLD, k = {k}: JS on labeled + mined, then fine-tune on labeled", f"ssld-k{k}", "", f"k{k}", None),
             ("  the same before its fine-tune", f"ssld-k{k}", "distill_stage", f"k{k}", None),
             (f"SSLD, k = {k}, KL at T = 4 instead of JS, then fine-tune (kdistill ssld's default since issue 16)",
              f"ssld-kl-k{k}", "", f"k{k}", None),
             ("  the same before its fine-tune", f"ssld-kl-k{k}", "distill_stage", f"k{k}", None),
             ("SKL-UGI: labeled + all of B, no mining (skl + 0.1 ce)", "skl-ugi", "", "skl-ugi", None)]
    rows += [(f"top-k sweep: SSLD (KL at T = 4 + fine-tune), k = {kk}, seed 0", f"ssld-kl-k{kk}", "", f"k{kk}", 0)
             for kk in sorted(r["settings"]["sweep"])]
    rows += [("reference: the baseline recipe with B's labels revealed (all 50,000 labels, ce only)", "oracle", "", "oracle", 0)]
    long = r["settings"].get("long_budget")
    if long:
        rows += [(f"long schedule, {long:,} images: labeled-only KD, seed 0", "kd-long", "", "labeled-long", 0),
                 (f"long schedule, {long:,} images: SSLD, k = {k}, KL at T = 4 + fine-tune, seed 0",
                  f"ssld-kl-long-k{k}", "", f"k{k}-long", 0)]
    return rows


def seeds_of(r: dict, prefix: str, part: str = "", only: int | None = None) -> dict[int, dict]:
    out = {}
    for name, rec in r["runs"].items():
        stem, _, seed = name.rpartition("-s")
        if stem == prefix and rec is not None and seed.isdigit() and only in (None, int(seed)):
            out[int(seed)] = rec[part] if part else rec
    return out


def top1s(r: dict, prefix: str, part: str = "") -> list[float]:
    return [v["top1"] for _, v in sorted(seeds_of(r, prefix, part).items())]


def planned(r: dict, prefix: str) -> int:
    return sum(1 for name in r["runs"] if name.rpartition("-s")[0] == prefix)


def pts(x: float) -> str:
    return f"{100 * x:+.1f} points"


def verdict(r: dict) -> list[str]:
    """What the seeded arms say about the claim, by the issue's target, for each SSLD loss:
    JS (the paper's, and kdistill ssld's default before issue 16) and KL at T = 4."""
    k = r["settings"]["top_k"]
    lines = []
    for loss, prefix in (("KL at T = 4", f"ssld-kl-k{k}"), ("JS", f"ssld-k{k}")):
        lines += claim(r, loss, prefix)
    base, kd = top1s(r, "baseline"), top1s(r, "kd")
    if len(base) == r["settings"]["seeds"] and kd:
        mb, mk = mean_std(base)[0], mean_std(kd)[0]
        lines.append(f"Against the labeled-only baseline ({fmt_mean_std(base)}): labeled-only KD {pts(mk - mb)}"
                     + "".join(f", SSLD ({loss}) + fine-tune {pts(mean_std(v)[0] - mb)}" for loss, v in
                               (("KL", top1s(r, f"ssld-kl-k{k}")), ("JS", top1s(r, f"ssld-k{k}"))) if v) + ".")
    return lines


def claim(r: dict, loss: str, prefix: str) -> list[str]:
    """One SSLD arm (``prefix``) against labeled-only KD over the seeds."""
    n = r["settings"]["seeds"]
    kd, ssld = top1s(r, "kd"), top1s(r, prefix)
    name = f"SSLD ({loss}) + fine-tune"
    if len(kd) < n or len(ssld) < n:
        done = f"{len(kd)} of {n} labeled-only KD runs and {len(ssld)} of {n} {name} runs have finished"
        if kd and ssld:
            return [f"**{name}: cannot tell yet.** {done}; so far {name} − labeled-only KD = "
                    f"{pts(sum(ssld) / len(ssld) - sum(kd) / len(kd))}, a provisional figure."]
        return [f"**{name}: cannot tell yet.** {done}."]
    (mk, sk), (ms, ss) = mean_std(kd), mean_std(ssld)
    d, spread = ms - mk, (sk or 0) + (ss or 0)
    head = (f"{name} − labeled-only KD = {pts(d)} on the {n}-seed means "
            f"(spread: the two standard deviations add up to {100 * spread:.1f} points; target +5 points).")
    if d >= TARGET_GAIN and d > spread:
        return [f"**{name}: supports SSLD's claim.** {head}"]
    if d > spread:
        return [f"**{name}: a gain, smaller than claimed.** {head} It falls short of the target "
                f"by {100 * (TARGET_GAIN - d):.1f} points."]
    if d < -spread:
        return [f"**{name}: contradicts the claim here.** {head} The unlabeled images, used this way, lose to "
                "distilling on the labeled images alone, by more than the seed spread."]
    return [f"**{name}: cannot tell.** {head} The difference is within the seed spread."]


def pointers(r: dict) -> list[str]:
    """Single-seed arms against the main arm's seed 0: loss, data, mining, k."""
    k, out = r["settings"]["top_k"], []
    ref = seeds_of(r, f"ssld-k{k}").get(0)
    kl = seeds_of(r, f"ssld-kl-k{k}").get(0)
    if ref and kl:
        out.append(f"Loss, same mined data (seed 0): KL at T = 4 {kl['top1']:.4f} after fine-tune "
                   f"({kl['distill_stage']['top1']:.4f} before) vs JS {ref['top1']:.4f} "
                   f"({ref['distill_stage']['top1']:.4f} before).")
    ugi = seeds_of(r, "skl-ugi").get(0)
    if ugi and (ref or kl):
        out.append(f"Data: all of B without mining (SKL-UGI: symmetric KL at T = 1 + 0.1 ce, no fine-tune) "
                   f"{ugi['top1']:.4f} vs mined top-{k} + fine-tune: "
                   + ", ".join(f"{name} {v['top1']:.4f}" for name, v in (("KL at T = 4", kl), ("JS", ref)) if v)
                   + " (seed 0).")
    sweep = [(kk, seeds_of(r, f"ssld-kl-k{kk}").get(0)) for kk in sorted(r["settings"]["sweep"])]
    if all(v for _, v in sweep):
        out.append("Top-k sweep (seed 0, KL at T = 4 + fine-tune): " + ", ".join(f"k = {kk}: {v['top1']:.4f}" for kk, v in sweep) + ".")
    spread = [mean_std(v)[1] for v in (top1s(r, p) for p in ("baseline", "kd", f"ssld-k{k}", f"ssld-kl-k{k}"))
              if len(v) > 1]
    if out and spread:
        out.append(f"These are single runs; the 3-seed arms' standard deviations ({', '.join(f'{100 * s:.1f}' for s in spread)} "
                   "points) say how far apart two of them must be to mean anything.")
    kd0, kl_long, kd_long = seeds_of(r, "kd").get(0), seeds_of(r, f"ssld-kl-long-k{k}").get(0), seeds_of(r, "kd-long").get(0)
    if kd0 and kl and kl_long and kd_long:
        s = r["settings"]
        out.append(f"Schedule (seed 0): at {s['budget']:,} images SSLD (KL) − labeled-only KD = "
                   f"{pts(kl['top1'] - kd0['top1'])} ({kl['top1']:.4f} vs {kd0['top1']:.4f}); at "
                   f"{s['long_budget']:,} images {pts(kl_long['top1'] - kd_long['top1'])} "
                   f"({kl_long['top1']:.4f} vs {kd_long['top1']:.4f}).")
    mined = r["runs"].get(f"mine-k{k}")
    if mined:
        ok = "meets" if mined["precision"] >= TARGET_PRECISION else f"misses by {TARGET_PRECISION - mined['precision']:.3f}"
        out.append(f"Selection precision at k = {k}: {mined['precision']:.3f} against B's hidden labels "
                   f"(target ≥ {TARGET_PRECISION}: {ok}).")
    return out


def table(r: dict) -> list[str]:
    ref = {}  # labeled-only KD's mean at each budget: the long pair is compared within itself
    for prefix in ("kd", "kd-long"):
        t = top1s(r, prefix)
        ref[prefix] = sum(t) / len(t) if t else None
    lines = ["| arm | seeds | val top-1, last epoch | val MPA | vs labeled-only KD at the same budget | "
             "agreement with teacher | "
             "images seen | epochs x steps x batch | precision | train min/run |", "|---|---|---|---|---|---|---|---|---|---|"]
    for label, prefix, part, sched, only in arm_rows(r):
        recs = [v for _, v in sorted(seeds_of(r, prefix, part, only).items())]
        n = 1 if only is not None else planned(r, prefix)
        if not recs:
            lines.append(f"| {label} | 0 of {n} | pending | | | | | {r['schedules'].get(sched, 'after mining')} | | |")
            continue
        t1 = [v["top1"] for v in recs]
        agree = [v["agreement"] for v in recs if v.get("agreement") is not None]
        base = "kd-long" if "-long" in prefix else "kd"
        diff = f"{pts(sum(t1) / len(t1) - ref[base])}" if ref[base] is not None and prefix != base else "-"
        images = sorted({v["images"] for v in recs})
        prec = sorted({p for v in recs for p in v["precision"]})
        minutes = sum(v["train_seconds"] for v in recs) / len(recs) / 60
        lines.append(f"| {label} | {len(recs)} of {n} | {fmt_mean_std(t1)} | {fmt_mean_std([v['mpa'] for v in recs])} | "
                     f"{diff} | {fmt_mean_std(agree) if agree else '-'} | {', '.join(f'{i:,}' for i in images)} | "
                     f"{r['schedules'].get(sched, '')} | {', '.join(prec)} | {minutes:.0f} |")
    return lines


def seed_table(r: dict) -> list[str]:
    k, n = r["settings"]["top_k"], r["settings"]["seeds"]
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in range(n)) + " |", "|---|" + "---|" * n]
    for label, prefix in (("baseline", "baseline"), ("KD", "kd"), (f"SSLD k = {k} (JS) + fine-tune", f"ssld-k{k}"),
                          (f"SSLD k = {k} (KL, T = 4) + fine-tune", f"ssld-kl-k{k}")):
        got = seeds_of(r, prefix)
        lines.append(f"| {label} | " + " | ".join(f"{got[s]['top1']:.4f}" if s in got else "pending"
                                                    for s in range(n)) + " |")
    return lines


def mining_table(r: dict) -> list[str]:
    lines = ["| k per class | selected | of pool | planted copies selected | precision (hidden labels) | "
             "worst class | mean teacher prob |", "|---|---|---|---|---|---|---|"]
    for name, m in sorted(r["runs"].items()):
        if name.startswith("mine-k") and m:
            worst = min(((c, v) for c, (v, _) in m["per_class"].items() if v is not None), key=lambda cv: cv[1])
            lines.append(f"| {m['top_k']} | {m['selected']:,} | {m['pool_size']:,} | {m['planted_selected']} | "
                         f"{m['precision']:.3f} | {worst[0]} {worst[1]:.2f} | {m['mean_prob']:.3f} |")
    return lines


def dedup_lines(dd: dict) -> list[str]:
    total = dd["planted_per_kind"] * len(KINDS)
    lines = [f"Dedup of planted val copies ({dd['planted_per_kind']} per kind, in the mining pool): found " +
             ", ".join(f"{k} {v}" for k, v in dd["found"].items()) + f"; missed {dd['missed']}; pool images "
             f"flagged that were not planted: {dd['flagged_unplanted']} (CIFAR-10 train holds near-copies of some "
             "val images; random flagged pairs: ![flags](bench/results/ssld_dedup_flags.png)). Stricter "
             "thresholds, from the same report (pHash distance <= bits, or teacher-embedding cosine >= c):", "",
             f"| pHash bits | cosine | planted found (of {total}) | unplanted flagged |", "|---|---|---|---|"]
    lines += [f"| {x['phash_bits']} | {x['cosine'] or 'off'} | {x['planted_found']} | {x['unplanted_flagged']} |"
              for x in dd["sweep"]]
    return lines


def write_outputs(r: dict, no_write: bool) -> None:
    r = {"date": today(), "machine": machine(), **r}
    s, t = r["settings"], r["teacher"]
    done = [v for n, v in r["runs"].items() if v is not None]
    dates = sorted(v["finished"] for v in done if "finished" in v)
    when = f"runs finished {dates[0]} to {dates[-1]}" if dates else "no run finished yet"
    teacher = (f"val top-1 {t['top1']:.4f} at its last epoch, which is the checkpoint used; precision "
               f"{', '.join(t['precision'])}" if t else "pending")
    lines = [f"Written {r['date']} ({when}, {len(done)} of {len(r['runs'])} stages done) on {r['machine']} by "
             f"`python bench/ssld.py`; runs cached in `{r['cache']}` (rerun the script to continue).", "",
             f"Setting (issue 16, the paper's): CIFAR-10 train split into stratified halves A and B "
             f"({r['n_pool']:,} each). Teacher resnet20 trained on all of A with labels, {s['teacher_epochs']} epochs "
             f"({teacher}). Student resnet8 with {s['per_class']} labels per class ({r['n_labeled']:,}, a subset of A); "
             f"B is the unlabeled pool (labels hidden, never seen by the teacher; {4 * s['plants']} planted val copies "
             "added for mining). Every arm trains "
             f"{r['steps']:,} steps of {s['batch_size']} images = {r['steps'] * s['batch_size']:,} images "
             f"(budget {s['budget']:,}, fine-tuning included; 'images seen' is counted from each run's metrics)"
             + (f", except the long pair: {r['long_steps']:,} steps = {r['long_steps'] * s['batch_size']:,} images. "
                if r.get("long_steps") else ". ") +
             "Accuracy is the last epoch's on CIFAR-10 val (5,000 images); no checkpoint or setting is chosen on "
             "val (SSLD stages evaluate only at their end, so the fine-tune starts from the distill stage's last "
             "weights). Seeds change initialisation and batch order, not the data split.", ""]
    lines += table(r) + [""] + seed_table(r) + [""]
    lines += [x for v in verdict(r) for x in (v, "")]
    point = pointers(r)
    if point:
        lines += ["What the other arms point to:", ""] + [f"- {p}" for p in point] + [""]
    lines += mining_table(r) + [""]
    if r["dedup"]:
        lines += dedup_lines(r["dedup"]) + [""]
    text = "## SSLD: unlabeled images for a student with few labels (CIFAR-10)\n\n" + "\n".join(lines)
    print(text, flush=True)
    if not no_write:
        save_result("ssld", r)
        update_section("ssld", text)
