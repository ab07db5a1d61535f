"""What model runs and how its input is prepared, on one line at the start of a run; and
warnings for two silent traps: a 32-px CIFAR zoo net fed large images, and a bare zoo name
that hides a timm / torchvision net of that name or stem (``vgg13``, ``mobilenetv2``)."""
from __future__ import annotations

import functools

from torch import nn

from ..config import DataConfig
from ..console import log
from ..data.transforms import SMALL_IMAGE, Preprocessing

ZOO_SIZE = 32  # the zoo's nets are CIFAR-style: designed for 32 px input
SOURCES = {"zoo": "kdistill zoo, 32-px CIFAR net", "timm": "timm", "tv": "torchvision"}


def source_of(model: nn.Module) -> tuple[str, str]:
    """``(source, bare name)`` of a model made by ``create_model`` (from its ``kdistill_arch``)."""
    arch = getattr(model, "kdistill_arch", type(model).__name__)
    source, _, bare = arch.rpartition(":")
    return (source or "zoo"), bare


def is_stem(stem: str, name: str) -> bool:
    """``name`` is ``stem``, or ``stem`` then ``_``-separated parts (underscores optional):
    ``mobilenetv2`` is the stem of ``mobilenetv2_100`` and ``mobilenet_v2``, not of ``mobilenetv3``."""
    parts = name.split("_")
    key = stem.replace("_", "")
    return any("".join(parts[:i]) == key or "_".join(parts[:i]) == stem for i in range(1, len(parts) + 1))


@functools.lru_cache(maxsize=1)
def shadow_map() -> dict[str, list[str]]:
    """Zoo name -> the timm / torchvision names (prefixed) it equals or is the stem of."""
    import timm
    import torchvision

    from .zoo import zoo_names

    others = [f"timm:{n}" for n in timm.list_models()] + [f"tv:{n}" for n in torchvision.models.list_models()]
    def rank(zoo: str, other: str) -> tuple[bool, bool, bool]:  # same name, same but "_", width 1.0
        bare = other.split(":", 1)[1]
        return bare != zoo, bare.replace("_", "") != zoo, not any(w in bare for w in ("100", "x1_0"))

    found = {z: sorted((o for o in others if is_stem(z, o.split(":", 1)[1])), key=lambda o: rank(z, o))
             for z in zoo_names()}
    return {z: names for z, names in found.items() if names}


def _listing(names: list[str], n: int = 3) -> str:
    return ", ".join(names[:n]) + (f" (+{len(names) - n} more)" if len(names) > n else "")


def warnings_for(name: str, model: nn.Module, size: int) -> list[str]:
    """Warning lines for ``model`` (built from the user's ``name``) running at ``size`` px."""
    source, bare = source_of(model)
    if source != "zoo":
        return []
    others = [] if name.startswith("zoo:") else shadow_map().get(bare, [])
    big = size > 2 * ZOO_SIZE
    if not (big or others):
        return []
    head = f"'{bare}' is kdistill's {ZOO_SIZE}-px CIFAR net"
    if big:
        head += f", here at {size} px (slow, and not what it was designed for)"
    if others:
        tail = (f"timm / torchvision nets of that name: {_listing(others)}; write one of them "
                f"(timm:NAME / tv:NAME) to use it, or zoo:{bare} to keep this one")
    else:
        tail = f"for an ImageNet-style net pick a timm:NAME / tv:NAME (`kdistill list models {bare[:6]}`)"
    return [f"warning: {head}; {tail}"]


def _numbers(values: list[float]) -> str:
    return "[" + ", ".join(f"{v:.3g}" for v in values) + "]"


def describe(model: nn.Module, pp: Preprocessing, size_from: str, norm_from: str,
             train_crop: str | None = None) -> str:
    """``ARCH (source; weights): input N px (from), mean/std (from), crops`` on one line."""
    source, _ = source_of(model)
    arch = getattr(model, "kdistill_arch", type(model).__name__)
    weights = getattr(model, "kdistill_weights", "random init")
    crop = f"train crop {train_crop}, " if train_crop else ""
    return (f"{arch} ({SOURCES[source]}; {weights}): input {pp.image_size} px ({size_from}), "
            f"mean {_numbers(pp.mean)} std {_numbers(pp.std)} ({norm_from}), {crop}eval crop {pp.crop_pct:g}")


def announce_model(model: nn.Module, pp: Preprocessing, name: str = "") -> None:
    """Log a model whose preprocessing is its pretrained defaults (e.g. a teacher by name)."""
    log("model " + describe(model, pp, "its pretrained config", "its pretrained config"))
    for line in warnings_for(name, model, pp.image_size):
        log(line)


def announce_student(name: str, model: nn.Module, pp: Preprocessing, dc: DataConfig,
                     model_default: Preprocessing | None, native_size: int) -> None:
    """Log the student line: where its size, mean/std and crops came from (the choices of
    ``data.datasets.resolve_preprocessing``), then any warning."""
    default = ("the checkpoint's" if str(getattr(model, "kdistill_weights", "")).startswith("checkpoint")
               else "model default")
    size_from = "data.image_size" if dc.image_size else default if model_default else "images' own size"
    designed = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (0,))[-1]
    if size_from == "images' own size" and designed and designed != pp.image_size:
        size_from += f"; its pretrained size is {designed} px: --image-size {designed}"
    norm_from = ("data.mean/std" if dc.mean is not None and dc.std is not None
                 else default if model_default else "training-image statistics")
    crop = dc.crop if dc.crop != "auto" else ("pad" if native_size <= SMALL_IMAGE else "rrc")
    log("student " + describe(model, pp, size_from, norm_from, crop))
    for line in warnings_for(name, model, pp.image_size):
        log(line)


def annotate(source: str, names: list[str]) -> list[str]:
    """``kdistill list models`` rows: each name, with what a bare name picks when it is not
    this source's model (the zoo first, then timm, then torchvision)."""
    import timm

    shadows = shadow_map()
    prefix = {"torchvision": "tv"}.get(source, source)
    rows = []
    for n in names:
        note = ""
        if source == "zoo" and n in shadows:
            note = f"shadows {_listing(shadows[n], 2)}"
        elif source != "zoo" and n in shadows:
            note = f"bare name is the zoo's CIFAR net: write {prefix}:{n}"
        elif prefix == "tv" and timm.is_model(n):
            note = f"bare name is timm's: write tv:{n}"
        rows.append(f"{n:24s} {note}".rstrip() if note else n)
    return rows
