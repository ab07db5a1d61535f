"""WebDataset shard splits (data/shards.py): counts from _info.json or by reading, sample
indices stable across shards, and one-line errors for broken shards."""
from __future__ import annotations

import pytest
import torch

from kdistill.data.shards import (ShardError, ShardWriter, encode_sample_bytes, open_wds, read_info,
                                  write_info)
from kdistill.errors import UserError


def _pack(folder, n=7, size=3):
    w = ShardWriter(folder, "train", size)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        w.write(f"{i:05d}", encode_sample_bytes(torch.randint(0, 255, (3, 8, 8), dtype=torch.uint8, generator=g)), i % 2)
    write_info(folder, {"train": w.close()}, ["a", "b"])


def test_written_shards_open_with_counts_classes_and_stable_indices(tmp_path):
    _pack(tmp_path)
    split = open_wds(f"wds:{tmp_path}", "train")
    assert split.lengths == [3, 3, 1] and split.classes == ["a", "b"] and split.class_counts == [4, 3]
    samples = [s for k in range(3) for s in split.samples(k)]
    assert [s.index for s in samples] == list(range(7)) and [s.label for s in samples] == [i % 2 for i in range(7)]
    assert open_wds(f"wds:{tmp_path}/train-{{000000..000001}}.tar", "train").lengths == [3, 3]
    (tmp_path / "_info.json").unlink()  # without _info.json: counted by reading every tar
    assert open_wds(f"wds:{tmp_path}", "train").lengths == [3, 3, 1]
    assert read_info(tmp_path) is None


def test_broken_shards_give_one_line(tmp_path):
    _pack(tmp_path)
    with pytest.raises(UserError, match="match no file|does not exist"):
        open_wds(f"wds:{tmp_path}/val-{{000000..000001}}.tar", "val")
    data = (tmp_path / "train-000001.tar").read_bytes()
    (tmp_path / "train-000001.tar").write_bytes(data[:len(data) // 2 // 512 * 512 + 700])  # cut inside a member
    split = open_wds(f"wds:{tmp_path}", "train")  # the first shard is fine
    with pytest.raises(ShardError, match="train-000001.tar"):
        list(split.samples(1))
    (tmp_path / "train-000000.tar").write_bytes(b"not a tar" * 200)
    with pytest.raises(UserError, match="train-000000.tar.*not a readable tar"):
        open_wds(f"wds:{tmp_path}", "train")
