"""create_model: kdistill's CIFAR zoo first, then timm, then torchvision.

Names may carry a source prefix: ``zoo:vgg13``, ``timm:convnext_atto``, ``tv:resnet18``,
``hf-hub:timm/resnet18.a1_in1k`` (Hugging Face Hub through timm). Published weights come
from the local cache when there (``weights.py``), so they work offline.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..data.transforms import Preprocessing
from ..errors import UserError
from .zoo import zoo_builder, zoo_names

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


def resolve_name(name: str) -> tuple[str, str]:
    """-> (source, bare name) with source in {'zoo', 'timm', 'tv'}; ``zoo:NAME`` forces the zoo."""
    import timm
    import torchvision

    if name.startswith("hf-hub:"):
        return "timm", name
    known = {"zoo": lambda n: n in zoo_names(), "timm": timm.is_model,
             "tv": lambda n: n in torchvision.models.list_models()}
    for prefix, source in (("zoo:", "zoo"), ("timm:", "timm"), ("tv:", "tv"), ("torchvision:", "tv")):
        if name.startswith(prefix) and known[source](name[len(prefix):]):
            return source, name[len(prefix):]
    if ":" not in name:
        for source in ("zoo", "timm", "tv"):
            if known[source](name):
                return source, name
    raise UserError(_unknown_message(name))


def _unknown_message(name: str) -> str:
    """The registry's 'unknown model' line (with "did you mean") over the names of ``name``'s source."""
    from ..registry import Registry

    prefix, _, bare = name.rpartition(":")
    groups = list_models()
    source = {"zoo": "zoo", "timm": "timm", "tv": "torchvision", "torchvision": "torchvision"}.get(prefix)
    names = groups[source] if source else [n for g in groups.values() for n in g]
    known = Registry("model", f"kdistill list models {bare[:4]}")
    for n in dict.fromkeys(f"{prefix}:{n}" if prefix else n for n in names):
        known.add(n, n)
    return known.unknown_message(name)


def create_model(name: str, num_classes: int, pretrained: bool = False,
                 checkpoint: str | None = None, pretrained_path: str | None = None,
                 drop_rate: float = 0.0, qat: bool = False) -> nn.Module:
    """Build ``name`` with a ``num_classes`` head.

    ``pretrained`` loads timm / torchvision / Hugging Face weights (their cache, else the
    network; or the local file ``pretrained_path``, which alone implies ``pretrained``);
    ``model.kdistill_weights`` says which. The head is re-initialised
    when its size differs. ``checkpoint`` loads a kdistill run or checkpoint whose
    architecture and classes match. ``qat``: the model rewritten for quantization-aware
    training (``models/quant.py``), after the float weights are loaded; a checkpoint of such
    a model needs ``qat``.
    """
    pretrained = pretrained or bool(pretrained_path)
    source, bare = resolve_name(name)
    if source == "zoo":
        if pretrained:
            from .describe import shadow_map

            others = shadow_map().get(bare)
            raise UserError(f"zoo model '{name}' has no published pretrained weights; drop --pretrained "
                            "or use model.checkpoint" + (f" (or pick a pretrained {' / '.join(others[:3])})"
                                                         if others else ""))
        model = zoo_builder(bare)(num_classes=num_classes, drop_rate=drop_rate)
    elif source == "timm":
        model = _create_timm(bare, num_classes, pretrained, pretrained_path, drop_rate)
    else:
        model = _create_torchvision(bare, num_classes, pretrained, pretrained_path)
    model.kdistill_arch = arch_name(source, bare, model)  # type: ignore[attr-defined]
    from .quant import QATModel, is_qat, prepare_qat

    if checkpoint:
        from .checkpoint import load_weights_into, read_meta, resolve_checkpoint

        if is_qat(read_meta(resolve_checkpoint(checkpoint))):
            if not qat:
                raise UserError(f"'{checkpoint}' holds a quantization-aware student; continue it with --qat "
                                "(-o model.qat=true), or start from its float run")
            model = prepare_qat(model)
        load_weights_into(model, checkpoint, num_classes)
        model.kdistill_weights = f"checkpoint {checkpoint}"
    if qat and not isinstance(model, QATModel):
        model = prepare_qat(model)
    return model


def arch_name(source: str, bare: str, model: nn.Module) -> str:
    """A name that re-creates the architecture offline (hf-hub names resolve to timm's)."""
    if source == "zoo":
        return bare
    if source == "timm" and bare.startswith("hf-hub:"):
        cfg = getattr(model, "pretrained_cfg", {}) or {}
        return "timm:" + cfg.get("architecture", bare)
    return f"{source}:{bare}"


def _create_timm(name: str, num_classes: int, pretrained: bool, path: str | None,
                 drop_rate: float) -> nn.Module:
    import timm

    kwargs: dict = {"num_classes": num_classes, "drop_rate": drop_rate}
    weights, timm_name = "random init", name
    if pretrained and path:
        _check_file(path)
        kwargs["pretrained_cfg_overlay"] = {"file": str(path)}
        weights = f"weights {path}"
    elif pretrained:
        from .weights import timm_source

        timm_name, overlay, where = timm_source(name)
        kwargs.update({"pretrained_cfg_overlay": overlay} if overlay else {})
        weights = f"pretrained, from {where}"
    try:
        model = timm.create_model(timm_name, pretrained=pretrained, **kwargs)
    except (RuntimeError, OSError) as err:
        if pretrained:
            from .weights import HINT

            raise UserError(f"cannot load pretrained weights for '{name}': "
                            f"{str(err).splitlines()[0][:200]}; {HINT}") from None
        raise
    model.kdistill_weights = weights
    return model


def _create_torchvision(name: str, num_classes: int, pretrained: bool, path: str | None) -> nn.Module:
    import torchvision

    if not pretrained:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if path:
        model = load_weights(torchvision.models.get_model(name, weights=None), path, f"{name} weights")
        weights = f"weights {path}"
    else:
        from .weights import HINT, torchvision_source

        weights = f"pretrained, from {torchvision_source(name)}"
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        except (RuntimeError, OSError) as err:
            raise UserError(f"cannot load pretrained weights for 'tv:{name}': "
                            f"{str(err).splitlines()[0][:200]}; {HINT}") from None
    if _last_linear(model).out_features != num_classes:
        replace_head(model, num_classes)
    model.kdistill_weights = weights
    return model


def _check_file(path: str) -> None:
    if not Path(path).is_file():
        raise UserError(f"weights file '{path}' does not exist")


def load_weights(model: nn.Module, path: str, what: str) -> nn.Module:
    """``model`` with the weights of file ``path``, which must hold ``what`` (for the error)."""
    try:
        model.load_state_dict(read_state_dict(path))
    except RuntimeError as err:
        raise UserError(f"'{path}' does not hold {what}: {str(err).splitlines()[0][:160]}") from None
    model.kdistill_weights = f"weights {path}"
    return model


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Weights from a .safetensors or torch file; unwraps {'state_dict': ...} / {'model': ...}."""
    _check_file(path)
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(path)
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001
        raise UserError(f"cannot read weights file '{path}': {str(err).splitlines()[0][:200]}") from None
    for key in ("state_dict", "model", "model_state"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"weights file '{path}' does not hold a state dict")
    return state


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot find the classifier of {type(model).__name__}")
    return linears[-1]


def replace_head(model: nn.Module, num_classes: int) -> None:
    """Swap the last nn.Linear for a freshly initialised one with ``num_classes`` outputs."""
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    target = _last_linear(model)
    for parent in model.modules():
        for child_name, child in parent.named_children():
            if child is target:
                setattr(parent, child_name, nn.Linear(target.in_features, num_classes))
                return


def default_preprocessing(model: nn.Module, pretrained: bool, quiet: bool = False) -> Preprocessing | None:
    """The input size and normalisation pretrained weights expect; None when trained here.
    Logs them on one line unless ``quiet`` (a teacher by name is described here)."""
    if not pretrained:
        return None
    cfg = getattr(model, "pretrained_cfg", None)
    if cfg:
        from timm.data import resolve_data_config

        dc = resolve_data_config({}, model=model)
        pp = Preprocessing(int(dc["input_size"][-1]), list(dc["mean"]), list(dc["std"]),
                           float(dc.get("crop_pct", 0.875)))
    else:
        pp = Preprocessing(224, IMAGENET_MEAN, IMAGENET_STD, 0.875)
    if not quiet:
        from .describe import announce_model

        announce_model(model, pp)
    return pp


def list_models(pattern: str | None = None) -> dict[str, list[str]]:
    """Model names by source; ``pattern`` is a shell wildcard, a bare word matches anywhere."""
    import fnmatch

    import timm
    import torchvision

    if pattern and not any(c in pattern for c in "*?["):
        pattern = f"*{pattern}*"
    tv = torchvision.models.list_models()
    return {
        "zoo": zoo_names(pattern),
        "timm": timm.list_models(pattern) if pattern else timm.list_models(),
        "torchvision": [n for n in tv if not pattern or fnmatch.fnmatch(n, pattern)],
    }
