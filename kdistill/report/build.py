"""``kdistill report``: from run folders or checkpoints to one self-contained HTML page.

Order: read every run's files and check them (cheap; bad input stops here), open the data,
then per run evaluate (or read the cached probabilities), measure cost, and finally render
and write the page atomically, so a failure never leaves a half-written report.
"""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .. import __version__
from ..config import DataConfig, EvalConfig, TrainConfig
from ..console import log
from ..errors import UserError
from ..models.checkpoint import load_model
from ..models.profile import machine
from ..utils import atomic_write_text, ensure_writable_file_parent, resolve_device
from . import gather, measure


@dataclass
class RunReport:
    """Everything the page shows about one run."""

    run: gather.Run
    scores: measure.Scores
    cost: dict
    calibration: dict
    log: list[dict] | None
    provenance: dict
    vs_teacher: dict = field(default_factory=dict)  # agreement, kl_to_teacher
    disagree: list[int] = field(default_factory=list)

    def row(self) -> dict:
        """The comparison table's row (fractions, ms, bytes, seconds; None: not available)."""
        r, lat = self.scores.result, self.cost["latency"]
        return {"name": self.run.name, "role": self.run.role, "arch": self.run.meta["arch"],
                "top1": r.top1, "top5": r.top5, "mpa": r.mpa, "n": r.n,
                "params": self.cost["params"], "mflops": self.cost["mflops"],
                "eager_ms_b1": lat["torch_eager"].get("1"), "eager_ms_b32": lat["torch_eager"].get("32"),
                "ort_ms_b1": lat.get("onnxruntime", {}).get("1"), "ort_ms_b32": lat.get("onnxruntime", {}).get("32"),
                "checkpoint_bytes": self.provenance["bytes"], "agreement": self.vs_teacher.get("agreement"),
                "kl_to_teacher": self.vs_teacher.get("kl_to_teacher"), "ece": self.calibration["ece"],
                "train_seconds": gather.training_seconds(self.log), "precision": self.run.meta.get("precision"),
                "cached": self.scores.cached}


@dataclass
class ExportReport:
    """What the page shows about one exported file (``--export``)."""

    export: gather.Export
    scores: measure.Scores
    latency: dict[str, float]
    source: gather.Run | None  # the report's run it was exported from
    vs_teacher: dict = field(default_factory=dict)
    vs_source: dict = field(default_factory=dict)

    def row(self) -> dict:
        """The exports table's row (fractions, ms, bytes; None: not available)."""
        r, m = self.scores.result, self.export.meta
        return {"name": self.export.name, "path": str(self.export.path), "arch": m["arch"],
                "precision": self.export.precision, "format": m.get("format", "onnx"),
                "source": self.source.name if self.source else m.get("checkpoint"),
                "top1": r.top1, "top5": r.top5, "mpa": r.mpa, "n": r.n,
                "agreement": self.vs_teacher.get("agreement"), "source_agreement": self.vs_source.get("agreement"),
                "ort_ms_b1": self.latency.get("1"), "ort_ms_b32": self.latency.get("32"),
                "bytes": self.export.bytes}


def open_runs(specs: list[str], teacher: str | None) -> tuple[list[gather.Run], gather.Run | None, list[str]]:
    """The report's runs (teacher first when it was not among them), named and checked to
    share one class set."""
    runs: list[gather.Run] = []
    for spec in specs:
        r = gather.open_run(spec)
        if all(r.checkpoint.resolve() != o.checkpoint.resolve() for o in runs):
            runs.append(r)
    t, notes = gather.choose_teacher(runs, teacher)
    if t is not None and t not in runs:
        runs.insert(0, t)
    gather.name_runs(runs)
    gather.check_classes(runs)
    return runs, t, notes


def measure_run(run: gather.Run, teacher: gather.Run | None, source, fingerprint: str, labels: torch.Tensor,
                device: torch.device, split: str, tta: bool, batch_size: int, workers: int,
                bench_seconds: float, with_onnx: bool) -> RunReport:
    model, _ = load_model(str(run.checkpoint), device)
    scores = measure.score(run, model, source, labels, fingerprint, device, split, tta, batch_size, workers)
    log(f"[report] {run.name}: top-1 {scores.result.top1:.4f} on {scores.result.n} {split} images"
        f"{' (cached probabilities)' if scores.cached else ''}; measuring latency")
    cost = measure.cost(run, model, bench_seconds, with_onnx)
    train_log = gather.training_log(run)
    if train_log is None:
        run.notes.append("no training log (metrics.jsonl) beside the checkpoint: no training curves or time")
    return RunReport(run, scores, cost, measure.calibration(scores, labels), train_log,
                     gather.provenance(run, teacher))


