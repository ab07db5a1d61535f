"""Typed run configuration: dataclasses, YAML files and dotted ``-o key=value`` overrides.

Precedence, lowest first: dataclass defaults < ``-c FILE`` (YAML) < command-line flags <
``-o key=value``. The resolved config is written to ``<out>/config.yaml``; the command
that made the run repeats it with ``-c <out>/config.yaml``.
"""
from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence, Union

import yaml

from .errors import UserError


# how a frozen teacher runs (kdistill/methods/compiled.py): distill, cache, mine, eval --teacher
TeacherRuntime = Literal["auto", "eager", "onnx", "compile"]
# says what methods/compiled.py resolve_runtime does for 'auto'
TEACHER_RUNTIME_HELP = ("how a frozen teacher runs: auto (compile on CUDA; on a CPU, eager when the run "
                        "autocasts to bf16, else onnx when onnxruntime is installed, else eager), eager, "
                        "onnx (ONNX Runtime, CPU, fp32) or compile (torch.compile); checked against eager "
                        "at start, eager when it disagrees")


def arg(default: Any, help: str, metavar: str | None = None) -> Any:
    """A dataclass field whose ``help`` (and ``metavar``) also describe its command-line
    flag: :func:`add_flags` makes ``--field-name`` from it, default and all."""
    return field(default=default, metadata={"help": help, "metavar": metavar})


def workers_flag(text: str) -> int | str:
    """A ``--workers`` value: a count >= 0 or ``auto`` (argparse ``type``)."""
    import argparse

    if text.strip().lower() == "auto":
        return "auto"
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"expected a count >= 0 or 'auto', got '{text}'")
    return n


def eval_workers(workers: int | str, device: str | None) -> int:
    """``--workers`` of a command that evaluates (eval, report): ``auto`` resolved for the
    device it runs on."""
    from .utils import resolve_device

    return resolve_workers(workers, resolve_device(device or "auto").type == "cuda")


