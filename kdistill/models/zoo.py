"""Registry of kdistill's own CIFAR-style networks (32 px input)."""
from __future__ import annotations

from ..registry import Registry

#: builder(num_classes=10, in_chans=3, drop_rate=0.0) -> nn.Module
ZOO: Registry = Registry("model", "kdistill list models")


def register_model(name: str | None = None):
    """Decorator for a zoo builder; see :data:`ZOO`."""
    return ZOO.register(name)


def _import_all() -> None:
    from .cifar import mobilenetv2, resnet, shufflenet, vgg, wrn  # noqa: F401


def zoo_builder(name: str):
    _import_all()
    return ZOO.get(name)


def zoo_names(pattern: str | None = None) -> list[str]:
    _import_all()
    return ZOO.names(pattern)


