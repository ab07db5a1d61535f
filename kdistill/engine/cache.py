"""``kdistill cache``: run the teacher once over N augmented views of every training image
and store its top-k probabilities with the view parameters (see ``data/softlabels.py``).

Views are written one at a time (atomically renamed when complete), so a killed run
resumes at the first unfinished view. Under torchrun each rank scores a slice of every view.
"""
from __future__ import annotations

import datetime as _dt
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from .. import distributed as dist
from ..console import log, progress
from ..data.datasets import eval_dataset, first_images, open_splits
from ..data.loader import ShardSampler, collate
from ..data.softlabels import (FORMAT, fingerprint, read_manifest, topk_renormalised,
                               view_files, write_manifest)
from ..data.views import N_PARAMS, ViewDataset, ViewSpec
from ..errors import UserError
from ..methods.compiled import compile_teachers
from ..methods.teachers import TeacherSource, load_teachers
from ..models.checkpoint import resolve_checkpoint
from ..utils import ensure_writable_dir, file_sha256, resolve_device


def teacher_identity(spec: str) -> dict:
    """What a cache records about its teacher (the SHA-256 of its weights file, if any)."""
    path = Path(spec.split("@", 1)[1]) if "@" in spec else (resolve_checkpoint(spec) if Path(spec).exists() else None)
    return {"spec": spec, "sha256": file_sha256(path) if path else f"name:{spec}"}


def build_cache(cfg, views: int, k: int, out: str, mix: bool = False) -> dict:
    """Cache ``views`` views of ``cfg.data``'s training split for ``cfg.distill.teachers``;
    under torchrun in one process group, destroyed at the end."""
    with dist.one_group(resolve_device(cfg.train.device)) as device:
        return _build_cache(cfg, views, k, out, device, mix)


def _build_cache(cfg, views: int, k: int, out: str, device: torch.device, mix: bool) -> dict:
    if views <= 0:
        raise UserError("--views must be >= 1")
    if k <= 0:
        raise UserError("--top-k must be >= 1")
    if not cfg.distill.teachers:
        raise UserError("cache needs --teacher RUN_OR_CKPT")
    if cfg.data.auto_augment != "none":
        raise UserError("auto-augment views cannot be replayed from a cache; set data.auto_augment=none")
    root = ensure_writable_dir(out, "--out")
    splits = open_splits(cfg.data, need_val=False)
    src = splits.train
    teacher = load_teachers(cfg.distill.teachers, src.classes, device, cfg.distill.teacher_weights,
                            cfg.distill.ensemble, cfg.distill.merge)
    if teacher.per_teacher:
        raise UserError("a cache stores one distribution over the data's classes; teachers over "
                        "class subsets need -o distill.merge=concat")
    compile_teachers(teacher, cfg.distill.teacher_runtime, device,
                     lambda: first_images(eval_dataset(src, teacher.preprocessing)),
                     batch_size=cfg.eval.batch_size)
    size = teacher.size
    spec = ViewSpec.from_data(cfg.data, size, splits.native_size, mix)
    ident = {"teachers": [teacher_identity(t) for t in cfg.distill.teachers]}
    ident["sha256"] = "+".join(t["sha256"] for t in ident["teachers"])
    ident["spec"] = ",".join(cfg.distill.teachers)
    manifest = {"format": FORMAT, "teacher": ident, "k": min(k, len(src.classes)), "views": views,
                "seed": cfg.train.seed, "view_spec": spec.to_dict(),
                "data": {"root": cfg.data.root, "n": len(src), "classes": src.classes,
                         "fingerprint": fingerprint(src)},
                "done_views": [], "created": _dt.datetime.now().isoformat(timespec="seconds")}
    if (root / "manifest.json").is_file():
        old = read_manifest(root)
        same = {key: old.get(key) == manifest[key] for key in ("teacher", "k", "seed", "view_spec", "data")}
        if not all(same.values()):
            bad = next(key for key, ok in same.items() if not ok)
            raise UserError(f"'{root}' holds a cache with another {bad.replace('_', ' ')}; choose another --out")
        manifest["done_views"] = [v for v in old["done_views"] if v < views]
        manifest["created"] = old["created"]
        if manifest["done_views"]:
            log(f"resuming: {len(manifest['done_views'])} of {views} views done")
    if dist.is_main():
        root.mkdir(parents=True, exist_ok=True)
        write_manifest(root, manifest)
    ds = ViewDataset(src, spec, cfg.train.seed, with_params=True)
    for v in range(views):
        if v in manifest["done_views"]:
            continue
        _cache_view(ds, v, views, teacher, manifest["k"], root, device, cfg)
        manifest["done_views"] = sorted(manifest["done_views"] + [v])
        if dist.is_main():
            write_manifest(root, manifest)
    n_bytes = sum(p.stat().st_size for v in range(views) for p in view_files(root, v).values())
    manifest["bytes_per_image"] = n_bytes / len(src)
    if dist.is_main():
        write_manifest(root, manifest)
    return manifest


@torch.no_grad()
def _cache_view(ds: ViewDataset, v: int, views: int, teacher: TeacherSource, k: int, root: Path,
                device: torch.device, cfg) -> None:
    n = len(ds)
    files = view_files(root, v)
    tmp = {key: p.with_suffix(".partial.npy") for key, p in files.items()}
    rank, world = dist.rank(), dist.world_size()
    if dist.is_main():
        np.lib.format.open_memmap(tmp["probs"], "w+", np.float16, (n, k))
        index = np.lib.format.open_memmap(tmp["index"], "w+", np.int32, (n, k))
        index[:] = -1
        index.flush()
        np.lib.format.open_memmap(tmp["params"], "w+", np.float32, (n, N_PARAMS))
    dist.barrier()
    arrays = {key: np.load(p, mmap_mode="r+") for key, p in tmp.items()}
    ds.set_epoch(v)
    cuda = device.type == "cuda"
    loader = DataLoader(ds, batch_size=cfg.eval.batch_size, sampler=ShardSampler(n, rank, world),
                        num_workers=cfg.data.num_workers(cuda), collate_fn=collate, pin_memory=cuda)
    bar = progress(len(loader), f"view {v + 1}/{views}", cfg.train.progress)
    for batch in loader:
        bar.update(1)
        if "image" not in batch:
            continue
        idx = batch["index"].numpy()
        probs = teacher.logits(batch["image"].to(device)).float().softmax(-1)
        p, i = topk_renormalised(probs, k)
        arrays["probs"][idx] = p.cpu().numpy()
        arrays["index"][idx] = i.cpu().numpy().astype(np.int32)
        arrays["params"][idx] = batch["params"].numpy()
    bar.close()
    for a in arrays.values():
        a.flush()
    dist.barrier()
    if dist.is_main():
        for key in files:
            os.replace(tmp[key], files[key])
    log(f"view {v + 1} cached")
