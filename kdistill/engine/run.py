"""From a validated config to a finished run folder: data, model, method, trainer."""
from __future__ import annotations

import datetime as _dt
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import distributed as dist
from ..config import Config, DataConfig, EvalConfig, TeacherRuntime, TrainConfig, resolve_workers
from ..console import log
from ..data.datasets import Splits, eval_dataset, open_splits, resolve_preprocessing, train_dataset
from ..data.loader import EpochLoader, eval_loader, make_mixer
from ..data.transforms import Preprocess, Preprocessing
from ..errors import UserError
from ..methods.base import Method
from ..methods.supervised import Supervised
from ..models import create_model, default_preprocessing
from ..models.checkpoint import meta_preprocessing, read_meta, resolve_checkpoint
from ..utils import atomic_write, ensure_writable_dir, resolve_device, seed_everything
from . import record
from .evaluate import EvalHook
from .trainer import Trainer


@dataclass
class RunContext:
    """Everything a method needs that does not depend on the method."""

    cfg: Config
    device: torch.device
    out: Path
    splits: Splits
    student: nn.Module
    preprocessing: Preprocessing
    record: dict | None = None  # what <out>/run.json says of this run (engine/record.py; rank 0)
    announce: Callable[[], None] | None = None  # logs the student line (models/describe.py)
    channels_last: bool = False  # model.channels_last, resolved for this machine

    @property
    def classes(self) -> list[str]:
        return self.splits.classes

    def student_prep(self) -> Preprocess:
        return Preprocess(self.preprocessing, self.channels_last).to(self.device)


def use_channels_last(setting: bool | str, model: nn.Module, device: torch.device, cfg: Config) -> bool:
    """``model.channels_last``: ``auto`` is on for a convolutional model on CUDA and on a CPU
    that autocasts to bf16, where issue 25's review measured it faster (resnet56 -> resnet20,
    bf16, 2-core AVX512: online KD 365 -> 452 img/s, the student alone 778 -> 878; not yet
    rerun with bench/speed.py); off for fp32 on a CPU."""
    if setting != "auto":
        return bool(setting)
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return False
    from .precision import resolve

    return device.type == "cuda" or resolve(device, cfg.train.amp, cfg.train.amp_dtype).dtype is torch.bfloat16


def run_folder(cfg: Config) -> Path:
    """``train.out``, else ``runs/<model>-<time>``, the time rank 0's: under torchrun call it
    on every rank, with the process group up (``cli.in_run_folder`` does)."""
    if cfg.train.out:
        return Path(cfg.train.out)
    stamp = dist.broadcast_object(_dt.datetime.now().strftime("%Y%m%d-%H%M%S"))
    return Path("runs") / f"{cfg.model.name.replace('/', '_').replace(':', '_')}-{stamp}"


def check_out(out: Path, resume: bool) -> None:
    """Refuse to overwrite a finished or interrupted run unless resuming it."""
    if not resume and (out / "last.pt").exists():
        raise UserError(f"'{out}' already holds a run; pass --resume to continue it, "
                        "or choose another --out")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out '{out}' exists and is not a folder")


def copy_checkpoints(src: Path, dst: Path) -> None:
    """Copy a finished stage's ``best``/``last.safetensors`` up to the folder of the whole
    run (ssld, born-again), atomically."""
    import shutil

    for name in ("best.safetensors", "last.safetensors"):
        if (src / name).is_file():
            atomic_write(dst / name, functools.partial(shutil.copyfile, src / name))


def run_stage(out: Path, cfg: Config, start: Callable[[bool], dict], name: str, what: str = "run") -> dict:
    """Reuse a finished run folder ``out``, resume an interrupted one, else start it.

    ``cfg`` is the stage's config: a finished or interrupted stage made with other settings
    or data is refused (:func:`record.check`, here or in :func:`prepare`). Returns ``out``'s summary when it
    finished ``cfg.train.epochs`` epochs, else ``start(resume)``, with ``resume`` true when
    ``out`` holds a checkpoint to continue. Under torchrun every rank takes rank 0's
    decision: a rank that reused while another trained would hang."""
    # a finished stage is checked here; an interrupted one by the run that resumes it (prepare)
    if dist.broadcast_object(dist.is_main() and (out / "summary.json").is_file()):
        record.check(out, cfg, what)
    done = None
    if dist.is_main() and (out / "summary.json").is_file():
        summary = json.loads((out / "summary.json").read_text())
        done = summary if summary.get("epochs") == cfg.train.epochs else None
    done, resume = dist.broadcast_object((done, (out / "last.pt").exists()))
    if done is not None:
        log(f"[{name}] reusing finished {what} {out}")
        return done
    return start(resume)


