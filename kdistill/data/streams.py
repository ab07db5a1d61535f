"""Stage 2 of the data pipeline for WebDataset shards: which process reads which shard in
which order, and the streams of items that come out (``wds:DIR``, ``wds:PATTERN``).

webdataset only reads the tars (``shards.ShardSplit.samples``); kdistill plans the rest,
from the sample counts alone, so every rank computes the same plan without talking:

* **training** (:func:`plan_epoch`): the shards are shuffled from ``(seed, epoch)`` and
  dealt to the ``ranks x workers`` slots greedily by sample count (the longest shard first,
  each to the least loaded slot), so slots are balanced and their loads do not change from
  epoch to epoch; inside a slot the shards keep their shuffled order and samples are
  shuffled through a bounded buffer (:data:`SHUFFLE_BUFFER` encoded samples). A slot's
  batches are its full batches; every rank runs the same number of steps, the minimum over
  ranks (a rank with more full batches drops them from its fullest slots). Slot ``s`` is
  rank ``s // workers``, worker ``s % workers``: the worker count therefore decides which
  shards share a slot (and is recorded for resume), never an item's augmentation, which is
  seeded from ``(seed, epoch, index)`` as for folders (``datasets.EpochItems``).
* **a shard that breaks off mid-epoch** (:class:`~kdistill.data.shards.ShardError`, or a
  tar holding fewer samples than ``_info.json`` says) is not fatal: each of its samples not
  read becomes a skipped item (``"<tar>[<position>]"``, listed in ``skipped.txt`` and counted
  as unreadable images are), which takes its place in the batch. Every slot therefore yields
  exactly its planned number of batches (some of them short, or with no readable image, which
  the trainer steps past together on every rank), so ranks never go out of step.
* **evaluation** (:func:`plan_eval`): shards in their listed order, dealt greedily by count
  to the slots without shuffling; each sample is read exactly once over all ranks and
  workers, in tar order, each slot's last batch short; items carry their split ``index``.

Labeled + unlabeled shards (SSLD) are one stream: without ``data.unlabeled_fraction`` their
shards are planned together (the shuffle mixes them in proportion to their counts); with it,
each side is planned over the slots on its own and every batch takes its share from each.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import UserError
from ..images import read_image
from .shards import Sample, ShardError, ShardSplit
from .sources import UNLABELED, unreadable_reason
from .transforms import item_seed, kept_rngs, seed_rngs

SHUFFLE_BUFFER = 2048  # encoded samples a training slot shuffles among (~10 MB of 32-px JPEGs)


# ------------------------------------------------------------------ the splits of a stream


@dataclass
class Part:
    """One split of a stream: its shards, the offset of its indices (unlabeled images come
    after the labeled ones, as in ``datasets.MixedDataset``) and whether targets are dropped."""

    split: ShardSplit
    offset: int = 0
    unlabeled: bool = False


@dataclass(frozen=True)
class Unit:
    """One shard of one part, with its sample count."""

    part: int
    shard: int
    length: int


def _rng(*key) -> random.Random:
    digest = hashlib.blake2b("/".join(map(str, key)).encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "little"))


def deal(units: list[Unit], slots: int) -> list[list[Unit]]:
    """Units to ``slots`` greedily by length: longest first (ties in the given order), each to
    the least loaded slot (the lowest on ties); each slot keeps the given order. The loads
    depend only on the lengths, not on their order."""
    loads, out = [0] * slots, [[] for _ in range(slots)]
    ranked = sorted(range(len(units)), key=lambda i: -units[i].length)
    picked: list[list[int]] = [[] for _ in range(slots)]
    for i in ranked:
        s = min(range(slots), key=lambda k: (loads[k], k))
        loads[s] += units[i].length
        picked[s].append(i)
    for s in range(slots):
        out[s] = [units[i] for i in sorted(picked[s])]
    return out


@dataclass
class Plan:
    """One epoch: per slot, the units of each group (see :func:`plan_epoch`) and the number
    of batches it yields; ``steps`` batches per rank."""

    slots: list[list[list[Unit]]]  # slot -> group -> units
    batches: list[int]
    steps: int
    workers: int

    def rank_slots(self, rank: int) -> range:
        return range(rank * self.workers, (rank + 1) * self.workers)


def plan_epoch(groups: list[list[Unit]], quotas: list[int], seed: int, epoch: int, world: int,
               workers: int, names: list[str] | None = None) -> Plan:
    """Shards of each group (a group fills ``quotas[g]`` places of every batch) shuffled
    from ``(seed, epoch, g)``, dealt to ``world x workers`` slots; a slot's batches are the
    full batches of its least sufficient group; each rank runs the minimum over ranks, the
    excess dropped one batch at a time from its fullest slot (the lowest on ties)."""
    workers = max(workers, 1)
    n_slots = world * workers
    for g, units in enumerate(groups):
        if len(units) < n_slots:
            what = names[g] if names else "training"
            raise UserError(
                f"the {what} data has {len(units)} shards, fewer than the {n_slots} readers "
                f"({world} processes x {workers} workers) that each need one; lower --workers "
                f"(data.workers) or write more, smaller shards (kdistill pack --shard-size)")
    dealt = []
    for g, units in enumerate(groups):
        order = list(units)
        _rng("shards", seed, epoch, g).shuffle(order)
        dealt.append(deal(order, n_slots))
    full = [min(sum(u.length for u in dealt[g][s]) // quotas[g] for g in range(len(groups)))
            for s in range(n_slots)]
    per_rank = [sum(full[r * workers:(r + 1) * workers]) for r in range(world)]
    steps = min(per_rank)
    for r in range(world):
        mine = list(range(r * workers, (r + 1) * workers))
        for _ in range(per_rank[r] - steps):
            s = max(mine, key=lambda k: (full[k], -k))
            full[s] -= 1
    return Plan([[dealt[g][s] for g in range(len(groups))] for s in range(n_slots)], full, steps, workers)


def plan_eval(units: list[Unit], world: int, workers: int) -> list[list[Unit]]:
    """Evaluation: every shard once, in listed order, dealt by count to the slots."""
    return deal(units, world * max(workers, 1))


# ------------------------------------------------------------------ reading


def read_units(parts: list[Part], units: list[Unit]) -> Iterator[tuple[Part, Sample | None, str, str]]:
    """``(part, sample, "", "")`` for each sample of ``units`` in order, exactly ``length``
    per unit: a sample that cannot be read (the tar breaks off, or holds fewer samples than
    counted) comes as ``(part, None, name, reason)``. Extra samples past the count are not read."""
    for u in units:
        part = parts[u.part]
        url = part.split.urls[u.shard]
        seen, reason = 0, ""
        try:
            for sample in part.split.samples(u.shard):
                if seen >= u.length:
                    break
                yield part, sample, "", ""
                seen += 1
        except ShardError as err:
            reason = f"shard truncated or unreadable: {err.reason}"
        if seen < u.length:
            from ..console import log

            reason = reason or f"the shard holds {seen} samples, {u.length} were counted"
            log(f"warning: {url}: {reason}; its {u.length - seen} remaining samples are skipped")
            for pos in range(seen, u.length):
                yield part, None, f"{url}[{pos}]", reason


def shuffled(stream: Iterator, size: int, rng: random.Random) -> Iterator:
    """``stream`` shuffled through a buffer of ``size`` entries."""
    buf: list = []
    for x in stream:
        if len(buf) < size:
            buf.append(x)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = x
    rng.shuffle(buf)
    yield from buf


def make_item(part: Part, sample: Sample | None, name: str, reason: str,
              transform: Callable | None) -> dict:
    """The item of a sample (as ``datasets.ImageDataset`` makes it), or a skipped entry."""
    if sample is None:
        return {"skipped": name, "reason": reason}
    if sample.error:
        return {"skipped": f"{_url_of(part.split, sample.index)}:{sample.key}", "reason": sample.error}
    try:
        img = read_image(sample.data)
    except Exception as err:  # noqa: BLE001 - any decode failure: skip this sample
        return {"skipped": f"{_url_of(part.split, sample.index)}:{sample.key}", "reason": unreadable_reason(err)}
    if transform is not None:
        img = transform(img)
    target = UNLABELED if part.unlabeled or sample.label is None else sample.label
    return {"image": img, "target": target, "index": part.offset + sample.index}


def _url_of(split: ShardSplit, index: int) -> str:
    import bisect

    return split.urls[bisect.bisect_right(split.offsets, index) - 1]


class _Epoch:
    """The epoch a stream is at, in shared memory: persistent DataLoader workers keep their
    copy of the dataset, and read the epoch from here at each new iteration."""

    def __init__(self) -> None:
        self.value = torch.zeros(1, dtype=torch.long).share_memory_()

    def set(self, epoch: int) -> None:
        self.value[0] = epoch

    def get(self) -> int:
        return int(self.value[0])


def round_robin(streams: list[Iterator]) -> Iterator:
    """One item from each stream in turn, dropping streams as they end (a worker serving
    several readers interleaves their batches as separate workers would)."""
    streams = list(streams)
    while streams:
        for it in list(streams):
            item = next(it, None)
            if item is None:
                streams.remove(it)
            else:
                yield item


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


class TrainStream(IterableDataset):
    """The training batches of one rank as lists of items (collated by the loader), planned
    per epoch by :func:`plan_epoch`; ``len`` is the planned steps (the same every epoch,
    since slot loads do not depend on the shuffle). ``extras(item)`` adds entries to each
    readable item (e.g. stored teacher outputs by index)."""

    def __init__(self, parts: list[Part], transform: Callable | None, batch_size: int, seed: int,
                 rank: int, world: int, workers: int, fraction: float | None = None,
                 extras: Callable[[dict], dict] | None = None, shuffle_buffer: int = SHUFFLE_BUFFER) -> None:
        self.parts, self.transform, self.batch_size, self.seed = parts, transform, batch_size, seed
        self.rank, self.world, self.workers = rank, world, max(workers, 1)
        self.extras, self.shuffle_buffer = extras, shuffle_buffer
        units = [[Unit(p, k, n) for k, n in enumerate(part.split.lengths)] for p, part in enumerate(parts)]
        if len(parts) == 2 and fraction is not None:
            b_u = min(max(round(batch_size * fraction), 1 if fraction > 0 else 0), batch_size)
            pairs = [(units[0], batch_size - b_u, "labeled training"), (units[1], b_u, "unlabeled")]
        else:  # one group: the shuffle mixes the splits in proportion to their counts
            pairs = [([u for us in units for u in us], batch_size, "training")]
        pairs = [(u, q, n) for u, q, n in pairs if q > 0]
        self.groups = [u for u, _, _ in pairs]
        self.quotas = [q for _, q, _ in pairs]
        self.names = [n for _, _, n in pairs]
        self.epoch = _Epoch()
        self.steps = self.plan(0).steps

    def plan(self, epoch: int) -> Plan:
        return plan_epoch(self.groups, self.quotas, self.seed, epoch, self.world, self.workers, self.names)

    @property
    def classes(self) -> list[str]:
        return self.parts[0].split.classes

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return []

    def set_epoch(self, epoch: int) -> None:
        self.epoch.set(epoch)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[list[dict]]:
        epoch = self.epoch.get()
        plan = self.plan(epoch)
        worker, n_workers = _worker()
        # workers=0 reads the rank's slots in turn, one batch each, as workers would yield them
        mine = [plan.rank_slots(self.rank)[w] for w in range(plan.workers) if w % n_workers == worker]
        yield from round_robin([self._slot(plan, s, epoch) for s in mine])

    def _slot(self, plan: Plan, slot: int, epoch: int) -> Iterator[list[dict]]:
        sources = [shuffled(read_units(self.parts, units), self.shuffle_buffer,
                            _rng("samples", self.seed, epoch, slot, g))
                   for g, units in enumerate(plan.slots[slot])]
        for _ in range(plan.batches[slot]):
            raw = [next(src) for src, q in zip(sources, self.quotas) for _ in range(q)]
            items = []
            with kept_rngs():
                for part, sample, name, reason in raw:
                    if sample is not None:
                        seed_rngs(item_seed(self.seed, epoch, part.offset + sample.index))
                    item = make_item(part, sample, name, reason, self.transform)
                    if self.extras is not None and "index" in item:
                        item.update(self.extras(item))
                    items.append(item)
            yield items


class EvalStream(IterableDataset):
    """Each sample of ``split`` once over ``world`` ranks and their workers (:func:`plan_eval`),
    in batches of ``batch_size`` items (lists, collated by the loader), the last of each
    slot short; items carry the split index, so per-image outputs can be put in order."""

    def __init__(self, split: ShardSplit, transform: Callable | None, batch_size: int, rank: int,
                 world: int, workers: int, extras: Callable[[dict], dict] | None = None) -> None:
        self.parts = [Part(split, 0, not split.labeled)]
        self.transform, self.batch_size = transform, batch_size
        self.rank, self.world, self.workers, self.extras = rank, world, max(workers, 1), extras
        units = [Unit(0, k, n) for k, n in enumerate(split.lengths)]
        self.slots = plan_eval(units, world, self.workers)

    @property
    def source(self) -> ShardSplit:
        return self.parts[0].split

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def dropped(self) -> list[tuple[str, str]]:
        return []

    def __len__(self) -> int:
        """Batches of this rank."""
        return sum(-(-sum(u.length for u in self.slots[s]) // self.batch_size)
                   for s in range(self.rank * self.workers, (self.rank + 1) * self.workers))

    def __iter__(self) -> Iterator[list[dict]]:
        worker, n_workers = _worker()
        mine = [self.rank * self.workers + w for w in range(self.workers) if w % n_workers == worker]
        yield from round_robin([self._slot(s) for s in mine])

    def _slot(self, slot: int) -> Iterator[list[dict]]:
        items: list[dict] = []
        for part, sample, name, reason in read_units(self.parts, self.slots[slot]):
            item = make_item(part, sample, name, reason, self.transform)
            if self.extras is not None and "index" in item:
                item.update(self.extras(item))
            items.append(item)
            if len(items) == self.batch_size:
                yield items
                items = []
        if items:
            yield items


# ------------------------------------------------------------------ from datasets to streams


def stream_parts(dataset) -> tuple[list[Part], Callable | None, Callable | None] | None:
    """``(parts, transform, extras)`` when ``dataset`` (an ``ImageDataset``, a
    ``MixedDataset`` of two, possibly inside ``views.WithTeacherOutputs``) reads shards;
    None for file datasets. Labeled and unlabeled images must both be shards or both files."""
    from .datasets import ImageDataset, MixedDataset
    from .views import ViewDataset, WithTeacherOutputs

    if isinstance(dataset, WithTeacherOutputs):
        table = dataset.table
        inner = stream_parts(dataset.dataset)
        if inner is None:
            return None
        return inner[0], inner[1], (lambda item: {"t_logits": table[item["index"]]})
    if isinstance(dataset, ViewDataset) and isinstance(dataset.source, ShardSplit):
        raise UserError("replayable views need random access to the images; with wds shards use "
                        "distill.view=consistent or fixed")
    if isinstance(dataset, ImageDataset) and isinstance(dataset.source, ShardSplit):
        split = dataset.source
        return [Part(split, 0, not split.labeled)], dataset.transform, None
    if isinstance(dataset, MixedDataset):
        lab, unl = dataset.labeled.source, dataset.unlabeled.source
        if isinstance(lab, ShardSplit) and isinstance(unl, ShardSplit):
            return ([Part(lab, 0, not lab.labeled), Part(unl, len(lab), True)],
                    dataset.labeled.transform, None)
        if isinstance(lab, ShardSplit) or isinstance(unl, ShardSplit):
            raise UserError("labeled and unlabeled images must both be wds shards or both files/folders "
                            "(pack the other side with kdistill pack)")
    return None
