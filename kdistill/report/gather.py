"""What a report's runs say about themselves, before anything is evaluated: checkpoint
metadata, the teacher to compare with, the training log (``metrics.jsonl``) and provenance.

Everything here reads files only, so bad input (a folder that is not a run, a damaged
checkpoint, runs trained on other class sets) stops the report before any model runs.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from pathlib import Path

from ..deploy.card import read_config
from ..errors import UserError
from ..models.checkpoint import read_meta, resolve_checkpoint
from ..utils import file_sha256 as _file_sha256

#: ``metrics.jsonl`` keys under ``train.`` that are bookkeeping, not loss terms
NOT_LOSSES = {"train.images_per_s", "train.seconds", "train.skipped"}
#: what a checkpoint records as its teacher when no model file taught it: an EMA of the student
#: itself, a soft-label cache without a named teacher
SOURCE_KINDS = {"self-ema", "cache"}


def file_sha256(path: Path) -> str:
    """A checkpoint's SHA-256, hashed once per report: a teacher is matched against the runs
    and named in each student's provenance (a large teacher is then read once, not per student)."""
    st = Path(path).stat()
    return _hashed(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _hashed(path: str, mtime_ns: int, size: int) -> str:
    return _file_sha256(path)


@dataclass
class Run:
    """One model of the report: a run folder (its best checkpoint) or a checkpoint file."""

    spec: str  # as given on the command line
    checkpoint: Path
    meta: dict
    sha256: str
    name: str = ""
    role: str = "student"  # or "teacher"
    notes: list[str] = field(default_factory=list)

    @property
    def folder(self) -> Path:
        return self.checkpoint.parent

    @property
    def is_run(self) -> bool:
        """Does the checkpoint sit in its training run folder (config or training log)?"""
        return (self.folder / "metrics.jsonl").is_file() or (self.folder / "config.yaml").is_file()

    @property
    def recorded_teachers(self) -> list[str]:
        """The frozen teachers the checkpoint says it was distilled from (run folders,
        checkpoints or model names; not an EMA self-teacher or a soft-label cache)."""
        specs = [t.get("teacher") for t in self.meta.get("teachers") or [] if isinstance(t, dict)]
        return [s for s in specs if isinstance(s, str) and (s not in SOURCE_KINDS or Path(s).exists())]


def open_run(spec: str) -> Run:
    """A :class:`Run` from a run folder or checkpoint; :class:`UserError` when it is neither."""
    path = resolve_checkpoint(spec)
    meta = read_meta(path)
    for key in ("arch", "num_classes", "classes", "preprocessing"):
        if key not in meta:
            raise UserError(f"checkpoint '{path}' lacks '{key}' in its metadata; is it damaged?")
    return Run(spec, path, meta, file_sha256(path))


def name_runs(runs: list[Run]) -> None:
    """Short unique names: the run folder's name (a checkpoint file's stem), with parent
    folders prepended while two names collide."""
    def label(r: Run, depth: int) -> str:
        base = r.folder if r.checkpoint.stem in ("best", "last") else r.checkpoint.with_suffix("")
        return "/".join(base.resolve().parts[-depth:])

    depth = 1
    while depth < 8 and len({label(r, depth) for r in runs}) < len(runs):
        depth += 1
    for r in runs:
        r.name = label(r, depth)


def check_classes(runs: list[Run]) -> list[str]:
    """The class list all runs share; :class:`UserError` naming two runs that differ."""
    first = runs[0]
    for r in runs[1:]:
        if r.meta["classes"] != first.meta["classes"]:
            how = ("the same classes in another order" if sorted(r.meta["classes"]) == sorted(first.meta["classes"])
                   else f"{_classes(first)} vs {_classes(r)}")
            raise UserError(f"runs trained on different class sets: '{first.spec}' and '{r.spec}' "
                            f"({how}); report runs trained on the same data")
    return list(first.meta["classes"])


def _classes(r: Run) -> str:
    names = r.meta["classes"]
    return f"{len(names)} classes: {', '.join(names[:4])}{', ...' if len(names) > 4 else ''}"


def _same_place(recorded: str, run: Run) -> bool:
    """Does the teacher ``recorded`` in a checkpoint (a path as typed at training time,
    maybe relative to another working folder) name ``run``?"""
    rec = Path(recorded)
    if rec.exists():
        try:
            return resolve_checkpoint(recorded).resolve() == run.checkpoint.resolve() or \
                file_sha256(resolve_checkpoint(recorded)) == run.sha256
        except UserError:
            return False
    trained_at = Path(run.meta.get("run") or run.folder.resolve())
    tail = [p for p in rec.parts if p not in (".", "")]
    return bool(tail) and list(trained_at.parts[-len(tail):]) == tail


def choose_teacher(runs: list[Run], teacher: str | None) -> tuple[Run | None, list[str]]:
    """The teacher for agreement, KL and the plot marker: ``teacher`` (``--teacher``), else
    the one recorded in the students' checkpoints. It is one of ``runs`` (marked) or a new
    :class:`Run` the caller adds. Returns it (None when there is none) and notes."""
    notes: list[str] = []
    if teacher:
        t = open_run(teacher)
        match = next((r for r in runs if r.sha256 == t.sha256), None)
        chosen = match or t
    else:
        recorded = list(dict.fromkeys(s for r in runs for s in r.recorded_teachers))
        if not recorded:
            return None, ["no teacher: no run records one and no --teacher was given, so the report "
                          "has no agreement, KL or per-class comparison with a teacher"]
        spec = recorded[0]
        if len(recorded) > 1:
            notes.append(f"the runs record {len(recorded)} teachers ({', '.join(recorded)}); "
                         f"compared with the first, {spec} (choose with --teacher)")
        chosen = next((r for r in runs if _same_place(spec, r)), None)
        if chosen is None:
            if not Path(spec).exists():
                return None, notes + [f"the recorded teacher '{spec}' is not here (a model name, or a path "
                                      "from another folder): pass --teacher RUN_OR_CKPT to compare with it"]
            chosen = open_run(spec)
    chosen.role = "teacher"
    return chosen, notes


def training_log(run: Run) -> list[dict] | None:
    """The rows of ``metrics.jsonl`` beside the checkpoint (one per epoch, resumed runs
    included), or None when there is none (a bare checkpoint). Unreadable lines are skipped."""
    path = run.folder / "metrics.jsonl"
    if not path.is_file():
        return None
    rows = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and "epoch" in row:
            rows.append(row)
    return rows


def training_seconds(log: list[dict] | None) -> float | None:
    """Training time: ``train.seconds`` summed over every logged epoch (so a resumed run
    counts all its sessions)."""
    if not log:
        return None
    return float(sum(row.get("train.seconds") or 0.0 for row in log))


def loss_terms(log: list[dict]) -> list[str]:
    """The ``train.*`` loss terms a log holds (``train.loss`` first)."""
    keys = dict.fromkeys(k for row in log for k in row if k.startswith("train.") and k not in NOT_LOSSES)
    return sorted(keys, key=lambda k: (k != "train.loss", k))


def rerun_command(run: Run, config: dict | None) -> str | None:
    """A command that trains the run again from its own config.yaml (the command line
    itself is not recorded): ``kdistill ssld | distill | train -c RUN/config.yaml``."""
    if config is None:
        return None
    cmd = "ssld" if config.get("ssld") else "distill" if config.get("distill") else "train"
    return f"kdistill {cmd} -c {run.folder / 'config.yaml'} -o train.out=NEW_FOLDER"


def provenance(run: Run, teacher: Run | None) -> dict:
    """What made ``run``: config, a command that re-runs it, its teacher, versions, dates."""
    m = run.meta
    config = read_config(run.folder / "config.yaml") if run.is_run else None
    teachers = []
    for spec in run.recorded_teachers:
        sha = teacher.sha256 if teacher is not None and teacher is not run and _same_place(spec, teacher) else None
        if sha is None and Path(spec).exists():
            try:
                sha = file_sha256(resolve_checkpoint(spec))
            except UserError:
                sha = None
        teachers.append({"spec": spec, "sha256": sha})
    return {
        "checkpoint": str(run.checkpoint), "sha256": run.sha256, "bytes": run.checkpoint.stat().st_size,
        "arch": m["arch"], "epoch": m.get("epoch"), "method": m.get("method"), "losses": m.get("losses"),
        "teachers": teachers, "created": m.get("created"), "trained_with": m.get("kdistill_version"),
        "precision": m.get("precision"), "cpu_capability": m.get("cpu_capability"),
        "data": ((config or {}).get("data") or {}).get("root"), "command": rerun_command(run, config),
        "config": config,
    }


@dataclass
class Export:
    """An exported model (``--export FILE``): an ONNX file with kdistill metadata."""

    path: Path
    meta: dict
    name: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def precision(self) -> str:
        return self.meta.get("precision") or "fp32"  # files exported before int8 existed are fp32

    @property
    def bytes(self) -> int:
        return self.path.stat().st_size

    def source(self, runs: list[Run]) -> Run | None:
        """The report's run whose checkpoint this file was exported from, if any."""
        ckpt = self.meta.get("checkpoint")
        if not ckpt:
            return None
        return next((r for r in runs if str(r.checkpoint.resolve()) == str(Path(ckpt).resolve())), None)


def open_export(spec: str, classes: list[str]) -> Export:
    """An :class:`Export` from an ``.onnx`` file written by ``kdistill export``; a
    :class:`UserError` for a missing file, another format, no kdistill metadata, or classes
    other than the runs'."""
    from ..deploy.runtime import detect_format, read_export_meta

    path = Path(spec)
    if path.is_dir() or not path.is_file():
        raise UserError(f"--export '{spec}' is not a file; give an .onnx file written by `kdistill export`")
    if detect_format(spec) != "onnx":
        raise UserError(f"--export '{spec}' is not an ONNX file; the report runs exports with ONNX Runtime "
                        "(export with --format onnx)")
    meta = read_export_meta(spec)
    if list(meta["classes"]) != list(classes):
        raise UserError(f"--export '{spec}' has other classes than the runs ({len(meta['classes'])} classes: "
                        f"{', '.join(meta['classes'][:4])}{', ...' if len(meta['classes']) > 4 else ''}); "
                        "report exports of models trained on the same data")
    return Export(path, meta)


def name_exports(exports: list[Export]) -> None:
    """File names, with parent folders prepended while two collide."""
    depth = 1
    while depth < 8 and len({"/".join(e.path.resolve().parts[-depth:]) for e in exports}) < len(exports):
        depth += 1
    for e in exports:
        e.name = "/".join(e.path.resolve().parts[-depth:])
