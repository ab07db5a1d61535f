"""A run folder's record: the settings and data a resumed or reused run must share with it.

``<out>/config.yaml`` holds the merged config and ``<out>/run.json`` what the config cannot
say: the class list and a fingerprint of each split (:func:`kdistill.data.softlabels.fingerprint`,
by file names and labels, so a moved dataset still matches) and the world size. Before a
run continues an earlier one (``--resume``, a reused or resumed stage of ssld, born-again
or the demo), :func:`check` compares both with the new run and refuses, with one line
naming the keys that differ, anything that could change the result; the record is written
again only after that check passed (:func:`write`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import yaml

from .. import distributed as dist
from ..config import Config, dump_yaml, from_dict, to_dict
from ..errors import UserError
from ..utils import write_json

RECORD = "run.json"
FORMAT = 1

#: keys that cannot change what a run computes: they may differ on resume
RESULT_FREE = {"data.workers", "data.persistent_workers", "data.in_memory", "train.progress", "train.sync_every", "train.device", "train.threads",
               "train.resume", "train.out", "model.compile", "model.channels_last", "distill.teacher_runtime",
               "ssld.workers", "ssld.batch_size", "ssld.keep_work", "ssld.teacher_runtime", "ssld.shard_size"}
RESULT_FREE_PREFIXES = ("eval.",)
#: where the data comes from: compared through the record's classes and fingerprints (when
#: the saved run has a record), so the same images at another path still resume
DATA_PATHS = {"data.root", "data.train", "data.val", "data.test", "data.class_map", "data.unlabeled"}
#: schedules whose learning rate at a step does not depend on ``train.epochs``
EPOCH_FREE_SCHEDS = ("step", "multistep", "constant")


def flatten(tree: dict) -> dict[str, Any]:
    """``{section: {field: value}}`` -> ``{"section.field": value}`` (values stay whole)."""
    return {f"{s}.{k}": v for s, fields in tree.items() for k, v in (fields or {}).items()}


def _plain(cfg: Config) -> dict:
    """``cfg`` as YAML would give it back (lists, not tuples)."""
    return yaml.safe_load(yaml.safe_dump(to_dict(cfg)))


def data_record(cfg: Config) -> dict:
    """Classes and fingerprints of the splits ``cfg.data`` opens (without decoding them).
    Shards are fingerprinted by file names and sample counts; with training shards the
    worker count is recorded too, since it decides which shards share a reader
    (``data.streams``)."""
    import torch

    from ..data.datasets import open_splits
    from ..data.shards import ShardSplit
    from ..data.softlabels import fingerprint

    def fp(source):
        return source.fingerprint() if isinstance(source, ShardSplit) else fingerprint(source)

    splits = open_splits(dataclasses.replace(cfg.data, in_memory="no"), need_val=False)
    rec = {"classes": list(splits.classes), "train": fp(splits.train)}
    for name in ("val", "unlabeled"):
        source = getattr(splits, name)
        if source is not None:
            rec[name] = fp(source)
    if isinstance(splits.train, ShardSplit):
        rec["stream_workers"] = max(cfg.data.num_workers(torch.cuda.is_available()), 1)
    return rec


def new_record(cfg: Config) -> dict:
    return {"format": FORMAT, "world_size": dist.world_size(), "data": data_record(cfg)}


def _show(v: Any) -> str:
    text = json.dumps(v) if not isinstance(v, str) else v
    return text if len(text) <= 40 else text[:37] + "..."


def differences(out: Path, cfg: Config, record: dict) -> list[str]:
    """What ``cfg`` (with its ``record``) changes against the run saved in ``out``, one
    phrase per key; empty when the saved run may be continued."""
    saved_path = out / "config.yaml"
    if not saved_path.is_file():
        return []
    try:
        saved_cfg = from_dict(type(cfg), yaml.safe_load(saved_path.read_text()) or {})
    except (UserError, yaml.YAMLError) as err:
        return [f"its config.yaml does not read as this command's config ({err})"]
    old, new = flatten(_plain(saved_cfg)), flatten(_plain(cfg))
    old_rec = {}
    if (out / RECORD).is_file():
        old_rec = json.loads((out / RECORD).read_text())
    skip = set(RESULT_FREE) | (DATA_PATHS if old_rec else set())
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key in skip or key.startswith(RESULT_FREE_PREFIXES) or old.get(key) == new.get(key):
            continue
        if key in ("train.batch_size", "train.accum_steps") and (
                old["train.batch_size"] * old["train.accum_steps"] == new["train.batch_size"] * new["train.accum_steps"]):
            continue  # the same images per update in smaller micro-batches (after running out of memory)
        if key == "train.epochs" and cfg.optim.sched in EPOCH_FREE_SCHEDS:
            continue  # decay points are absolute epochs: the schedule follows a longer run
        if key == "train.epochs":
            diffs.append(f"train.epochs ({old[key]} -> {new[key]}: the {cfg.optim.sched} schedule was "
                         f"built for {old[key]} epochs)")
        else:
            diffs.append(f"{key} ({_show(old.get(key))} -> {_show(new.get(key))})")
    if old_rec:
        if old_rec.get("world_size") != record["world_size"]:
            diffs.append(f"world size ({old_rec.get('world_size')} -> {record['world_size']} processes)")
        od, nd = old_rec.get("data", {}), record["data"]
        if od.get("classes") != nd["classes"]:
            diffs.append(f"classes ({len(od.get('classes', []))} -> {len(nd['classes'])}: "
                         f"{_show(od.get('classes'))} -> {_show(nd['classes'])})")
        else:
            diffs += [f"the {s} images" for s in ("train", "val", "unlabeled") if od.get(s) != nd.get(s)]
            if od.get("stream_workers") != nd.get("stream_workers"):
                diffs.append(f"data.workers ({od.get('stream_workers')} -> {nd.get('stream_workers')}: with wds "
                             "shards the workers decide which shards share a reader)")
    return diffs


def check(out: Path, cfg: Config, what: str = "run", compare: bool = True) -> dict | None:
    """Refuse to continue the ``what`` in ``out`` with settings or data that differ from its
    record (:class:`UserError`, on every rank; nothing is compared unless ``compare``);
    returns the new record to :func:`write` (rank 0; None on other ranks). Rank 0 decides
    and broadcasts."""
    record = diffs = error = None
    if dist.is_main():
        try:
            record = new_record(cfg)
            diffs = differences(out, cfg, record) if compare else []
        except UserError as err:  # bad data: every rank stops with rank 0's line
            error = str(err)
    diffs, error = dist.broadcast_object((diffs, error))
    if error:
        raise UserError(error)
    if diffs:
        more = f" (+{len(diffs) - 4} more)" if len(diffs) > 4 else ""
        raise UserError(f"'{out}' holds a {what} made with other settings: {'; '.join(diffs[:4])}{more}; "
                        "continue it with the same settings, or use a new --out")
    return record


def write(out: Path, cfg: Config, record: dict | None) -> None:
    """``<out>/config.yaml`` and ``<out>/run.json`` (rank 0; call after :func:`check`)."""
    if not dist.is_main():
        return
    out.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, out / "config.yaml")
    if record is not None:
        write_json(out / RECORD, record)


def has_work(out: Path) -> bool:
    """Whether a run of stages (ssld, born-again) in ``out`` has done anything worth keeping."""
    return out.is_dir() and any(p.name not in ("config.yaml", RECORD) for p in out.iterdir())
