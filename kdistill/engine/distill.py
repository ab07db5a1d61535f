"""``kdistill distill``: a config section for distillation, building the method (teachers,
feature capture, adapters sized by a dry forward pass), and born-again generations."""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from .. import distributed as dist
from ..config import Config, TeacherRuntime, _check
from ..console import log
from ..errors import UserError
from ..losses import LOSSES, Shapes, build_loss
from ..data.datasets import eval_dataset, first_images
from ..data.softlabels import TeacherTable
from ..methods.compiled import compile_teachers
from ..methods.distill import Distill, LossBank, TermSpec
from ..methods.teachers import EmaTeacher, FrozenTeachers, StoredOutputs, TeacherSource, load_teachers
from ..models.hooks import FeatureCapture, pair_layers
from ..utils import resolve_device, write_json
from . import precision, record
from .evaluate import Agreement
from .run import RunContext, copy_checkpoints, fit, prepare, run_folder, run_stage, train


@dataclass
class DistillSection:
    """Teachers, loss terms and self-distillation."""

    teachers: list[str] = field(default_factory=list)  # run folders, checkpoints, NAME@FILE, model names
    teacher_weights: list[float] | None = None  # ensemble / merge weights (default equal)
    ensemble: Literal["prob", "logit"] = "prob"  # average probabilities or logits
    merge: Literal["subset", "concat"] = "subset"  # teachers over class subsets (methods/teachers.py)
    # name[:weight]; unset: kd:0.9 + ce:0.1, or KL alone (kd) for view funmatch (no labels)
    losses: list[str] | None = None
    loss_params: dict[str, dict[str, Any]] = field(default_factory=dict)  # e.g. {kd: {temperature: 4}}
    warmup_epochs: dict[str, int] = field(default_factory=dict)  # linear warm-up of a term's weight
    feature_pairs: list[str] = field(default_factory=list)  # 'student_layer:teacher_layer'
    self_distill: Literal["none", "ema", "born_again"] = "none"
    generations: int = 2  # born_again: students trained in sequence, each teaching the next
    self_start: float = 0.5  # ema: fraction of the epochs before the EMA teacher starts teaching
    self_decay: float = 0.999  # ema: per-step decay of the teacher's weights
    agreement: bool = True  # report student-teacher agreement on val every epoch
    view: Literal["consistent", "fixed", "independent", "funmatch"] = "consistent"  # see data/views.py
    soft_labels: str | None = None  # a kdistill cache folder: replay its views, load no teacher
    teacher_runtime: TeacherRuntime = "auto"  # auto | eager | onnx | compile (methods/compiled.py)
    # view fixed: keep each image's top-k teacher probabilities on disk (0: all logits; engine/table.py)
    table_top_k: int = 0

    def __post_init__(self) -> None:
        _check(self.generations >= 1, "distill.generations", "must be >= 1")
        _check(0 <= self.self_start < 1, "distill.self_start", "must be in [0, 1)")
        _check(0 < self.self_decay < 1, "distill.self_decay", "must be in (0, 1)")
        _check(self.table_top_k >= 0, "distill.table_top_k", "must be >= 0 (0 keeps all logits)")
        _check(not self.table_top_k or self.view == "fixed", "distill.table_top_k",
               "applies to view fixed only (the table of teacher outputs); add --view fixed or drop it")
        if self.losses is None:
            self.losses = ["kd:1.0"] if self.view == "funmatch" else ["kd:0.9", "ce:0.1"]
        _check(bool(self.losses), "distill.losses", "needs at least one loss (e.g. kd)")


@dataclass
class DistillConfig(Config):
    distill: DistillSection = field(default_factory=DistillSection)


def parse_terms(sd: DistillSection) -> list[TermSpec]:
    """``distill.losses`` as terms; a loss given twice, a weight after '=' or settings for an
    unknown loss are a :class:`UserError`."""
    for text in sd.losses:
        name, eq, weight = text.partition("=")
        if eq and ":" not in text:
            raise UserError(f"loss '{text}': the form is NAME:WEIGHT, e.g. --loss {name.strip()}:"
                            f"{weight.strip() or '0.9'} (a colon, not '=')")
    terms = [TermSpec.parse(t, sd.warmup_epochs) for t in sd.losses]
    names = [t.name for t in terms]
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup:
        raise UserError(f"loss '{dup}' is given twice; give each loss once with its weight")
    # settings for a known loss that is not in use are ignored, so `-c RECIPE --loss ce` works;
    # a name that is no loss at all is a typo
    for key, table in (("loss_params", sd.loss_params), ("warmup_epochs", sd.warmup_epochs)):
        unknown = [n for n in table if n not in LOSSES]
        if unknown:
            raise UserError(f"distill.{key} names unknown loss '{unknown[0]}'; see `kdistill list losses`")
    return terms