def prepare(cfg: Config) -> RunContext:
    """Device, process group, data splits, student and its preprocessing. Writes nothing."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = dist.init(resolve_device(cfg.train.device))
    if cfg.model.qat:  # the fake quantization must see what int8 runs: fp32 values
        if cfg.train.amp is True:
            raise UserError("--qat trains in fp32 (fake quantization of bf16/fp16 values is not what the "
                            "int8 model computes); drop --amp / train.amp=true")
        cfg.train.amp = False
    out = run_folder(cfg)
    check_out(out, cfg.train.resume)
    if not cfg.data.root and not cfg.data.train:
        raise UserError("no training data given; pass --data ROOT (a folder, list file or fashion-mnist)")
    rec = record.check(out, cfg, compare=cfg.train.resume and (out / "last.pt").is_file())
    seed_everything(cfg.train.seed)
    splits = open_splits(cfg.data)
    mc = cfg.model
    student = create_model(mc.name, len(splits.classes), pretrained=mc.pretrained,
                           checkpoint=mc.checkpoint, pretrained_path=mc.pretrained_path,
                           drop_rate=mc.drop_rate, qat=mc.qat)
    if mc.checkpoint:
        model_default = meta_preprocessing(read_meta(resolve_checkpoint(mc.checkpoint)))
    else:
        model_default = default_preprocessing(student, mc.pretrained, quiet=True)
    pp = resolve_preprocessing(cfg.data, splits, model_default)
    from ..models.describe import announce_student  # the one line: model, size, mean/std, crop

    # said when training starts, after every check that can stop the run (one line then)
    announce = functools.partial(announce_student, mc.name, student, pp, cfg.data, model_default,
                                 splits.native_size)
    student = student.to(device)
    channels_last = use_channels_last(mc.channels_last, student, device, cfg)
    if channels_last:
        student = student.to(memory_format=torch.channels_last)
    if mc.compile:
        student.compile()  # in place: parameter names (and checkpoints) stay those of the model
    return RunContext(cfg, device, out, splits, student, pp, rec, announce, channels_last)


def fit(ctx: RunContext, method: Method, meta: dict | None = None, eval_hook: EvalHook | None = None,
        crop_size: int | None = None, train_ds: Dataset | None = None) -> dict:
    """Build loaders for ``method`` and train; rank 0 writes ``<out>/config.yaml`` first.

    ``crop_size``: resolution of the training crops when it differs from the student's
    (e.g. a teacher at a higher resolution: each model resizes the same crop).
    ``train_ds``: a ready training set (e.g. replayable views) instead of the default one."""
    cfg, dc = ctx.cfg, ctx.cfg.data
    pin = ctx.device.type == "cuda"
    unlabeled = ctx.splits.unlabeled
    if (unlabeled is not None or dc.ignore_labels) and (dc.mixup > 0 or dc.cutmix > 0):
        raise UserError("mixup/cutmix mix labels, so they cannot be used with unlabeled images")
    if train_ds is None:
        train_ds = train_dataset(dc, ctx.splits.train, ctx.splits.native_size,
                                 crop_size or ctx.preprocessing.image_size, unlabeled)
    fraction = dc.unlabeled_fraction if unlabeled is not None else None
    workers, persistent = dc.num_workers(pin), dc.keep_workers(pin)
    loader = EpochLoader(train_ds, cfg.train.batch_size, workers, cfg.train.seed, pin, fraction,
                         persistent=persistent)
    val = None
    if ctx.splits.val is not None:
        val = eval_loader(eval_dataset(ctx.splits.val, ctx.preprocessing), cfg.eval.batch_size,
                          workers, pin, persistent)
    if ctx.announce is not None:
        ctx.announce()
    record.write(ctx.out, cfg, ctx.record)
    dist.barrier()
    trainer = Trainer(cfg, method.to(ctx.device), loader, val, ctx.device, ctx.out, ctx.classes,
                      ctx.preprocessing, make_mixer(dc, len(ctx.classes)), meta, eval_hook)
    return trainer.fit()


def train(cfg: Config) -> dict:
    """``kdistill train``: supervised training of ``cfg.model`` on ``cfg.data``."""
    if cfg.data.unlabeled or cfg.data.ignore_labels:
        raise UserError("training on unlabeled images needs a teacher: use kdistill distill")
    ctx = prepare(cfg)
    method = Supervised(ctx.student, ctx.student_prep(), cfg.data.label_smoothing, cfg.train.rdrop)
    try:
        return fit(ctx, method)
    finally:
        dist.cleanup()


def eval_dir(run_or_ckpt: str, checkpoint: Path, split: str, tta: bool = False,
             data: str | None = None) -> Path:
    """Where ``kdistill eval`` reports by default (and ``kdistill report`` caches): a run
    folder's ``eval-<split>[-tta]/``, or ``eval-<split>[-tta]-<stem>/`` beside a checkpoint file.

    That folder holds the results on the run's own data (``data.root`` of the
    ``config.yaml`` beside the checkpoint; without one, the data first evaluated there).
    Other ``data`` gets ``<folder>-<8 hex digits of its SHA-256>``, so evaluating on other
    data never overwrites them."""
    import hashlib

    import yaml

    name = f"eval-{split}{'-tta' if tta else ''}"
    base = checkpoint.parent / (name if Path(run_or_ckpt).is_dir() else f"{name}-{checkpoint.stem}")
    if not data:
        return base

    def key(root: str) -> str:  # the same data by any path that names it
        return str(Path(root).resolve()) if Path(root).exists() else str(root)

    own = None  # the run's training data, else the data of the results already there
    for read in (lambda: yaml.safe_load((checkpoint.parent / "config.yaml").read_text())["data"]["root"],
                 lambda: json.loads((base / "metrics.json").read_text())["data"]):
        try:
            own = read()
        except (OSError, ValueError, KeyError, TypeError, yaml.YAMLError):
            continue
        if own:
            break
    if not isinstance(own, str) or not own or key(own) == key(data):
        return base
    return base.with_name(f"{base.name}-{hashlib.sha256(key(data).encode()).hexdigest()[:8]}")


def evaluate_model(model: nn.Module, meta: dict, source, device: torch.device, tta: bool = EvalConfig.tta,
                   batch_size: int = EvalConfig.batch_size, workers: int = DataConfig.workers,
                   on_batch: Callable[[dict, torch.Tensor], None] | None = None, what: str = ""):
    """``kdistill eval``'s pass of a loaded checkpoint (``model``, ``meta``) over ``source``:
    its own preprocessing, fp32, ``batch_size`` images per forward. A split without one
    readable image (``what`` names it) is a :class:`UserError`."""
    from .evaluate import evaluate

    pp = meta_preprocessing(meta)
    cuda = device.type == "cuda"
    workers = resolve_workers(workers, cuda)
    loader = eval_loader(eval_dataset(source, pp), batch_size, workers, cuda)
    result = evaluate(model, Preprocess(pp).to(device), loader, meta["num_classes"], device, tta=tta,
                      on_batch=on_batch)
    if result.n == 0:
        raise UserError(f"no readable image in {what or source.name}")
    return result


def evaluate_run(run_or_ckpt: str, root: str, split: str = EvalConfig.split,
                 tta: bool = EvalConfig.tta, batch_size: int = EvalConfig.batch_size,
                 workers: int = DataConfig.workers, device: str = TrainConfig.device,
                 out: str | None = None, teachers: list[str] = (),
                 teacher_runtime: TeacherRuntime = "auto") -> tuple[dict, Path]:
    """``kdistill eval``: metrics of a checkpoint on one split, with a report folder (``out``,
    else :func:`eval_dir`: keyed by the data when it is not the run's own); with
    ``teachers``, also student-teacher agreement and mean KL to the (ensemble) teacher."""
    from ..data.datasets import open_eval_split
    from ..models.checkpoint import load_model
    from .evaluate import write_report

    dev = resolve_device(device)
    path = resolve_checkpoint(run_or_ckpt)
    report_dir = Path(out) if out else eval_dir(run_or_ckpt, path, split, tta, root)
    own_dir = eval_dir(run_or_ckpt, path, split, tta)
    if not out and report_dir != own_dir:  # other data: the run's own results stay
        log(f"'{root}' is not the data of {own_dir.name}/, which stays as it is: this report "
            f"goes to {report_dir}")
    if out:
        ensure_writable_dir(report_dir, "--report")
    else:
        ensure_writable_dir(report_dir, "the report folder", "pass --report DIR, a folder you can write to")
    model, meta = load_model(str(path), dev)
    source = open_eval_split(root, split, meta["classes"])
    hook = None
    if teachers:
        from ..data.datasets import first_images
        from ..methods.compiled import compile_teachers
        from ..methods.teachers import load_teachers
        from .evaluate import Agreement

        # teachers over class subsets are joined by their logits (merge=concat)
        teacher = load_teachers(teachers, meta["classes"], dev, merge="concat")
        compile_teachers(teacher, teacher_runtime, dev,
                         lambda: first_images(eval_dataset(source, teacher.preprocessing)), batch_size=batch_size)
        hook = Agreement(teacher.logits, len(source), meta["num_classes"], dev)
    result = evaluate_model(model, meta, source, dev, tta, batch_size, workers,
                            hook.update if hook else None, f"the '{split}' split of '{root}'")
    if hook:
        result.extra.update(hook.compute())
    summary = {**result.summary(), "split": split, "tta": tta, "checkpoint": str(path),
               "data": root}
    write_report(result, meta["classes"], report_dir, summary)
    return summary, report_dir
