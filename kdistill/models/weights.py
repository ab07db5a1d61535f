"""Where published weights come from: the local cache first, the network only when it answers.

Weights already in the Hugging Face cache (timm) or the torch hub cache (timm's URL weights,
torchvision) load from disk without a request, so ``HF_HUB_OFFLINE=1`` or no network at
all still works. Missing weights are a one-line :class:`UserError` within a few seconds,
not a minute of retries: the hub is probed first (``PROBE_SECONDS``).
"""
from __future__ import annotations

import os
import threading
from pathlib import Path
from urllib.parse import urlparse

from ..errors import UserError

PROBE_SECONDS = 3.0
HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # timm's order on the Hub
HINT = ("pass a local weights file with -o model.pretrained_path=FILE (a teacher: --teacher NAME@FILE), "
        "or run once with internet to fill the cache")


def offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub reads it only at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return bool(constants.HF_HUB_OFFLINE) or value in {"1", "ON", "YES", "TRUE"}


def reachable(url: str, timeout: float = PROBE_SECONDS) -> bool:
    """Whether ``url``'s server answers one HEAD request (any HTTP status) within ``timeout``
    seconds, name lookup included (in a thread: a hanging resolver cannot stall us)."""
    import urllib.error
    import urllib.request

    ok: list[bool] = []

    def probe() -> None:
        try:
            urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
            ok.append(True)
        except urllib.error.HTTPError:
            ok.append(True)  # it answered
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(ok)


def _need_network(name: str, url: str, cache: str) -> None:
    """Raise unless the host of ``url`` can be used to download ``name``'s weights."""
    if offline():
        why = "HF_HUB_OFFLINE is set"
    elif not reachable(url):
        why = f"{urlparse(url).hostname} cannot be reached"
    else:
        return
    raise UserError(f"pretrained weights for '{name}' are not in the cache ({cache}) and {why}; {HINT}")


def _hf_cached(repo: str, files: tuple[str, ...], revision: str | None) -> str | None:
    from huggingface_hub import try_to_load_from_cache

    for filename in files:
        path = try_to_load_from_cache(repo, filename, revision=revision)
        if isinstance(path, str):
            return path
    return None


def _hf_cache() -> str:
    from huggingface_hub import constants

    return constants.HF_HUB_CACHE


def _hub_file(url: str) -> Path:
    """Where torch.hub (timm's URL weights, torchvision) keeps the download of ``url``."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _hf_files(cfg) -> tuple[str, ...]:
    name = cfg.hf_hub_filename
    if not name:
        return HF_WEIGHT_FILES
    safe = {"pytorch_model.bin": "model.safetensors",
            "open_clip_pytorch_model.bin": "open_clip_model.safetensors"}.get(name)
    if safe is None and name.endswith(".bin"):
        safe = name[:-4] + ".safetensors"
    return (safe, name) if safe else (name,)


def timm_source(name: str) -> tuple[str, dict, str]:
    """``(name for timm.create_model, pretrained_cfg_overlay, where)`` loading ``name``'s
    published weights: from the cache when there (no request), else by timm's download."""
    from huggingface_hub import constants

    if name.startswith("hf-hub:"):
        repo, _, rev = name[len("hf-hub:"):].partition("@")
        weights = _hf_cached(repo, HF_WEIGHT_FILES, rev or None)
        config = _hf_cached(repo, ("config.json",), rev or None)
        if weights and config and Path(weights).parent == Path(config).parent:
            return f"local-dir:{Path(config).parent}", {}, "the Hugging Face cache"
        _need_network(name, constants.ENDPOINT, _hf_cache())
        return name, {}, "the Hugging Face Hub"
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(name)
    if cfg is None:
        return name, {}, "timm"  # timm says which weights are missing
    repo, _, rev = (cfg.hf_hub_id or "").partition("@")
    if repo:
        path = _hf_cached(repo, _hf_files(cfg), rev or None)
        if path:
            return name, {"file": path}, "the Hugging Face cache"
    if cfg.url and _hub_file(cfg.url).is_file():
        return name, {"file": str(_hub_file(cfg.url))}, "the torch hub cache"
    if repo:
        _need_network(name, constants.ENDPOINT, _hf_cache())
        return name, {}, "the Hugging Face Hub"
    if cfg.url:
        _need_network(name, cfg.url, str(_hub_file(cfg.url).parent))
        return name, {}, urlparse(cfg.url).hostname or "the network"
    return name, {}, "timm"


def torchvision_source(name: str) -> str:
    """Where torchvision will read ``name``'s DEFAULT weights from (it checks its cache itself)."""
    import torchvision

    try:
        url = torchvision.models.get_model_weights(name).DEFAULT.url
    except (ValueError, AttributeError, KeyError):
        raise UserError(f"torchvision has no pretrained weights for '{name}'") from None
    if _hub_file(url).is_file():
        return "the torch hub cache"
    _need_network(f"tv:{name}", url, str(_hub_file(url).parent))
    return urlparse(url).hostname or "the network"