def build_teacher(ctx: RunContext, sd: DistillSection) -> TeacherSource | None:
    """The teacher the config names: frozen models, the EMA self-teacher, or None (a
    soft-label cache replays stored outputs; no teacher with label terms only). Teachers
    over class subsets are described in one line, with a warning for classes none covers."""
    terms = parse_terms(sd)  # a mistyped --loss fails before any teacher loads
    if sd.soft_labels:
        return None
    if sd.self_distill == "ema":
        if sd.teachers:
            raise UserError("distill.self_distill=ema teaches the student with itself; drop --teacher")
        return EmaTeacher(ctx.student, ctx.student_prep(), round(sd.self_start * ctx.cfg.train.epochs),
                          sd.self_decay)
    if not sd.teachers:
        if any(LOSSES.get(t.name).needs_teacher for t in terms):
            raise UserError("distill needs --teacher RUN_OR_CKPT (or --self-distill ema|born_again)")
        return None
    teacher = load_teachers(sd.teachers, ctx.classes, ctx.device, sd.teacher_weights, sd.ensemble,
                            sd.merge, ctx.channels_last)
    if teacher.merged:
        line, missing = teacher.coverage()
        log(line)
        if missing:
            names = ", ".join(ctx.classes[i] for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            labels = [str(t) for t in terms if not LOSSES.get(t.name).label_free and t.weight > 0]
            fate = (f"they learn from the labels alone ({', '.join(labels)})" if labels else
                    "no loss term uses labels, so the student learns nothing of them (add e.g. --loss ce:0.1)")
            log(f"warning: {len(missing)} of the student's {len(ctx.classes)} classes are covered by no "
                f"teacher ({names}): {fate}")
    return teacher


def build_method(ctx: RunContext, sd: DistillSection, teacher: TeacherSource | None) -> tuple[Distill, int]:
    """The Distill method and the training crop size (the largest model resolution).
    ``teacher`` runs on the batches, except that with a soft-label cache or view 'fixed' the
    method reads stored outputs (``teacher`` then fills the fixed table)."""
    terms = parse_terms(sd)
    specs = {t.name: LOSSES.get(t.name) for t in terms}
    families = {s.family for s in specs.values()}
    label_terms = [n for n, s in specs.items() if not s.label_free]
    if sd.view == "funmatch" and label_terms:
        raise UserError(f"view funmatch trains on the teacher alone (mixed images have no label); "
                        f"drop loss '{label_terms[0]}'")
    if (sd.soft_labels or sd.view == "fixed") and families - {"logits"}:
        raise UserError("feature and relation losses need the teacher's forward pass; with "
                        "--soft-labels or view fixed use logit losses (kd, js, dkd, ...)")
    need_feats, need_embed = "features" in families, "relations" in families
    if ctx.cfg.model.qat and (need_feats or need_embed):
        raise UserError("--qat trains the traced, fake-quantized student, whose layers feature and relation "
                        "losses cannot hook; use logit losses (kd, js, dkd, ...) with --qat")
    s_cap = None
    student, prep = ctx.student, ctx.student_prep()
    crop = max([prep.size] + ([teacher.size] if teacher is not None and teacher.size else []))
    if need_feats or need_embed:
        single = teacher.single if isinstance(teacher, FrozenTeachers) else None
        if single is None:
            raise UserError("feature and relation losses need exactly one teacher over the same "
                            "classes; use logit losses (kd, dkd, ...) for ensembles and merged teachers")
        pairs = pair_layers(student, single.model, sd.feature_pairs) if need_feats else []
        s_cap = FeatureCapture(student, [s for s, _ in pairs], need_embed, "the student")
        teacher.capture = FeatureCapture(single.model, [t for _, t in pairs], need_embed, "the teacher")
        if pairs:
            log("feature pairs (student:teacher): " + ", ".join(f"{s}:{t}" for s, t in pairs))
    shapes = dry_run(ctx, teacher, s_cap, crop)
    bank = LossBank({t.name: build_loss(t.name, shapes, **sd.loss_params.get(t.name, {})) for t in terms})
    if isinstance(teacher, FrozenTeachers) and not isinstance(teacher, EmaTeacher):  # config checked: compile
        tc = ctx.cfg.train
        compile_teachers(teacher, sd.teacher_runtime, ctx.device,
                         lambda: first_images(eval_dataset(ctx.splits.train, teacher.preprocessing)),
                         precision.resolve(ctx.device, tc.amp, tc.amp_dtype).dtype, tc.batch_size)
    if sd.soft_labels or sd.view == "fixed":
        origin = teacher.describe() if teacher is not None else [
            {"teacher": t, "soft_labels": sd.soft_labels} for t in sd.teachers or ["cache"]]
        teacher = StoredOutputs(origin)
    return Distill(student, prep, teacher, terms, bank.to(ctx.device), s_cap), crop


@torch.no_grad()
def dry_run(ctx: RunContext, teacher: TeacherSource | None, s_cap: FeatureCapture | None, crop: int) -> Shapes:
    """Shapes of captured features and embeddings from one forward of a 2-image batch."""
    shapes = Shapes(len(ctx.classes))
    if s_cap is None:
        return shapes
    x = torch.rand(2, 3, crop, crop, device=ctx.device)
    was = ctx.student.training
    ctx.student.eval()
    ctx.student(ctx.student_prep()(x))
    ctx.student.train(was)
    view = teacher.views({"image": x})[0]
    shapes.s_feats = [tuple(f.shape[1:]) for f in s_cap.features()]
    shapes.t_feats = [tuple(f.shape[1:]) for f in view.features]
    shapes.s_embed = 0 if s_cap.embed is None else int(s_cap.embed.shape[1])
    shapes.t_embed = 0 if view.embed is None else int(view.embed.shape[1])
    s_cap.clear()
    teacher.capture.clear()
    return shapes


def agreement_hook(ctx: RunContext, teacher: TeacherSource | None, sd: DistillSection) -> Agreement | None:
    """Student-teacher agreement on val, for a teacher that runs on images (``size``) and gives
    one view over all classes, and is not the student itself."""
    if (not sd.agreement or ctx.splits.val is None or teacher is None or teacher.size is None
            or isinstance(teacher, EmaTeacher) or teacher.per_teacher):
        return None
    return Agreement(teacher.logits, len(ctx.splits.val), len(ctx.classes), ctx.device)


def distill(cfg: DistillConfig, teacher: TeacherSource | None = None) -> dict:
    """Distil ``cfg.model`` from ``cfg.distill.teachers`` (or from itself, or a cache), or
    from ``teacher``, any :class:`TeacherSource` (then ``cfg.distill.teachers`` is unused)."""
    if cfg.distill.self_distill == "born_again" and teacher is None:
        return born_again(cfg)
    ctx = prepare(cfg)
    try:
        teacher = teacher.to(ctx.device) if teacher is not None else build_teacher(ctx, cfg.distill)
        method, crop = build_method(ctx, cfg.distill, teacher)
        train_ds = train_views(ctx, cfg.distill, teacher, crop)
        return fit(ctx, method, eval_hook=agreement_hook(ctx, teacher, cfg.distill), crop_size=crop,
                   train_ds=train_ds)
    finally:
        dist.cleanup()


def train_views(ctx: RunContext, sd: DistillSection, teacher: TeacherSource | None, crop: int):
    """The training set for the view mode, or None for the default (consistent) pipeline."""
    from ..data.datasets import train_dataset
    from ..data.softlabels import SoftLabels
    from ..data.views import ViewDataset, ViewSpec, WithTeacherOutputs
    from .cache import teacher_identity

    dc, seed = ctx.cfg.data, ctx.cfg.train.seed
    if sd.view == "consistent" and not sd.soft_labels:
        return None
    if ctx.splits.unlabeled is not None:
        raise UserError(f"view mode '{sd.view}' and soft-label caches do not mix with --unlabeled images")
    if dc.mixup > 0 or dc.cutmix > 0 or (dc.auto_augment != "none" and sd.view != "fixed"):
        raise UserError(f"view mode '{sd.view}' draws its own views; set data.mixup/cutmix=0 and "
                        "data.auto_augment=none (funmatch has its own mixup)")
    if sd.soft_labels:
        sha = "+".join(teacher_identity(t)["sha256"] for t in sd.teachers) if sd.teachers else None
        cache = SoftLabels(sd.soft_labels, ctx.splits.train, sha)
        spec = ViewSpec(**{**cache.manifest["view_spec"], "size": ctx.preprocessing.image_size})
        log(f"replaying {cache.views} cached view(s) from {sd.soft_labels} (k={cache.k}); no teacher loaded")
        return ViewDataset(ctx.splits.train, spec, cache.manifest["seed"], params=cache.params,
                           extras=cache.extras, views=cache.views)
    if sd.view == "fixed":
        if teacher is None or teacher.preprocessing is None:
            raise UserError("view fixed stores the outputs of a teacher that runs on images; give --teacher")
        if teacher.per_teacher:
            raise UserError("view fixed stores one distribution per image; teachers over class "
                            "subsets need -o distill.merge=concat")
        base = train_dataset(dc, ctx.splits.train, ctx.splits.native_size, ctx.preprocessing.image_size)
        return WithTeacherOutputs(base, teacher_table(ctx, teacher))
    spec = ViewSpec.from_data(dc, crop, ctx.splits.native_size, mix=sd.view == "funmatch")
    return ViewDataset(ctx.splits.train, spec, seed, independent=sd.view == "independent")


def teacher_table(ctx: RunContext, teacher: TeacherSource,
                  chunk_bytes: int = dist.REDUCE_CHUNK_BYTES) -> TeacherTable:
    """View 'fixed': the teacher's logits (or top ``distill.table_top_k`` probabilities) on every
    training image's centre crop, once, memory-mapped in ``<out>/teacher-table/`` and reused
    while the data and teacher match (engine/table.py). Under torchrun each rank scores a
    shard and rank 0 writes the table, summing ``chunk_bytes`` of fp32 rows at a time."""
    from ..data.datasets import eval_dataset
    from ..data.loader import eval_loader
    from .table import TABLE_DIR, ensure_table, table_identity

    k = ctx.cfg.distill.table_top_k
    k = min(k, len(ctx.classes)) if k else 0
    cuda = ctx.device.type == "cuda"
    loader = eval_loader(eval_dataset(ctx.splits.train, teacher.preprocessing), ctx.cfg.eval.batch_size,
                         ctx.cfg.data.num_workers(cuda), pin_memory=cuda)
    return ensure_table(ctx.out / TABLE_DIR, table_identity(teacher, ctx.splits.train, k), loader,
                        lambda x: teacher.logits(x.to(ctx.device)), ctx.device, chunk_bytes)


def narrow(cfg: Config, cls: type[Config]) -> Config:
    """``cfg`` as a ``cls``, a base class of its type: the sections other than ``cls``'s are
    dropped, so that the config.yaml a stage writes is one its own command reads back."""
    return cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cls)})


