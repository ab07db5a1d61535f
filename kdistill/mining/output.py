"""Where ``kdistill mine`` writes the selection: a PaddleClas list (``--out LIST``) or new
WebDataset shards (``--out wds:DIR``).

``--out LIST``: ``LIST`` holds ``path label  # p=0.9876`` lines (label = class index in the
teacher's class order, paths relative to LIST's folder), sorted by class then descending
probability; reports and the work folder sit beside it (``LIST.summary.json``, ...).

``--out wds:DIR``: ``DIR/unlabeled-NNNNNN.tar`` holds the selected images' original bytes
(copied, never re-encoded) in pool order, under the key ``<pool index, 9 digits>`` with the
teacher's class as ``cls``, and ``DIR/_info.json`` lists them (split ``unlabeled``), so
``data.unlabeled=wds:DIR`` streams them. Reports are ``DIR/mined.*``; ``DIR/mined.txt``
lists the selection (``key label  # p=... from <tar>#<key>``) in the order a list would.
A second pass reads only the pool shards that hold selected samples: each output tar is
written whole by one DataLoader worker (``--workers``; tar ``j`` holds the selection's
samples ``j * size ...`` in pool order, so which worker writes it changes nothing), into the
work folder and atomically, so a rerun writes only the missing ones; they are moved into
``DIR`` when all are there. The only output for a sharded pool: a list
cannot point into tar files.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..data import shards as wds
from ..errors import UserError
from ..utils import atomic_write_text, ensure_writable_dir, ensure_writable_file_parent, freeze_before_fork
from .pool import Pool, read_bytes

SPLIT = "unlabeled"
REPORT_STEM = "mined"
_TAR = re.compile(rf"^{SPLIT}-(\d+)\.tar$")
_MAGIC = ((b"\xff\xd8\xff", "jpg"), (b"\x89PNG", "png"), (b"GIF8", "gif"), (b"BM", "bmp"))


def sniff_ext(data: bytes, default: str) -> str:
    """The image format of encoded bytes, as a sample member extension."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return next((ext for magic, ext in _MAGIC if data.startswith(magic)), default)


class ListTarget:
    """``--out LIST``."""

    is_shards = False

    def __init__(self, out: str) -> None:
        if Path(out).is_dir():
            raise UserError(f"--out '{out}' is a folder; give the path of the list file to write "
                            "(or wds:DIR to write shards)")
        ensure_writable_file_parent(out, "--out")  # LIST and LIST.work/ go there
        self.out, self.base = out, out
        self.work = Path(f"{out}.work")

    def check_pool(self, pool: Pool) -> None:
        if pool.is_shards:
            raise UserError(f"--out '{self.out}' is a list file, which cannot point into the tar files of "
                            f"pool '{pool.spec}'; give --out wds:DIR to write the selected images as shards")

    def write(self, rows: list, info: dict, pool: Pool, classes: list[str], workers: int = 0) -> dict:
        out_dir = Path(self.out).resolve().parent
        lines = [f"{os.path.relpath(os.path.abspath(info[i][1]), out_dir)} {c}  # p={p:.4f}\n"
                 for i, c, p in rows]
        atomic_write_text(self.out, "".join(lines))
        return {"list": str(self.out)}