def measure_export(export: gather.Export, runs: list[RunReport], teacher: RunReport | None, source, split: str,
                   tta: bool, batch_size: int, workers: int, bench_seconds: float) -> ExportReport:
    """An exported file's accuracy on the report's data (ONNX Runtime), its agreement with
    the teacher and with the run it was exported from, and its latency."""
    scores = measure.score_export(export, source, split, tta, batch_size, workers)
    origin = export.source([rep.run for rep in runs])
    rep = ExportReport(export, scores, measure.export_latency(export, bench_seconds), origin)
    if teacher is not None:
        rep.vs_teacher = measure.compare(scores, teacher.scores)
    own = next((r for r in runs if r.run is origin), None)
    if own is not None:
        rep.vs_source = measure.compare(scores, own.scores)
    log(f"[report] export {export.name} ({export.precision}): top-1 {scores.result.top1:.4f} on "
        f"{scores.result.n} {split} images")
    return rep


def build_report(specs: list[str], data: str, out: str | Path, split: str = EvalConfig.split,
                 tta: bool = EvalConfig.tta, teacher: str | None = None, device: str = TrainConfig.device,
                 batch_size: int = EvalConfig.batch_size, workers: int = DataConfig.workers,
                 bench_seconds: float = 0.5, exports: list[str] = ()) -> dict:
    """Write the report of ``specs`` (run folders or checkpoints) and ``exports`` (.onnx
    files) on ``split`` of ``data`` to ``out``; returns ``{"out": path, "rows": comparison
    table rows, "exports": exports table rows}``."""
    from ..data.datasets import IndexedShards, open_eval_split
    from ..data.shards import ShardSplit
    from ..data.softlabels import fingerprint as data_fingerprint
    from .page import render

    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out '{out}' is a folder; give a file name, e.g. {out / 'report.html'}")
    ensure_writable_file_parent(out, "--out")
    if not specs:
        raise UserError("report needs at least one RUN_OR_CKPT")
    if bench_seconds <= 0:
        raise UserError("--bench-seconds must be > 0")
    runs, teacher_run, notes = open_runs(specs, teacher)
    files = [gather.open_export(spec, runs[0].meta["classes"]) for spec in dict.fromkeys(exports)]
    gather.name_exports(files)
    missing = measure.onnxruntime_missing()
    if files and missing:
        raise UserError(f"--export needs ONNX Runtime to run the exported files: {missing}")
    dev = resolve_device(device)
    source = open_eval_split(data, split, runs[0].meta["classes"])
    fp = data_fingerprint(source)
    images = IndexedShards(source) if isinstance(source, ShardSplit) else source  # the grid's thumbnails
    labels = torch.as_tensor(images.labels, dtype=torch.long)
    if missing:
        notes.append(missing)
    reports = [measure_run(r, teacher_run, source, fp, labels, dev, split, tta, batch_size, workers,
                           bench_seconds, missing is None) for r in runs]
    t_rep = next((rep for rep in reports if rep.run is teacher_run), None)
    for rep in reports:
        if t_rep is not None and rep is not t_rep:
            rep.vs_teacher = measure.compare(rep.scores, t_rep.scores)
            rep.disagree = measure.disagreements(rep.scores, t_rep.scores)
    export_reports = [measure_export(f, reports, t_rep, source, split, tta, batch_size, workers, bench_seconds)
                      for f in files]
    context = {
        "title": f"kdistill report: {', '.join(r.name for r in runs)}", "split": split, "tta": tta,
        "data": data, "n_images": len(source), "fingerprint": fp, "classes": list(source.classes),
        "teacher": t_rep, "notes": notes, "version": __version__, "machine": machine(),
        "date": _dt.datetime.now().isoformat(timespec="seconds"), "bench_seconds": bench_seconds,
        "threads": reports[0].cost["threads"], "ort": missing is None,
        "exports": [rep.row() for rep in export_reports],
    }
    html = render(reports, images, context)
    atomic_write_text(out, html)
    return {"out": str(out), "rows": [rep.row() for rep in reports], "exports": context["exports"]}
