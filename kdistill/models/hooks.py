"""Feature capture by module name with forward hooks (no per-model rewrites).

``FeatureCapture(model, ["layer2", "layer3"], embed=True)`` records, on every forward, the
outputs of the named modules and the input of the classifier (the pooled penultimate
features, "embedding"). Names are ``named_modules()`` paths.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import UserError


def module_names(model: nn.Module) -> list[str]:
    return [n for n, _ in model.named_modules() if n]


def default_feature_layers(model: nn.Module) -> list[str]:
    """The last block of each stage, shallow to deep: the zoo's ``feature_modules``, timm's
    ``feature_info``, or torchvision ResNet-style ``layer1..4``."""
    names = getattr(model, "feature_modules", None)
    if names:
        return list(names)
    info = getattr(model, "feature_info", None)
    if info:
        mods = [i["module"] for i in (info if isinstance(info, list) else info.info)]
        known = set(module_names(model))
        mods = [m for m in mods if m in known]
        if mods:
            return mods
    layers = [n for n in ("layer1", "layer2", "layer3", "layer4") if hasattr(model, n)]
    if layers:
        return layers
    raise UserError(f"cannot guess the feature layers of {type(model).__name__}; "
                    "name them with --feature-pairs STUDENT_LAYER:TEACHER_LAYER,...")


def pair_layers(student: nn.Module, teacher: nn.Module, pairs: list[str] | None) -> list[tuple[str, str]]:
    """Explicit ``s:t`` pairs, or the deepest ``min(n_s, n_t)`` default layers paired in order."""
    if pairs:
        out = []
        for p in pairs:
            if p.count(":") != 1:
                raise UserError(f"feature pair '{p}' must look like STUDENT_LAYER:TEACHER_LAYER")
            s, t = p.split(":")
            out.append((s.strip(), t.strip()))
        return out
    s, t = default_feature_layers(student), default_feature_layers(teacher)
    n = min(len(s), len(t))
    return list(zip(s[len(s) - n:], t[len(t) - n:]))


def classifier(model: nn.Module) -> nn.Module:
    """The final classification layer: ``get_classifier()`` (timm, zoo) or the last Linear."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        if isinstance(head, nn.Module) and not isinstance(head, nn.Identity):
            return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise UserError(f"cannot find the classifier of {type(model).__name__} to capture "
                        "its embedding")
    return linears[-1]


class FeatureCapture:
    """Forward hooks on ``model`` that keep the latest outputs of ``layers`` (in order) and,
    with ``embed``, the flattened input of the classifier."""

    def __init__(self, model: nn.Module, layers: list[str], embed: bool = False, role: str = "model") -> None:
        modules = dict(model.named_modules())
        missing = [n for n in layers if n not in modules]
        if missing:
            sample = ", ".join(default_feature_layers_or_names(model)[:8])
            raise UserError(f"{role} has no module '{missing[0]}' (e.g. {sample})")
        self.layers = list(layers)
        self.feats: dict[str, torch.Tensor] = {}
        self.embed: torch.Tensor | None = None
        self.handles = [modules[n].register_forward_hook(self._keep(n)) for n in layers]
        if embed:
            self.handles.append(classifier(model).register_forward_pre_hook(self._keep_embed))

    def _keep(self, name: str):
        def hook(_module, _inputs, output):
            self.feats[name] = output[0] if isinstance(output, (tuple, list)) else output
        return hook

    def _keep_embed(self, _module, inputs):
        self.embed = inputs[0].flatten(1)

    def features(self) -> list[torch.Tensor]:
        return [self.feats[n] for n in self.layers]

    def clear(self) -> None:
        self.feats, self.embed = {}, None

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def default_feature_layers_or_names(model: nn.Module) -> list[str]:
    try:
        return default_feature_layers(model)
    except UserError:
        return module_names(model)
