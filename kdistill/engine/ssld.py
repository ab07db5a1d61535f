"""``kdistill ssld``: PaddleClas's SSLD recipe in one command, stage by stage.

1. ``mine``: the teacher scores the unlabeled pool, near-copies of the evaluation images are
   removed, the top-k images per class are kept (``<out>/mine/mined.txt``; for a sharded
   pool, ``wds:DIR``, new shards in ``<out>/mine/shards``, which the next stage streams as
   ``data.unlabeled=wds:<out>/mine/shards``).
2. ``distill``: the student learns from labeled + mined images with label-free terms
   (``<out>/distill``); by default KL at T = 4, not SSLD's JS divergence at T = 1, which lost
   11 points to it at an equal budget in ``bench/ssld.py`` (``--loss js`` runs the paper's).
3. ``finetune``: the distilled student is fine-tuned on the labeled set only, optionally
   at a higher resolution (``<out>/finetune``).

Every stage is skipped when finished and resumed when interrupted; a table of the stages'
val metrics closes the run (``<out>/ssld.md``, ``<out>/summary.json``).
"""
from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed as dist
from ..config import _check
from ..console import log
from ..errors import UserError
from ..mining import MineConfig, mine
from ..utils import atomic_write_text, resolve_device, write_json
from .distill import DistillConfig, DistillSection, distill, narrow, parse_terms
from . import record
from .run import copy_checkpoints, run_folder, run_stage


@dataclass
class SSLDSection(MineConfig):
    """The SSLD recipe's pool, mining and fine-tuning settings. The mining settings are
    :class:`~kdistill.mining.MineConfig`'s fields (top_k, min_prob, phash_threshold,
    embed_threshold, shard_size, keep_work), with its defaults and checks; only batch_size
    and workers default to the run's own."""

    batch_size: int | None = None  # mining batch; None: eval.batch_size
    workers: int | None = None  # mining DataLoader workers; None: data.workers
    pool: str = ""  # folder (recursive), list file or wds:DIR / wds:PATTERN shards of unlabeled images
    dedup_against: list[str] = field(default_factory=list)  # default: the data's val (and test)
    unlabeled_fraction: float | None = None  # share of mined images per batch (None: by counts)
    # distill stage: KL at T = 4 (Hinton's KD, no labels), not the paper's JS at T = 1, which
    # lost 11 points to it in bench/ssld.py (BENCHMARKS.md, SSLD); `--loss js` gives the JS recipe
    losses: list[str] = field(default_factory=lambda: ["kd:1.0"])
    # the distill stage's per-loss parameters; distill.loss_params entries override them
    loss_params: dict[str, dict[str, Any]] = field(default_factory=lambda: {"kd": {"temperature": 4.0}})
    finetune_epochs: int = 2
    finetune_lr: float = 0.01
    finetune_losses: list[str] = field(default_factory=lambda: ["ce:1.0"])
    finetune_image_size: int | None = None  # e.g. a higher resolution than distillation

    def _name(self, key: str) -> str:  # errors name the config key, not a `mine` flag
        return f"config key 'ssld.{key}'"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.finetune_epochs >= 0, "ssld.finetune_epochs", "must be >= 0")
        _check(self.finetune_lr > 0, "ssld.finetune_lr", "must be > 0")

    def mine_config(self, cfg: DistillConfig) -> MineConfig:
        """The mine stage's settings: this section's, with the run's ``eval.batch_size`` and
        ``data.workers`` where ``batch_size`` and ``workers`` are unset."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(MineConfig)}
        if self.batch_size is None:
            values["batch_size"] = cfg.eval.batch_size
        if self.workers is None:
            values["workers"] = cfg.data.num_workers(resolve_device(cfg.train.device).type == "cuda")
        return MineConfig(**values)


@dataclass
class SSLDConfig(DistillConfig):
    ssld: SSLDSection = field(default_factory=SSLDSection)


def _stage(cfg: DistillConfig, out: Path, name: str) -> dict:
    def start(resume: bool) -> dict:
        cfg.train.out, cfg.train.resume = str(out), resume
        log(f"[{name}] {'resuming' if resume else 'starting'} {out}")
        return distill(cfg)

    return run_stage(out, cfg, start, name, "stage")


def default_dedup(root: str) -> list[str]:
    from ..data.shards import is_wds
    from ..data.sources import split_spec

    if is_wds(root):
        return [root]  # mining's reference opener reads a shard folder's val and test splits
    return [s for s in (split_spec(root, "val"), split_spec(root, "test")) if s]


def _check_teacher_classes(cfg: SSLDConfig, teacher: str) -> None:
    """Mined rows carry the teacher's class indices: its classes must be the data's."""
    from ..data.datasets import open_split
    from ..models.checkpoint import read_meta, resolve_checkpoint

    if not Path(teacher).exists():
        raise UserError(f"teacher '{teacher}' does not exist (ssld needs a kdistill run folder or checkpoint)")
    t_classes = list(read_meta(resolve_checkpoint(teacher))["classes"])
    classes = open_split(cfg.data, "train").classes
    if t_classes != classes:
        raise UserError(f"teacher '{teacher}' predicts {len(t_classes)} classes ({', '.join(t_classes[:3])}, ...) "
                        f"but the labeled data has {len(classes)} ({', '.join(classes[:3])}, ...); "
                        "SSLD needs a teacher trained on the same classes in the same order")


def mine_output(out: Path, pool: str) -> tuple[Path, str, Path]:
    """Where the mine stage writes: (its reports' base path, the ``--out`` it is given, the
    file that exists once it is done). A sharded pool is mined to shards (a list file cannot
    point into tars), which the distill stage reads as ``data.unlabeled=wds:DIR``."""
    from ..data.shards import INFO_FILE, PREFIX, is_wds
    from ..mining.output import REPORT_STEM

    if is_wds(pool):
        folder = out / "mine" / "shards"
        return folder / REPORT_STEM, f"{PREFIX}{folder}", folder / INFO_FILE
    mined = out / "mine" / "mined.txt"
    return mined, str(mined), mined


def stage_loss_params(recipe: dict, user: dict) -> dict:
    """The distill stage's per-loss parameters: the ssld recipe's (``ssld.loss_params``),
    each key overridden by the run's ``distill.loss_params``."""
    return {name: {**recipe.get(name, {}), **user.get(name, {})} for name in {*recipe, *user}}


