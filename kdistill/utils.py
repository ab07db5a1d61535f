"""Small shared helpers: atomic file writes, output checks, JSON lines, file hashes, error
messages, seeding, device choice."""
from __future__ import annotations

import hashlib
import json
import math
import os
import random
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    A crash half-way leaves the previous file intact (never a truncated one). The file gets
    the mode ``open`` would give it under the umask (0644 under umask 022), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes it 0600: give it a new file's mode
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def umask() -> int:
    """The process's umask, read without changing it where Linux says it (``os.umask`` sets
    it too, which another thread creating a file at that moment would see)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_PROBE = ".kdistill-write-check-"


def ensure_writable_dir(path: str | Path, what: str = "--out",
                        fix: str = "choose a folder you can write to") -> Path:
    """Create folder ``path`` (and its parents) and check a file can be written in it.

    Commands call this before any expensive work, so an output location that cannot be
    created or written (under a regular file, no permission, read-only file system...)
    ends with one :class:`UserError` line at once instead of a traceback hours later.
    The folder stays (the command writes there next); the probe file does not. ``what``
    names the location in the message (e.g. the flag that set it), ``fix`` says what to do.
    """
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=_PROBE, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        from .errors import UserError

        raise UserError(f"{what} '{path}' cannot be created or written ({_why_unwritable(path, err)}); "
                        f"{fix}") from None
    return path


def ensure_writable_file_parent(path: str | Path, what: str = "--out") -> Path:
    """:func:`ensure_writable_dir` for the folder of output file ``path`` (named in the error)."""
    path = Path(path)
    ensure_writable_dir(path.parent, f"the folder of {what} '{path}':",
                        "choose a file in a folder you can write to")
    return path


def _why_unwritable(path: Path, err: OSError) -> str:
    """The reason, in words: a regular file in the way, else the system's message."""
    for p in (path, *path.parents):
        if os.path.lexists(p):
            if not p.is_dir():
                return f"'{p}' is a file, not a folder"
            break
    name = path if err.filename and Path(err.filename).name.startswith(_PROBE) else err.filename
    return f"{err.strerror}: '{name}'" if name else (err.strerror or str(err))


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def atomic_write(path: str | Path, writer: Callable[[Path], Any]) -> None:
    """Atomically write ``path`` with ``writer(tmp_path)`` (e.g. ``torch.save``)."""
    with atomic_path(path) as tmp:
        writer(tmp)


def json_safe(obj: Any) -> Any:
    """``obj`` with every NaN or infinite float (also inside dicts, lists and tuples) made
    None: JSON has no NaN, and most parsers refuse Python's ``NaN`` / ``Infinity``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def dumps_json(obj: Any, indent: int | None = None) -> str:
    """Strict JSON text of ``obj``: non-finite floats become ``null`` (:func:`json_safe`)."""
    return json.dumps(json_safe(obj), indent=indent, allow_nan=False)


def write_json(path: str | Path, obj: Any) -> None:
    """``obj`` as strict JSON (non-finite floats as ``null``), written atomically."""
    atomic_write_text(path, dumps_json(obj, indent=2) + "\n")


def append_jsonl(path: str | Path, obj: Any) -> None:
    with open(path, "a") as fh:
        fh.write(dumps_json(obj) + "\n")


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters) for a one-line
    error report; the exception's type when it has no message."""
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:200]


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy (timm's mixup draws from it) and torch."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        from .errors import UserError

        raise UserError(f"device '{name}' requested but CUDA is not available; use --device cpu")
    return dev


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def freeze_before_fork(workers: int) -> None:
    """Before DataLoader workers fork from this process: move every object alive now into
    the garbage collector's permanent generation (``gc.freeze``), which no collection scans.
    A full collection, in this process or in a worker, writes to the header of every object
    it scans, and each write turns a page the workers share with this process into a private
    copy: mining a pool measured a one-time step of ~64 MiB in each of the three processes
    once the first full collection ran (bench/scale.py mine). Objects freed by reference
    counting still are; only reference cycles among the frozen ones stay."""
    if workers > 0:
        import gc

        gc.freeze()
