"""View 'fixed': the teacher's outputs on every training image's centre crop, computed once
before training and kept memory-mapped on disk in ``<out>/teacher-table/`` (the format is
:class:`kdistill.data.softlabels.TeacherTable`), never whole in memory: N x C fp16 is 2.6 GB
at ImageNet size (1.28M x 1000). ``distill.table_top_k`` keeps only each image's top k
probabilities, renormalised as the soft-label cache keeps them (60 bytes per image at k=10).

The table is reused, by a resumed or restarted run, while its manifest matches: the format,
``k``, the training data's fingerprint and the teacher (its description, preprocessing and the
SHA-256 of its weights as they run). A build removes the old manifest first, writes the
arrays under temporary names, renames them and writes the manifest last: a build killed
half-way leaves nothing that looks like a table, and the next run builds it again.

Under torchrun each rank scores its own images (whichever sampler the loader uses, as long
as batches carry ``index``) and appends their rows to part files of its own, keeping only the
indices in memory (8 bytes an image). Then, block by block of rows (``chunk_bytes`` of fp32),
each rank lays its rows of the block into zeros, with a count column, and the blocks are summed
onto rank 0 (:func:`kdistill.distributed.reduce_sum_to_main`), which alone writes the table:
no two processes write one file (memory-mapped rows of two ranks share pages, and a network
filesystem writes back whole pages). A row scored by several ranks is their mean; a row scored
by none (an unreadable image, skipped in training too) is zeros, or classes -1 in a top-k table.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .. import distributed as dist
from ..console import log
from ..data.softlabels import (TABLE_FORMAT, TeacherTable, fingerprint, table_files, topk_renormalised,
                               write_manifest)
from ..data.sources import Source

TABLE_DIR = "teacher-table"


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 of ``module``'s state (dtypes, shapes and bytes, in order): the teacher as it runs."""
    h = hashlib.sha256()
    for t in module.state_dict().values():
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def table_identity(teacher: nn.Module, source: Source, k: int) -> dict:
    """What a table must match to be reused: format, ``k`` (0: full logits), data, teacher."""
    ident = {"format": TABLE_FORMAT, "k": k,
             "data": {"n": len(source), "classes": list(source.classes), "fingerprint": fingerprint(source)},
             "teacher": {"describe": teacher.describe(), "preprocessing": teacher.preprocessing.to_dict(),
                         "sha256": weights_sha256(teacher)}}
    return json.loads(json.dumps(ident))  # as it reads back from the manifest


def _specs(ident: dict) -> dict[str, tuple[np.dtype, int]]:
    """The arrays' dtypes and widths: (N, C) float16 logits, or (N, k) float16 + int32."""
    k, c = ident["k"], len(ident["data"]["classes"])
    return {"probs": (np.dtype(np.float16), k), "index": (np.dtype(np.int32), k)} if k else \
        {"logits": (np.dtype(np.float16), c)}


def matches(folder: Path, ident: dict) -> bool:
    """Whether ``folder`` holds a complete table with identity ``ident``."""
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text())
        if any(m.get(key) != value for key, value in ident.items()):
            return False
        n = ident["data"]["n"]
        for name, p in table_files(folder, ident["k"]).items():
            a = np.load(p, mmap_mode="r")
            if a.shape != (n, _specs(ident)[name][1]) or a.dtype != _specs(ident)[name][0]:
                return False
    except (OSError, ValueError, KeyError):  # missing, half-written or damaged: build again
        return False
    return True


def _rows(logits: torch.Tensor, k: int) -> dict[str, np.ndarray]:
    """One batch's table rows: fp16 logits, or the top-k probabilities at T=1 and classes."""
    if not k:
        return {"logits": logits.half().cpu().numpy()}
    p, i = topk_renormalised(logits.float().softmax(-1), k)
    return {"probs": p.cpu().numpy(), "index": i.cpu().numpy().astype(np.int32)}