def ssld(cfg: SSLDConfig) -> dict:
    """Run (or resume) the three stages; under torchrun every rank runs each stage and rank 0
    alone writes the table, the summary and the final copies."""
    with dist.one_group(resolve_device(cfg.train.device)):
        return _ssld(cfg)


def _ssld(cfg: SSLDConfig) -> dict:
    sc = cfg.ssld
    if not sc.pool:
        raise UserError("ssld needs --pool DIR_OR_LIST (the unlabeled images to mine)")
    if len(cfg.distill.teachers) != 1:
        raise UserError("ssld mines with exactly one --teacher")
    from ..data.shards import is_wds

    if is_wds(sc.pool) and not is_wds(cfg.data.train or cfg.data.root):
        # the mined images are shards, streamed beside the labeled ones: both must stream
        raise UserError(f"a sharded pool ('{sc.pool}') needs sharded labeled data too: "
                        f"kdistill pack {cfg.data.root} --out DIR, then --data wds:DIR")
    for losses in (sc.losses, sc.finetune_losses):  # a mistyped term stops the run before mining
        parse_terms(DistillSection(losses=list(losses)))
    out = run_folder(cfg)
    # stages already done are reused only with the same settings; `kdistill ssld -c
    # <out>/config.yaml` repeats the recipe
    record.write(out, cfg, record.check(out, cfg, "ssld run", compare=record.has_work(out)))
    teacher = cfg.distill.teachers[0]
    _check_teacher_classes(cfg, teacher)
    mined, mined_spec, done_marker = mine_output(out, sc.pool)
    summary_path = Path(str(mined) + ".summary.json")
    mine_summary = None
    if summary_path.is_file() and done_marker.is_file() and dist.is_main():
        mine_summary = json.loads(summary_path.read_text())
    mine_summary = dist.broadcast_object(mine_summary)
    if mine_summary is not None:
        log(f"[mine] reusing {mined_spec}")
    else:
        (out / "mine").mkdir(parents=True, exist_ok=True)
        dedup = sc.dedup_against or default_dedup(cfg.data.root)
        log(f"[mine] top-{sc.top_k} per class from {sc.pool} (dedup against {', '.join(dedup) or 'nothing'})")
        mine_summary = mine(teacher, sc.pool, mined_spec, sc.mine_config(cfg), dedup_against=dedup,
                            device=cfg.train.device, progress=cfg.train.progress)
    if mine_summary["selected"] == 0:
        raise UserError(f"mining kept no image of the {mine_summary['pool_size']} in '{sc.pool}' "
                        f"({mine_summary['duplicates_removed']} near-copies of evaluation images, "
                        f"{mine_summary['skipped']} unreadable); see {mined}.dedup.csv")

    # stages are distill runs: their config.yaml drops the ssld section (`kdistill distill -c`)
    dcfg = narrow(copy.deepcopy(cfg), DistillConfig)
    dcfg.data.unlabeled, dcfg.data.unlabeled_fraction = mined_spec, sc.unlabeled_fraction
    dcfg.distill.losses = list(sc.losses)
    dcfg.distill.loss_params = stage_loss_params(sc.loss_params, cfg.distill.loss_params)
    distilled = _stage(dcfg, out / "distill", "distill")

    rows = [("distill (labeled + mined)", distilled)]
    if sc.finetune_epochs > 0:
        fcfg = narrow(copy.deepcopy(cfg), DistillConfig)
        fcfg.train.epochs, fcfg.optim.lr, fcfg.optim.warmup_epochs = sc.finetune_epochs, sc.finetune_lr, 0
        # the distill stage's last weights: its best epoch was chosen on the val split reported
        fcfg.model.checkpoint = str(out / "distill" / "last.safetensors")
        fcfg.distill.losses = list(sc.finetune_losses)
        fcfg.distill.warmup_epochs, fcfg.distill.loss_params = {}, {}
        if sc.finetune_image_size:
            fcfg.data.image_size = sc.finetune_image_size
        rows.append(("fine-tune (labeled)", _stage(fcfg, out / "finetune", "finetune")))

    lines = ["| stage | images | val top-1 (last epoch) | val MPA |", "|---|---|---|---|",
             f"| mine | {mine_summary['selected']} selected of {mine_summary['pool_size']} "
             f"({mine_summary['duplicates_removed']} near-copies of eval images removed) | - | - |"]
    for name, s in rows:
        b = s.get("final") or {}
        lines.append(f"| {name} | - | {b.get('top1', float('nan')):.4f} | {b.get('mpa', float('nan')):.4f} |")
    table = "\n".join(lines)
    final = {**rows[-1][1], "out": str(out), "stages": {"mine": mine_summary,
                                                       **{n: s for n, s in rows}}}
    if dist.is_main():
        print(table)
        atomic_write_text(out / "ssld.md", table + "\n")
        write_json(out / "summary.json", final)
        copy_checkpoints(out / ("finetune" if sc.finetune_epochs > 0 else "distill"), out)
    dist.barrier()  # no rank returns before the run folder is complete
    return final
