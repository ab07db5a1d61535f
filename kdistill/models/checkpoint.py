"""Checkpoint I/O.

* ``<run>/best.safetensors``, ``<run>/last.safetensors``: model weights only, with the
  architecture, classes and preprocessing in the safetensors metadata, so ``eval``,
  ``export`` and teachers need nothing but the file.
* ``<run>/last.pt``: the full training state for ``--resume`` (optimizer, scheduler, EMA,
  RNG-free: the loop re-seeds per epoch).

Every file is written to a temporary name and renamed, so a kill never leaves a torn file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError
from ..utils import atomic_write

FORMAT_VERSION = 1
META_KEY = "kdistill"


def resolve_checkpoint(run_or_ckpt: str) -> Path:
    """A run folder's best checkpoint (else its last), or the checkpoint file itself."""
    p = Path(run_or_ckpt)
    if p.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (p / name).is_file():
                return p / name
        raise UserError(f"run folder '{p}' has no best.safetensors or last.safetensors; "
                        "did its training finish an epoch?")
    if p.is_file():
        return p
    raise UserError(f"checkpoint or run folder '{run_or_ckpt}' does not exist")


def save_model(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_model as st_save

    meta = {"format_version": FORMAT_VERSION, **meta}
    atomic_write(path, lambda tmp: st_save(_unwrap(model), str(tmp),
                                           metadata={META_KEY: json.dumps(meta)}))


def read_meta(path: str | Path) -> dict[str, Any]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = (fh.metadata() or {}).get(META_KEY)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read checkpoint '{path}' ({str(err).splitlines()[0][:120]}); "
                        "is it a kdistill .safetensors file?") from None
    if raw is None:
        raise UserError(f"'{path}' is not a kdistill checkpoint (no '{META_KEY}' metadata); "
                        "use model.pretrained_path for foreign weights")
    return json.loads(raw)


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model


def load_weights_into(model: nn.Module, run_or_ckpt: str, num_classes: int | None = None) -> dict:
    """Load a kdistill checkpoint into ``model``; checks architecture and class count."""
    from safetensors.torch import load_model as st_load

    path = resolve_checkpoint(run_or_ckpt)
    meta = read_meta(path)
    if meta.get("qat"):
        from .quant import check_qat_spec

        check_qat_spec(meta, str(path))
    if num_classes is not None and meta["num_classes"] != num_classes:
        raise UserError(f"checkpoint '{path}' has {meta['num_classes']} classes but the data has "
                        f"{num_classes}; use a checkpoint trained on these classes")
    arch = getattr(model, "kdistill_arch", None)
    if arch and meta["arch"] != arch:
        raise UserError(f"checkpoint '{path}' holds a {meta['arch']}, not a {arch}")
    try:
        st_load(_unwrap(model), str(path), strict=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"checkpoint '{path}' does not fit {arch or 'the model'}: "
                        f"{str(err).splitlines()[0][:200]}") from None
    return meta


def load_model(run_or_ckpt: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """Re-create the model a checkpoint was trained as and load its weights (eval mode)."""
    from . import create_model

    path = resolve_checkpoint(run_or_ckpt)
    meta = read_meta(path)
    model = create_model(meta["arch"], meta["num_classes"], drop_rate=meta.get("drop_rate", 0.0),
                         qat=bool(meta.get("qat")))
    load_weights_into(model, str(path))
    meta["path"] = str(path)
    return model.to(device).eval(), meta


def meta_preprocessing(meta: dict) -> Preprocessing:
    return Preprocessing.from_dict(meta["preprocessing"])


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_state(path: str | Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot resume: training state '{path}' is unreadable "
                        f"({str(err).splitlines()[0][:120]})") from None
