"""The one training loop. It knows nothing about KD: a method returns loss terms, the loop
backpropagates ``"loss"`` and logs the rest.

Features: timm optimizers and schedulers (per-step updates), AMP (bf16 on CPU, fp16 with
GradScaler or bf16 on CUDA), gradient accumulation and clipping, weight EMA, DDP, per-epoch
evaluation, atomic best/last checkpoints and exact resume: every epoch re-seeds all RNGs
from ``(seed, epoch)``, so a resumed run replays the uninterrupted one.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import math
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from .. import __version__
from .. import distributed as dist
from ..config import Config
from ..console import log, progress
from ..data.loader import SkipLog, dropped, skipped_in
from ..data.transforms import Preprocessing, to_unit
from ..errors import TrainingError
from ..methods.base import Method
from ..models.checkpoint import load_state, save_model, save_state
from ..utils import count_params, seed_everything, write_json
from . import precision as precision_
from .callbacks import RunLogger
from .evaluate import EvalHook, EvalResult, evaluate
from .optim import build_optimizer


@dataclass
class EpochStats:
    terms: dict[str, float] = field(default_factory=dict)
    images: int = 0
    seconds: float = 0.0
    skipped: dict[str, str] = field(default_factory=dict)  # unreadable image -> reason


class Trainer:
    """Runs ``method`` for ``cfg.train.epochs`` epochs and writes the run folder ``out``."""

    def __init__(self, cfg: Config, method: Method, train_loader, val_loader, device: torch.device,
                 out: Path, classes: list[str], preprocessing: Preprocessing,
                 mixer: Callable | None = None, meta: dict | None = None,
                 eval_hook: "EvalHook | None" = None) -> None:
        from timm.utils import ModelEmaV3

        self.cfg, self.method, self.device, self.out = cfg, method, device, Path(out)
        self.train_loader, self.val_loader = train_loader, val_loader
        self.classes, self.preprocessing, self.mixer = classes, preprocessing, mixer
        self.meta = meta or {}
        self.eval_hook = eval_hook
        self.skips = SkipLog(self.out / "skipped.txt")
        tc = cfg.train
        self.precision = precision_.resolve(device, tc.amp, tc.amp_dtype)
        log(f"precision: {self.precision.name} ({self.precision.reason})")
        if self.precision.warning:
            log(self.precision.warning)
        precision_.configure_cuda(device, self.precision)
        self.autocast = self.precision.autocast(device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision.needs_scaler)
        self.optimizer, self.scheduler = self._build_optim()
        self.ema = ModelEmaV3(method.plain_student, decay=tc.ema_decay) if tc.ema_decay > 0 else None
        if dist.is_distributed():
            method.wrap_distributed([device.index] if device.type == "cuda" else None)
        self.epoch = 0  # epochs completed
        self.global_step = 0
        self.best_top1 = -math.inf
        self.best_epoch = 0

    # ------------------------------------------------------------------ setup

    def _build_optim(self):
        return build_optimizer(self.cfg, self.method.trainable(), self.device, self._updates_per_epoch())

    def _batches_per_epoch(self) -> int:
        """Batches trained per epoch: the loader's, capped by ``train.max_steps_per_epoch``."""
        cap = self.cfg.train.max_steps_per_epoch
        return len(self.train_loader) if cap is None else min(len(self.train_loader), cap)

    def _updates_per_epoch(self) -> int:
        """Optimizer steps per epoch: one per window of ``accum_steps`` batches, the last
        window of an epoch possibly shorter (it steps too)."""
        return max(math.ceil(self._batches_per_epoch() / self.cfg.train.accum_steps), 1)

    def eval_model(self) -> nn.Module:
        """The weights that are evaluated and saved: the EMA when enabled, else the student."""
        return self.ema.module if self.ema is not None else self.method.plain_student

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "global_step": self.global_step,
            "best_top1": self.best_top1, "best_epoch": self.best_epoch,
            "trainable": self.method.trainable().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict() if self.scheduler else None,
            "scaler": self.scaler.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "method": self.method.extra_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.method.trainable().load_state_dict(state["trainable"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"] or not self.scaler.is_enabled():  # a run saved without fp16 has no scale
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None and state["ema"] is not None:
            self.ema.load_state_dict(state["ema"])
        self.method.load_extra_state(state.get("method") or {})
        self.epoch, self.global_step = state["epoch"], state["global_step"]
        self.best_top1, self.best_epoch = state["best_top1"], state["best_epoch"]

    def resume(self) -> bool:
        path = self.out / "last.pt"
        if not path.is_file():
            log(f"no {path} to resume from; starting from scratch")
            return False
        self.load_state_dict(load_state(path))
        log(f"resumed {self.out} after epoch {self.epoch}")
        return True

    def model_meta(self, result: EvalResult | None) -> dict:
        student = self.method.plain_student
        return {
            "arch": getattr(student, "kdistill_arch", type(student).__name__),
            "num_classes": len(self.classes), "classes": self.classes,
            "preprocessing": self.preprocessing.to_dict(),
            "drop_rate": self.cfg.model.drop_rate, "epoch": self.epoch,
            "metrics": result.summary() if result else {},
            "run": str(self.out.resolve()), "ema": self.ema is not None,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "kdistill_version": __version__, **self.precision.record(self.device),
            **({"qat": student.kdistill_qat} if hasattr(student, "kdistill_qat") else {}),
            **self.method.describe(), **self.meta,
        }

    def save(self, result: EvalResult | None, is_best: bool) -> None:
        if not dist.is_main():
            return
        meta = self.model_meta(result)
        save_model(self.out / "last.safetensors", self.eval_model(), meta)
        if is_best:
            save_model(self.out / "best.safetensors", self.eval_model(), {**meta, "best": True})
        save_state(self.out / "last.pt", self.state_dict())  # last: it marks the epoch as done

    # ------------------------------------------------------------------ loop

    def fit(self) -> dict:
        tc = self.cfg.train
        resumed = tc.resume and self.resume()
        logger = RunLogger(self.out, resume_epoch=self.epoch if resumed else None)
        self.skips.start(resumed)
        started = time.time()
        last_result: EvalResult | None = None
        try:
            while self.epoch < tc.epochs:
                stats = self.train_epoch(self.epoch)
                self.epoch += 1
                row = {"epoch": self.epoch, "lr": self.optimizer.param_groups[0]["lr"],
                       **{f"train.{k}": v for k, v in stats.terms.items()},
                       "train.images_per_s": stats.images / max(stats.seconds, 1e-9),
                       "train.seconds": stats.seconds, "train.skipped": self.skips.add("train", stats.skipped.items()),
                       **self.precision.record(self.device)}
                result = None
                if self.val_loader is not None and (self.epoch % tc.eval_every == 0 or self.epoch == tc.epochs):
                    result = self.validate()
                    last_result = result
                    row.update({f"val.{k}": v for k, v in result.summary().items()})
                is_best = result is None and self.val_loader is None or (
                    result is not None and result.top1 > self.best_top1)
                if is_best:
                    self.best_top1 = result.top1 if result else self.best_top1
                    self.best_epoch = self.epoch
                self.save(result, is_best)
                logger.epoch(row)
                self._report_epoch(row, stats)
        except torch.cuda.OutOfMemoryError:
            b, a = tc.batch_size, tc.accum_steps
            raise TrainingError(
                f"out of GPU memory at --batch-size {b} per process (train.accum_steps={a}); the last "
                f"checkpoint ({self.out / 'last.pt'}) is intact: continue with --resume --batch-size {max(b // 2, 1)} "
                f"-o train.accum_steps={a * 2} (the same effective batch)") from None
        finally:
            logger.close()
        summary = self.summary(time.time() - started, last_result)
        if dist.is_main():
            write_json(self.out / "summary.json", summary)
        return summary

    def train_epoch(self, epoch: int) -> EpochStats:
        """One epoch in windows of ``accum_steps`` batches, one optimizer step per window; the
        epoch's last window may be shorter and steps too. Each step's gradient is the mean
        over the window's readable images on all ranks. A batch without a readable image on
        some rank is skipped by every rank together (its position in the window still
        counts), so DDP collectives and accumulation windows stay in step across ranks."""
        tc = self.cfg.train
        seed_everything(tc.seed * 1000 + epoch)
        self.train_loader.set_epoch(epoch)
        self.method.train()
        self.method.set_epoch(epoch, tc.epochs)
        stats = EpochStats(skipped=dict(dropped(self.train_loader)))  # + those met below, on this rank
        sums: dict[str, torch.Tensor] = {}
        params = [p for p in self.method.trainable().parameters() if p.requires_grad]
        n_batches = self._batches_per_epoch()
        bar = progress(n_batches, f"epoch {epoch + 1}/{tc.epochs}", tc.progress)
        t0 = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        window_images = 0  # readable images of this rank in the window (a host count)
        # under DDP the window's count over ranks stays on the device (summed there, no sync)
        window_count = torch.zeros((), device=self.device) if self.method.ddp_modules() else None
        # the loss is checked on the host only every train.sync_every steps and at the end
        # (no host sync per step): the first non-finite loss and its step are kept on the device
        bad_step = torch.full((), -1, dtype=torch.long, device=self.device)
        bad_loss = torch.zeros((), device=self.device)
        loss = None
        for i, batch in enumerate(self.train_loader):
            if i >= n_batches:
                break
            start = i - i % tc.accum_steps
            window = min(tc.accum_steps, n_batches - start)
            last = i == start + window - 1
            stats.skipped.update(skipped_in(batch))
            batch = self._to_device(batch) if "image" in batch else None
            n = 0 if batch is None else batch["image"].shape[0]
            if n == 0 and window_count is not None:
                # a rank without a readable image still takes part in DDP's collectives: it
                # steps on an earlier batch at weight 0 instead of asking the others
                batch = self._placeholder()
            if batch is not None and batch["image"].shape[0]:
                self._last_batch = batch
                sync = contextlib.ExitStack()
                if not last:
                    for m in self.method.ddp_modules():
                        sync.enter_context(m.no_sync())
                with sync:
                    with self.autocast():
                        out = self.method(batch)
                    loss = out["loss"]
                    if n:
                        first = (bad_step < 0) & ~torch.isfinite(loss.detach())
                        bad_step.masked_fill_(first, i)
                        bad_loss = torch.where(first, loss.detach().float(), bad_loss)
                    # a full batch weighs 1 / window; _optimizer_step rescales to the real mean
                    self.scaler.scale(loss * (n / tc.batch_size) / window).backward()
                window_images += n
                if window_count is not None:
                    window_count.add_(n)
                stats.images += n
                for k, v in out.items():
                    if k != "logits" and v.dim() == 0:
                        sums[k] = sums.get(k, 0.0) + v.detach().float() * n
            if (i + 1) % tc.sync_every == 0:
                self._check_loss(bad_step, bad_loss, epoch)
                if loss is not None:
                    rate = stats.images / max(time.perf_counter() - t0, 1e-9)
                    bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}",
                                    lr=f"{self.optimizer.param_groups[0]['lr']:.2e}", refresh=False)
            if last:
                if window_count is not None or window_images:  # under DDP every rank steps
                    nominal = tc.batch_size * window * dist.world_size()
                    self._optimizer_step(params, window_images if window_count is None else
                                         dist.all_reduce_sum(window_count), nominal)
                    if window_count is not None:
                        window_count.zero_()
                self.optimizer.zero_grad(set_to_none=True)
                window_images = 0
            bar.update(1)
        bar.close()
        self._check_loss(bad_step, bad_loss, epoch)
        if self.scheduler is not None:
            self.scheduler.step(epoch + 1)
        stats.seconds = time.perf_counter() - t0
        if sums:  # every rank ran the same micro-batches, so every rank has terms here
            keys = sorted(sums)
            total = dist.all_reduce_sum(torch.stack([*(sums[k] for k in keys),
                                                     torch.tensor(float(stats.images), device=self.device)]))
            stats.terms = {k: float(v) for k, v in zip(keys, total[:-1] / total[-1].clamp_min(1))}
        return stats

    def _check_loss(self, bad_step: torch.Tensor, bad_loss: torch.Tensor, epoch: int) -> None:
        """Stop (before anything is saved) if some step's loss was not finite on any rank:
        every rank learns of every rank's first bad step in one all-reduce, so all stop
        together with the same message instead of the others waiting in a collective."""
        table = torch.zeros(dist.world_size(), 2, dtype=torch.float64, device=self.device)
        table[dist.rank(), 0] = bad_step + 1  # 0: none on that rank
        table[dist.rank(), 1] = bad_loss
        table = dist.all_reduce_sum(table).tolist()
        bad = [(r, int(s) - 1, v) for r, (s, v) in enumerate(table) if s > 0]
        if bad:
            rank, step, value = bad[0]
            where = f" on rank {rank}" if dist.is_distributed() else ""
            raise TrainingError(
                f"loss became {value} at epoch {epoch + 1}, step {step + 1}{where}; stopped. "
                f"The last good checkpoint ({self.out / 'last.pt'}) is intact: lower "
                "optim.lr, set optim.clip_grad, or turn off train.amp, then --resume")

    def _placeholder(self) -> dict:
        """A batch to step on at weight 0 when this rank has no readable image (under DDP):
        the last batch, else the first readable images of the training set."""
        from ..data.loader import collate
        from ..data.transforms import kept_rngs

        if getattr(self, "_last_batch", None) is None:
            ds, items = self.train_loader.dataset, []
            with kept_rngs():  # the training process's random streams stay as they were
                for j in range(len(ds)):
                    items += [] if "skipped" in (item := ds[j]) else [item]
                    if len(items) == 2:
                        break
            self._last_batch = self._to_device(collate(items))
        return self._last_batch

    def _optimizer_step(self, params: list[nn.Parameter], images: int | torch.Tensor, nominal: int) -> None:
        """Step on the window's gradients, accumulated as the sum over its micro-batches of
        ``loss * n / batch_size / window`` (``nominal`` images when all are full) and averaged
        over ranks by DDP: rescaled by ``nominal / images`` they are the mean over the
        ``images`` readable images of the window on all ranks (under DDP a device tensor: the
        rescale asks the host nothing; a window without any readable image then steps on zero
        gradients)."""
        oc = self.cfg.optim
        if torch.is_tensor(images):
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], nominal / images.clamp_min(1))
        elif images != nominal:
            torch._foreach_mul_([p.grad for p in params if p.grad is not None], nominal / images)
        if oc.clip_grad:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(params, oc.clip_grad)
        self.scaler.step(self.optimizer)
        scale = self.scaler._scale.clone() if self.scaler.is_enabled() else None
        self.scaler.update()
        self.global_step += 1
        if self.scheduler is not None:
            self.scheduler.step_update(num_updates=self.global_step)
        if self.ema is not None:
            decay = self.ema.get_decay(self.global_step)
            if scale is not None:  # a step fp16's scaler skipped leaves the EMA as it is, on the device
                decay = torch.where(self.scaler._scale < scale, 1.0, decay)
            self.ema.apply_update_(self.method.plain_student, decay)
        self.method.after_step()

    def _to_device(self, batch: dict) -> dict:
        """Tensors to the device (images stay uint8: each model's Preprocess scales them);
        then the batch mixer, if any, on [0, 1] float images."""
        batch = {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v
                 for k, v in batch.items()}
        if self.mixer is not None:
            x, y = batch["image"], batch["target"]
            if len(x) % 2:  # timm's batch mixup pairs images: drop one of an odd batch
                batch = {k: v[:-1] if torch.is_tensor(v) else v for k, v in batch.items()}
                x, y = batch["image"], batch["target"]
            if len(x):  # a lone image is dropped: the batch then counts as empty
                batch["image"], batch["target"] = self.mixer(to_unit(x), y)
        return batch

    def validate(self) -> EvalResult:
        model = self.eval_model()
        hook = self.eval_hook
        if hook is not None:
            hook.reset()
        # fp32, as `kdistill eval` and the report evaluate: one number per checkpoint
        result = evaluate(model, self.method.student_prep, self.val_loader, len(self.classes),
                          self.device, on_batch=hook.update if hook else None)
        if hook is not None:
            result.extra.update(hook.compute())
        result.extra["skipped"] = self.skips.add("val", result.skipped)
        return result

    def _report_epoch(self, row: dict, stats: EpochStats) -> None:
        msg = (f"epoch {row['epoch']}/{self.cfg.train.epochs}  loss {row.get('train.loss', float('nan')):.4f}"
               f"  {row['train.images_per_s']:.0f} img/s")
        if "val.top1" in row:
            msg += f"  val top1 {row['val.top1']:.4f}  mpa {row['val.mpa']:.4f}"
        log(msg)
        if row["train.skipped"] or row.get("val.skipped"):
            log(f"warning: unreadable images skipped: {row['train.skipped']} training, {row.get('val.skipped', 0)} "
                f"val (this epoch); listed in {self.skips.path}")

    def summary(self, seconds: float, last: EvalResult | None) -> dict:
        rows = RunLogger.read(self.out / "metrics.jsonl") if (self.out / "metrics.jsonl").exists() else []
        best = next((r for r in rows if r["epoch"] == self.best_epoch), {})
        rates = [r["train.images_per_s"] for r in rows]
        return {
            "out": str(self.out), "model": self.cfg.model.name, "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "best": {k[4:]: v for k, v in best.items() if k.startswith("val.")},
            "final": last.summary() if last else {},
            "params": count_params(self.method.plain_student),
            "train_images_per_s": sum(rates) / len(rates) if rates else None,
            "seconds_this_session": round(seconds, 1), "device": str(self.device),
            "machine": f"{platform.node()} ({platform.processor() or platform.machine()}, "
                       f"{torch.get_num_threads()} threads)",
            "world_size": dist.world_size(), **self.precision.record(self.device),
            **self.method.describe(),
        }