class ShardTarget:
    """``--out wds:DIR``."""

    is_shards = True

    def __init__(self, out: str, shard_size: int) -> None:
        self.out = out
        self.folder = Path(out[len(wds.PREFIX):])
        if not str(self.folder) or self.folder.is_file():
            raise UserError(f"--out '{out}' must name a folder for the shards (wds:DIR)")
        ensure_writable_dir(self.folder, "--out")
        self.base = str(self.folder / REPORT_STEM)
        self.work = self.folder / f"{REPORT_STEM}.work"
        ours = Path(f"{self.base}.summary.json").is_file() or self.work.is_dir()  # an earlier mine's output
        foreign = sorted(p.name for p in self.folder.iterdir()
                         if not ours or not (_TAR.match(p.name) or p.name == wds.INFO_FILE
                                             or p.name.startswith(REPORT_STEM + ".")))
        if foreign:
            raise UserError(f"--out '{out}' holds files that are not a mining output ('{foreign[0]}', ...); "
                            "give a new or empty folder")
        self.shard_size = shard_size

    def check_pool(self, pool: Pool) -> None:
        return None

    def _name(self, j: int) -> str:
        return f"{SPLIT}-{j:06d}.tar"

    def write(self, rows: list, info: dict, pool: Pool, classes: list[str], workers: int = 0) -> dict:
        order = sorted(rows)  # pool order (index), so each pool shard is read once
        size = self.shard_size
        n_out = math.ceil(len(order) / size)
        staging = self.work / "out"
        staging.mkdir(parents=True, exist_ok=True)
        complete = staging / "complete"
        if not complete.is_file():  # else killed while moving them: move the rest
            todo = [j for j in range(n_out) if not (staging / self._name(j)).is_file()]
            jobs = _CopyJobs([(j, order[j * size:(j + 1) * size]) for j in todo], info, pool, staging)
            procs = min(workers, len(todo))
            freeze_before_fork(procs)
            for done in DataLoader(jobs, batch_size=None, num_workers=procs):
                if done["error"]:
                    raise UserError(done["error"])
            atomic_write_text(complete, f"{n_out}\n")
        for j in range(n_out):  # all written: move them in (renames on one file system)
            if (staging / self._name(j)).is_file():
                os.replace(staging / self._name(j), self.folder / self._name(j))
        for p in self.folder.iterdir():  # tars of an earlier, larger selection
            m = _TAR.match(p.name)
            if m and int(m.group(1)) >= n_out:
                p.unlink()
        counts = {c: 0 for c in range(len(classes))}
        for _, c, _ in rows:
            counts[c] += 1
        lengths = [min(size, len(order) - j * size) for j in range(n_out)]
        entry = wds.split_entry(SPLIT, [self._name(j) for j in range(n_out)], lengths, counts, len(classes))
        keys = pool.split.image_keys if pool.is_shards else wds.IMAGE_KEYS
        wds.write_info(self.folder, {SPLIT: entry}, classes, name=REPORT_STEM,
                       image_key=";".join(dict.fromkeys((*keys, "jpg", "png", "webp", "gif", "bmp"))))
        listing = Path(f"{self.base}.txt")
        atomic_write_text(listing, "".join(f"{i:09d} {c}  # p={p:.4f} from {pool.describe(*info[i][:2])}\n"
                                           for i, c, p in rows))
        return {"shards": str(self.folder), "info": str(self.folder / wds.INFO_FILE), "list": str(listing)}


class _CopyJobs(IterableDataset):
    """Output tars to write, ``[(j, rows of tar j)]``: worker ``w`` of ``W`` writes jobs
    ``w::W`` and yields ``{"tar": j, "error": ""}`` for each (a UserError's message instead
    of raising it: a worker's exception would reach the user as a traceback)."""

    def __init__(self, jobs: list, info: dict, pool: Pool, staging: Path) -> None:
        self.jobs, self.info, self.pool, self.staging = jobs, info, pool, staging

    def __iter__(self):
        w = get_worker_info()
        for j, rows in self.jobs[w.id::w.num_workers] if w is not None else self.jobs:
            try:
                copy_tar(rows, self.info, self.pool, self.staging, j)
            except UserError as err:
                yield {"tar": j, "error": str(err)}
                return
            yield {"tar": j, "error": ""}


def copy_tar(rows: list, info: dict, pool: Pool, staging: Path, j: int) -> None:
    """Copy the bytes of ``rows`` (``(index, class, p)`` sorted by pool index) into tar ``j``."""
    label = {i: c for i, c, _ in rows}
    by_shard: dict[int, int] = {}
    for i, _, _ in rows:
        by_shard[info[i][0]] = by_shard.get(info[i][0], 0) + 1
    default = (pool.split.image_keys[0] if pool.is_shards else "jpg")
    writer = wds.ShardWriter(staging, SPLIT, len(rows), first=j)
    for shard in sorted(by_shard):
        found = 0
        try:
            for item in pool.items(shard):
                if item.index not in label:
                    continue
                data = read_bytes(item)
                if data is None:
                    raise UserError(f"pool image '{pool.describe(shard, item.key)}' has no encoded bytes "
                                    "to copy into a shard")
                writer.write(f"{item.index:09d}", data, label[item.index], sniff_ext(data, default))
                found += 1
                if found == by_shard[shard]:
                    break
        except wds.ShardError as err:
            raise UserError(f"pool shard '{err.url}' changed since it was scored ({err.reason}); "
                            "delete the work folder to mine again") from None
        if found != by_shard[shard]:
            raise UserError(f"pool shard {shard} of '{pool.spec}' no longer holds {by_shard[shard] - found} "
                            "of the images selected from it; delete the work folder to mine again")
    writer.close()


def open_target(out: str, shard_size: int) -> ListTarget | ShardTarget:
    return ShardTarget(out, shard_size) if wds.is_wds(out) else ListTarget(out)