@torch.no_grad()
def ensure_table(folder: str | Path, ident: dict, loader: Iterable[dict],
                 score: Callable[[torch.Tensor], torch.Tensor], device: torch.device,
                 chunk_bytes: int = dist.REDUCE_CHUNK_BYTES) -> TeacherTable:
    """The table in ``folder``: reused when it matches ``ident`` on every rank, else built
    from ``loader``'s batches (``image``, ``index``; this rank's share) scored by ``score``
    (images -> logits). Every rank returns a reader of the same files."""
    folder = Path(folder)
    if all(dist.all_gather_object(matches(folder, ident))):
        log(f"view fixed: reusing the teacher table in {folder}")
        return TeacherTable(folder)
    n, k = ident["data"]["n"], ident["k"]
    if dist.is_main():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "manifest.json").unlink(missing_ok=True)
        for stale in folder.glob("part-*"):  # of a killed build, maybe at another world size
            stale.unlink()
    dist.barrier()
    log(f"view fixed: teacher outputs on {n} centre-cropped training images "
        f"({f'top {k} of ' if k else ''}{len(ident['data']['classes'])} classes) -> {folder}")
    specs = _specs(ident)
    tmp = {name: p.with_suffix(".partial.npy") for name, p in table_files(folder, k).items()}
    if dist.is_distributed():
        _fill_by_parts(folder, tmp, specs, n, k, loader, score, device, chunk_bytes)
    else:
        _fill(tmp, specs, n, k, loader, score)
    if dist.is_main():
        for name, p in table_files(folder, k).items():
            os.replace(tmp[name], p)
        shapes = {name: [n, w] for name, (_, w) in specs.items()}
        write_manifest(folder, {**ident, "shape": shapes, "dtype": {name: str(d) for name, (d, _) in specs.items()},
                                "created": _dt.datetime.now().isoformat(timespec="seconds")})
    dist.barrier()  # no rank reads the table before rank 0 has renamed it
    return TeacherTable(folder)


def _create(tmp: dict[str, Path], specs: dict, n: int) -> dict[str, np.memmap]:
    arrays = {name: np.lib.format.open_memmap(tmp[name], "w+", d, (n, w)) for name, (d, w) in specs.items()}
    if "index" in arrays:
        arrays["index"][:] = -1
    return arrays


def _fill(tmp: dict[str, Path], specs: dict, n: int, k: int, loader: Iterable[dict],
          score: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """One process: rows go straight into the memory-mapped arrays."""
    arrays = _create(tmp, specs, n)
    for batch in loader:
        if "image" in batch:
            idx = batch["index"].numpy()
            for name, rows in _rows(score(batch["image"]), k).items():
                arrays[name][idx] = rows
    for a in arrays.values():
        a.flush()


def _fill_by_parts(folder: Path, tmp: dict[str, Path], specs: dict, n: int, k: int, loader: Iterable[dict],
                   score: Callable[[torch.Tensor], torch.Tensor], device: torch.device, chunk_bytes: int) -> None:
    """Under torchrun: this rank's rows to its part files, then summed onto rank 0 by blocks."""
    rank = dist.rank()
    parts = {name: folder / f"part-{rank}.{name}.partial" for name in specs}
    seen: list[np.ndarray] = []
    files = {name: open(p, "wb") for name, p in parts.items()}  # noqa: SIM115 - closed below
    try:
        for batch in loader:
            if "image" in batch:
                seen.append(batch["index"].numpy().astype(np.int64))
                for name, rows in _rows(score(batch["image"]), k).items():
                    files[name].write(np.ascontiguousarray(rows, specs[name][0]).tobytes())
    finally:
        for fh in files.values():
            fh.close()
    own = np.concatenate(seen) if seen else np.zeros(0, np.int64)
    stored = {name: np.memmap(parts[name], d, "r", shape=(len(own), w)) if len(own) else np.zeros((0, w), d)
              for name, (d, w) in specs.items()}
    order = np.argsort(own, kind="stable")
    ordered = own[order]
    out = _create(tmp, specs, n) if dist.is_main() else None
    width = sum(w for _, w in specs.values())
    step = max(1, chunk_bytes // (4 * (width + 1)))
    for start in range(0, n, step):
        stop = min(n, start + step)
        lo, hi = np.searchsorted(ordered, [start, stop])
        pick = order[lo:hi]
        values = torch.ones(len(pick), width + 1)  # the last column counts the rank's rows
        col = 0
        for name, (_, w) in specs.items():
            values[:, col:col + w] = torch.from_numpy(np.asarray(stored[name][pick], np.float32))
            col += w
        block = torch.zeros(stop - start, width + 1).index_add_(0, torch.from_numpy(ordered[lo:hi] - start), values)
        total = dist.reduce_sum_to_main(block, device)
        if out is not None:
            count = total[:, -1:]
            mean = total[:, :-1] / count.clamp_min(1)
            col = 0
            for name, (d, w) in specs.items():
                part = mean[:, col:col + w]
                if name == "index":
                    part = torch.where(count > 0, part.round(), -1.0)
                out[name][start:stop] = part.numpy().astype(d)
                col += w
    if out is not None:
        for a in out.values():
            a.flush()
    del stored
    for p in parts.values():
        p.unlink()
