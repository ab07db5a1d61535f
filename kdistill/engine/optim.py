"""The optimizer and learning-rate schedule of a run: timm's factories (or pytorch-optimizer's
``po:NAME``), fused CUDA kernels where torch has them."""
from __future__ import annotations

import torch
from torch import nn

from ..config import Config
from ..errors import UserError

#: timm optimizer names built on torch.optim classes that have fused CUDA kernels
FUSED = ("sgd", "momentum", "nesterov", "adam", "adamw")


def build_optimizer(cfg: Config, model: nn.Module, device: torch.device, updates_per_epoch: int):
    """-> (optimizer, scheduler or None) for ``model``'s parameters; the scheduler steps per
    update (``updates_per_epoch`` of them an epoch)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    oc, tc = cfg.optim, cfg.train
    if oc.name.startswith("po:"):
        opt = pytorch_optimizer(model, oc.name[3:], oc.lr, oc.weight_decay, oc.momentum)
    else:
        # fused kernels on CUDA: one launch per step, and GradScaler then checks for
        # inf/NaN on the device instead of an .item() per step
        fused = {"fused": True} if device.type == "cuda" and oc.name in FUSED else {}
        try:  # timm applies momentum only to optimizers that have it (has_momentum)
            opt = create_optimizer_v2(model, opt=oc.name, lr=oc.lr, weight_decay=oc.weight_decay,
                                      momentum=oc.momentum, **fused)
        except (AssertionError, ValueError) as err:
            raise UserError(f"optimizer '{oc.name}': {str(err).splitlines()[0][:160]} (timm names, "
                            "or po:NAME for pytorch-optimizer, e.g. po:soap)") from None
    if oc.sched == "constant" and oc.warmup_epochs == 0:
        return opt, None
    sched, _ = create_scheduler_v2(
        opt, sched="step" if oc.sched == "constant" else oc.sched, num_epochs=tc.epochs,
        decay_epochs=oc.decay_epochs[0] if oc.sched == "step" else tc.epochs * 10,
        decay_milestones=oc.decay_epochs, decay_rate=1.0 if oc.sched == "constant" else oc.decay_rate,
        min_lr=oc.min_lr, warmup_lr=oc.warmup_lr, warmup_epochs=oc.warmup_epochs,
        step_on_epochs=False, updates_per_epoch=updates_per_epoch)
    return opt, sched


def pytorch_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float,
                      momentum: float) -> torch.optim.Optimizer:
    """An optimizer from the pytorch-optimizer package (e.g. ``soap``, ``shampoo``), with
    decoupled weight decay on weights and none on biases / norm parameters or on what the
    model's ``no_weight_decay()`` names (wildcards allowed, as in timm; e.g. a ViT's
    ``pos_embed``); ``momentum`` is passed when the optimizer takes one (as timm does)."""
    import fnmatch
    import inspect

    import pytorch_optimizer as po

    try:
        cls = po.load_optimizer(name)
    except NotImplementedError:
        raise UserError(f"pytorch-optimizer has no optimizer '{name}'") from None
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    exempt = {n for n, p in named if p.ndim <= 1 or any(fnmatch.fnmatch(n, pat) for pat in skip)}
    decay = [p for n, p in named if n not in exempt]
    rest = [p for n, p in named if n in exempt]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
    kwargs = {"momentum": momentum} if "momentum" in inspect.signature(cls).parameters else {}
    return cls(groups, lr=lr, **kwargs)