def resolve_workers(workers: int | str, cuda: bool) -> int:
    """``data.workers`` (a count or ``auto``) as a count. ``auto`` on CUDA: the CPUs this
    process may use per local GPU (or per process of the node under torchrun, if more), at
    most 8. On a CPU, 2 (the default before ``auto``): the training step runs on every
    core, each worker takes one."""
    if workers != "auto":
        return int(workers)
    if not cuda:
        return 2
    import os

    import torch

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    gpus = max(1, torch.cuda.device_count(), int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    return max(1, min(8, cpus // gpus))


@dataclass
class DataConfig:
    """Where images come from and how they are augmented."""

    root: str = ""  # folder with train/ val/ [test/], a list file, wds:DIR, hf:DIR, or 'fashion-mnist'
    train: str | None = None  # explicit split sources (folder, list file, wds:PATTERN, parquet:GLOB), else from root
    val: str | None = None
    test: str | None = None
    class_map: str | None = None  # PaddleClas 'id name' file naming list-file labels
    # sharded sources: the sample's image member / column (wds: jpg;jpeg;png;webp, hf: image)
    # and label member / column (wds: cls, hf: label); None: those defaults
    image_key: str | None = None
    label_key: str | None = None
    image_size: int | None = None  # None: the model's input size, else the images' own size
    mean: list[float] | None = None  # None: the pretrained model's, else dataset statistics
    std: list[float] | None = None
    in_memory: Literal["auto", "yes", "no"] = "auto"  # decode small images once into RAM
    workers: int | Literal["auto"] = 2  # DataLoader processes; auto: see num_workers
    persistent_workers: bool | Literal["auto"] = "auto"  # keep them across epochs; auto: on CUDA
    unlabeled: str | None = None  # extra images without labels (folder or list file; SSLD)
    unlabeled_fraction: float | None = None  # share of each batch; None: in proportion to counts
    ignore_labels: bool = False  # PaddleClas SSLD lists: every training row is unlabeled (label 0)
    max_train_images: int | None = None  # a fixed, seeded subset (quick runs, demos)
    max_val_images: int | None = None
    # augmentation (torchvision transforms v2)
    crop: Literal["auto", "rrc", "pad", "none"] = "auto"  # auto: pad for <=64 px, else rrc
    scale: list[float] = field(default_factory=lambda: [0.08, 1.0])  # RandomResizedCrop
    padding: int = 4  # pad-and-crop
    hflip: float = 0.5
    auto_augment: Literal["none", "autoaugment", "randaugment", "trivialaugment"] = "none"
    eval_crop_pct: float = 1.0  # eval: resize to size/pct, centre-crop size
    mixup: float = 0.0  # Beta(alpha) for mixup; 0 disables
    cutmix: float = 0.0
    mix_prob: float = 1.0
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        _check(len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1] <= 1,
               "data.scale", "must be [min, max] with 0 < min <= max <= 1")
        _check(self.workers == "auto" or self.workers >= 0, "data.workers", "must be >= 0 or auto")
        _check(0 <= self.hflip <= 1, "data.hflip", "must be in [0, 1]")
        _check(0 <= self.label_smoothing < 1, "data.label_smoothing", "must be in [0, 1)")
        _check(self.mixup >= 0 and self.cutmix >= 0, "data.mixup", "alphas must be >= 0")
        _check(0 < self.eval_crop_pct <= 1, "data.eval_crop_pct", "must be in (0, 1]")
        _check(self.image_size is None or self.image_size >= 8, "data.image_size", "must be >= 8")
        _check(self.unlabeled_fraction is None or 0 <= self.unlabeled_fraction <= 1,
               "data.unlabeled_fraction", "must be in [0, 1]")
        for key in ("mean", "std"):
            v = getattr(self, key)
            _check(v is None or len(v) == 3, f"data.{key}", "must have 3 values (RGB)")
        for key in ("max_train_images", "max_val_images"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"data.{key}", "must be > 0")

    def num_workers(self, cuda: bool) -> int:
        """``workers`` as a count (:func:`resolve_workers`)."""
        return resolve_workers(self.workers, cuda)

    def keep_workers(self, cuda: bool) -> bool:
        """``persistent_workers``: ``auto`` keeps them on CUDA."""
        return cuda if self.persistent_workers == "auto" else self.persistent_workers


@dataclass
class ModelConfig:
    """Which network, and where its initial weights come from."""

    name: str = "resnet20"  # zoo name, timm name ('timm:...'), torchvision ('tv:...')
    pretrained: bool = False  # timm / torchvision / Hugging Face weights (the local cache, else downloaded)
    pretrained_path: str | None = None  # local file holding those pretrained weights (implies pretrained)
    checkpoint: str | None = None  # start from a kdistill run or checkpoint
    drop_rate: float = 0.0
    # auto: on for a convolutional model on CUDA and under bf16 on a CPU (faster kernels);
    # kept as 'auto' in config.yaml so a resumed run chooses again on its new machine
    channels_last: bool | Literal["auto"] = "auto"
    compile: bool = False  # torch.compile the student's forward (weights and checkpoints unchanged)
    # quantization-aware training: fp32 with the fake quantization its int8 ONNX export runs
    # (models/quant.py); start it from a float run with model.checkpoint
    qat: bool = False

    def __post_init__(self) -> None:
        _check(bool(self.name), "model.name", "must be set (see `kdistill list models`)")
        _check(0 <= self.drop_rate < 1, "model.drop_rate", "must be in [0, 1)")
        self.pretrained = self.pretrained or bool(self.pretrained_path)  # a local weights file is pretrained


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule, built by timm's factories."""

    name: str = "sgd"  # any timm optimizer: sgd, momentum, adamw, adam, lamb, ...
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    sched: Literal["cosine", "step", "multistep", "constant"] = "cosine"
    warmup_epochs: int = 0
    warmup_lr: float = 1e-4
    min_lr: float = 0.0
    decay_epochs: list[int] = field(default_factory=lambda: [30])  # step / multistep
    decay_rate: float = 0.1
    clip_grad: float | None = None  # global gradient-norm clipping

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr", "must be > 0")
        _check(self.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs", "must be >= 0")
        _check(self.clip_grad is None or self.clip_grad > 0, "optim.clip_grad", "must be > 0")


@dataclass
class TrainConfig:
    """The loop: schedule length, precision, EMA, R-Drop, seeding and outputs."""

    epochs: int = 10
    batch_size: int = 128  # per process
    accum_steps: int = 1
    # auto: autocast where the hardware makes it fast (CUDA; CPUs with native bf16), else fp32;
    # kept as 'auto' in config.yaml so a resumed run chooses again on its new machine
    amp: bool | Literal["auto"] = "auto"
    amp_dtype: Literal["auto", "bf16", "fp16"] = "auto"  # when on: bf16 on CPU; CUDA bf16 if supported
    ema_decay: float = 0.0  # 0 disables the weight EMA; e.g. 0.999
    rdrop: float = 0.0  # R-Drop weight (symmetric KL between two dropout passes)
    seed: int = 0
    device: str = "auto"  # auto, cpu, cuda, cuda:1
    out: str = ""  # run folder; default runs/<model>-<time>
    resume: bool = False
    eval_every: int = 1
    max_steps_per_epoch: int | None = None  # cap for smoke runs and benchmarks
    progress: bool = True
    threads: int | None = None  # torch intra-op threads on CPU
    sync_every: int = 50  # steps between host syncs: the non-finite-loss check and the progress bar

    def __post_init__(self) -> None:
        _check(self.epochs > 0, "train.epochs", "must be > 0")
        _check(self.batch_size > 0, "train.batch_size", "must be > 0")
        _check(self.accum_steps > 0, "train.accum_steps", "must be > 0")
        _check(0 <= self.ema_decay < 1, "train.ema_decay", "must be in [0, 1)")
        _check(self.rdrop >= 0, "train.rdrop", "must be >= 0")
        _check(self.eval_every > 0, "train.eval_every", "must be > 0")
        _check(self.sync_every > 0, "train.sync_every", "must be > 0")
        _check(self.max_steps_per_epoch is None or self.max_steps_per_epoch > 0,
               "train.max_steps_per_epoch", "must be > 0")


@dataclass
class EvalConfig:
    """Evaluation: split, test-time augmentation, batch size; ``kdistill eval``'s flags and
    defaults, and the val passes of a training run (batch_size)."""

    split: Literal["val", "test", "train"] = arg("val", "the split of --data to evaluate")
    tta: bool = arg(False, "average flips and corner crops")
    batch_size: int = arg(256, "images per forward pass", "B")

    def __post_init__(self) -> None:
        _check(self.batch_size > 0, "eval.batch_size", "must be > 0")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _check(ok: bool, key: str, what: str) -> None:
    if not ok:
        raise UserError(f"config key '{key}' {what}")


# ---------------------------------------------------------------- dataclass -> flags


def add_flags(parser: argparse.ArgumentParser, cls: type, names: Sequence[str] = (), *,
              defaults: bool = True, required: Sequence[str] = ()) -> None:
    """Add ``--field-name`` to ``parser`` for each field of dataclass ``cls`` declared with
    :func:`arg` (or for ``names`` only): its type or choices, metavar and help, with the
    default shown. A bool field becomes a switch. ``defaults=False`` leaves an unset flag
    None, so that it overrides no config file (:func:`build_config` skips None)."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in names or [n for n, f in fields.items() if "help" in f.metadata]:
        f, tp = fields[name], hints[name]
        kw: dict[str, Any] = {"help": f.metadata["help"].replace("%", "%%")}
        if tp is bool:
            kw["action"] = "store_true" if f.default is False else argparse.BooleanOptionalAction
        elif typing.get_origin(tp) is Literal:
            kw["choices"] = list(typing.get_args(tp))
        elif tp in (int, float, str):
            kw.update(type=tp, metavar=f.metadata["metavar"])
        else:
            raise TypeError(f"add_flags: no flag for {cls.__name__}.{name} of type {tp}")
        if name in required:
            kw["required"] = True
        else:
            kw["default"] = f.default if defaults else None
            if tp is not bool:
                kw["help"] += f" (default {f.default})"
        parser.add_argument("--" + name.replace("_", "-"), **kw)


def from_args(cls: type, args: argparse.Namespace, **values: Any) -> Any:
    """Dataclass ``cls`` from the flags :func:`add_flags` added (those not None), then
    ``values``; its ``__post_init__`` validates them."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
             if getattr(args, f.name, None) is not None}
    return cls(**{**given, **values})


# ---------------------------------------------------------------- dict <-> dataclass


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, data: dict | None, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict, checking keys and types."""
    data = data or {}
    if not isinstance(data, dict):
        raise UserError(f"config key '{prefix.rstrip('.') or '<root>'}' must be a mapping")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        key = prefix + unknown[0]
        raise UserError(f"unknown config key '{key}' (valid under '{prefix or '<root>'}': "
                        f"{', '.join(sorted(names))})")
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = from_dict(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(map(str, typing.get_args(tp)))
    if typing.get_origin(tp) in (Union, types.UnionType):  # e.g. bool | Literal["auto"]
        values, kinds = [], []
        for arg in typing.get_args(tp):
            if arg is type(None):
                values.append("null")
            elif arg is bool:
                values += ["true", "false"]
            elif typing.get_origin(arg) is Literal:
                values += map(str, typing.get_args(arg))
            else:
                kinds.append(_type_name(arg))
        return " or ".join(kinds + ([", ".join(values)] if kinds else [f"one of {', '.join(values)}"]))
    return str(tp).replace("typing.", "") if not isinstance(tp, type) else tp.__name__


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type hint ``tp`` (with safe numeric widening)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    bad = UserError(f"config key '{key}' expects {_type_name(tp)}, got {value!r}")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except UserError:
                continue
        raise bad
    if origin is Literal:
        if value in args:
            return value
        if isinstance(value, str):  # any case, stored in the canonical spelling
            same = [a for a in args if isinstance(a, str) and a.lower() == value.strip().lower()]
            if same:
                return same[0]
        if value is False and "no" in args:  # YAML reads a bare `no` as False
            return "no"
        if value is True and "yes" in args:
            return "yes"
        raise bad
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            raise bad
        return [coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {coerce(k, args[0], key): coerce(v, args[1], f"{key}.{k}") for k, v in value.items()}
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '1e-3' as a string
            try:
                return float(value)
            except ValueError:
                raise bad from None
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


# ---------------------------------------------------------------- loading


#: ready recipes, shipped as package data: ``-c cifar/kd_resnet56_resnet20`` names one
RECIPES = Path(__file__).resolve().parent / "configs"


def resolve_config(name: str | Path) -> Path:
    """A ``-c`` argument -> a YAML file: an existing path, else a recipe name
    (``cifar/kd_resnet56_resnet20``, with or without ``.yaml``) under :data:`RECIPES`."""
    p = Path(name)
    if p.is_file():
        return p
    stem = str(name).removesuffix(".yaml").removeprefix("configs/")
    recipe = RECIPES / f"{stem}.yaml"
    if recipe.is_file():
        return recipe
    raise UserError(f"config file '{name}' does not exist and is not a recipe name "
                    "(see `kdistill list recipes`)")


def list_recipes(pattern: str | None = None) -> list[tuple[str, str]]:
    """(recipe name, the command its first comment line gives) for every shipped recipe."""
    import fnmatch

    out = []
    for path in sorted(RECIPES.rglob("*.yaml")):
        name = path.relative_to(RECIPES).with_suffix("").as_posix()
        if pattern and not fnmatch.fnmatch(name, f"*{pattern}*"):
            continue
        first = next((ln for ln in path.read_text().splitlines() if ln.startswith("#")), "#")
        out.append((name, first.lstrip("# ").strip()))
    return out


def load_yaml(path: str | Path) -> dict:
    p = resolve_config(path)
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"config file '{path}' is not valid YAML: {str(err).splitlines()[0]}")
    if not isinstance(data, dict):
        raise UserError(f"config file '{path}' must hold a mapping of sections")
    return data


def set_dotted(tree: dict, key: str, value: Any) -> None:
    """``set_dotted(d, 'train.epochs', 3)`` -> ``d['train']['epochs'] = 3``."""
    parts = key.split(".")
    node = tree
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"config key '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """Parse one ``key=value`` override; the value is read as YAML (``3``, ``[1,2]``, ``null``)."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like key=value (e.g. -o train.epochs=3)")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise UserError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def build_config(cls: type = Config, files: list[str] | None = None,
                 flags: dict[str, Any] | None = None, overrides: list[str] | None = None) -> Any:
    """Merge defaults, YAML files, flag values (dotted keys, None = unset) and ``-o`` overrides."""
    tree: dict = {}
    for path in files or []:
        _merge(tree, load_yaml(path))
    for key, value in (flags or {}).items():
        if value is not None:
            set_dotted(tree, key, value)
    for text in overrides or []:
        set_dotted(tree, *parse_override(text))
    return from_dict(cls, tree)


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = v


def dump_yaml(cfg: Any, path: str | Path) -> None:
    from .utils import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