def born_again(cfg: DistillConfig) -> dict:
    """Born-again networks (Furlanello et al., ICML 2018): generation g+1 is distilled from
    generation g, each in ``<out>/gen<g>``; generation 1 learns from ``distill.teachers`` or,
    without one, from the labels alone. Finished generations are reused, an interrupted one
    resumed; the last generation's checkpoints are copied to ``<out>``. Under torchrun all
    generations share one process group and rank 0 alone writes the top-level files."""
    with dist.one_group(resolve_device(cfg.train.device)):
        return _born_again(cfg)


def _born_again(cfg: DistillConfig) -> dict:
    out = run_folder(cfg)
    # finished generations are reused only with the same settings; `kdistill distill -c
    # <out>/config.yaml` repeats every generation
    record.write(out, cfg, record.check(out, cfg, "born-again run", compare=record.has_work(out)))
    teachers = list(cfg.distill.teachers)
    rows = []
    for g in range(1, cfg.distill.generations + 1):
        gcfg = copy.deepcopy(cfg)
        gcfg.train.out = str(out / f"gen{g}")
        gcfg.distill.self_distill = "none"
        gcfg.distill.teachers = teachers

        # without a teacher, generation 1 is a plain `kdistill train` run, and its
        # config.yaml a train config (`kdistill train -c` refuses a distill section)
        stage = gcfg if teachers else narrow(gcfg, Config)

        def start(resume: bool) -> dict:  # called at once, within this iteration
            stage.train.resume = resume
            log(f"[gen{g}] {'distilling from ' + ', '.join(teachers) if teachers else 'training on labels'}")
            return distill(stage) if teachers else train(stage)

        summary = run_stage(out / f"gen{g}", stage, start, f"gen{g}", "generation")
        rows.append({"generation": g, "teacher": teachers[0] if teachers else None,
                     "best": summary.get("best", {})})
        teachers = [str(out / f"gen{g}")]
    if dist.is_main():
        copy_checkpoints(out / f"gen{cfg.distill.generations}", out)
        summary = {**summary, "out": str(out), "generations": rows}
        write_json(out / "summary.json", summary)
    dist.barrier()  # no rank returns before the run folder is complete
    return summary
