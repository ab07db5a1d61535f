"""kdistill.images: the JPEG fast path (torchvision's libjpeg-turbo) gives PIL's pixels,
hands everything else to PIL, and corrupt files raise instead of crashing the process."""
from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, corrupt_png, png_bytes
from kdistill import images
from kdistill.images import UnreadableImage, jpeg_header, read_image, read_images


def jpeg(size=(37, 29), mode="RGB", seed=0, **save) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    img = Image.fromarray(arr).resize((size[0] // 2, size[1] // 2)).resize(size)  # some smooth structure
    buf = io.BytesIO()
    img.convert(mode).save(buf, format="JPEG", **save)
    return buf.getvalue()


def pil_pixels(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)


VARIANTS = {"baseline": {}, "progressive": {"progressive": True}, "444": {"subsampling": 0},
            "grey": {"mode": "L"}, "exif": {"exif": b"Exif\x00\x00" + b"\x00" * 40}}


@pytest.mark.parametrize("name", VARIANTS)
def test_jpeg_fast_path_gives_pil_pixels(name, monkeypatch):
    save = dict(VARIANTS[name])
    data = jpeg(mode=save.pop("mode", "RGB"), quality=85, **save)
    assert jpeg_header(data)[:2] == (29, 37)
    calls = []
    real = images._decode_jpegs
    monkeypatch.setattr(images, "_decode_jpegs", lambda x: calls.append(len(x)) or real(x))
    got = read_image(data)
    assert calls == [1], "decoded by libjpeg-turbo, not PIL"
    assert got.dtype == torch.uint8 and got.shape == (3, 29, 37) and torch.equal(got, pil_pixels(data))


def test_cmyk_and_other_formats_go_to_pil(monkeypatch, tmp_path):
    monkeypatch.setattr(images, "_decode_jpegs", lambda x: pytest.fail("not for the fast path"))
    cmyk = jpeg(mode="CMYK")
    assert jpeg_header(cmyk)[2] == 4
    assert torch.equal(read_image(cmyk), pil_pixels(cmyk))
    png = png_bytes()
    assert torch.equal(read_image(png), pil_pixels(png))
    path = tmp_path / "a.webp"
    path.write_bytes(png_bytes(fmt="WEBP"))
    assert read_image(str(path)).shape == (3, 32, 32)


def test_header_sizes_are_checked_before_decoding(monkeypatch):
    data = jpeg(size=(40, 30))
    with pytest.raises(UnreadableImage) as err:
        read_image(data, max_pixels=1000)
    assert err.value.too_large and "40x30" in str(err.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # PIL's bomb limit holds on the fast path too
    with pytest.raises(UnreadableImage) as err:
        read_image(data)
    assert err.value.too_large
    assert jpeg_header(b"\xff\xd8\xff\xd9") is None and jpeg_header(png_bytes()) is None


def test_read_images_matches_read_image_one_by_one(tmp_path):
    good = [jpeg(seed=s) for s in range(4)]
    truncated = good[0][: len(good[0]) // 3]
    path = tmp_path / "x.jpg"
    path.write_bytes(good[1])
    sources = [good[0], truncated, png_bytes(), b"", corrupt_png(), str(path), good[2], b"\xff\xd8\xff garbage",
               str(tmp_path / "missing.jpg"), good[3]]
    out = read_images(sources)
    assert len(out) == len(sources)
    for source, got in zip(sources, out):
        try:
            want = read_image(source)
        except Exception as err:  # noqa: BLE001
            assert type(got) is type(err) and str(got) == str(err)
        else:
            assert isinstance(got, torch.Tensor) and torch.equal(got, want)
    assert [isinstance(x, torch.Tensor) for x in out] == [True, False, True, False, False, True, True, False, False,
                                                          True]


FUZZ = """
import io, random, sys, numpy as np, torch
from PIL import Image
from kdistill.images import read_image, read_images, UnreadableImage
rng = random.Random(0)
seeds = []
for s, size in enumerate([(32, 32), (61, 47), (300, 220)]):
    arr = np.random.default_rng(s).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    for opts in ({}, {"progressive": True}):
        buf = io.BytesIO(); Image.fromarray(arr).save(buf, "JPEG", quality=90, **opts); seeds.append(buf.getvalue())
counts = {"ok": 0, "err": 0}
batch = []
for n in range(int(sys.argv[1])):
    d = bytearray(rng.choice(seeds))
    kind = n % 4
    if kind == 0:
        d = d[:rng.randrange(2, len(d))]
    elif kind == 1:
        for _ in range(rng.randrange(1, 12)):
            d[rng.randrange(len(d))] = rng.randrange(256)
    elif kind == 2:
        i = rng.randrange(len(d)); d[i:i + 64] = bytes(min(64, len(d) - i))
    else:
        d[rng.randrange(min(len(d), 600))] = rng.randrange(256)
    try:
        img = read_image(bytes(d))
        assert img.dtype == torch.uint8 and img.shape[0] == 3
        counts["ok"] += 1
    except UnreadableImage:
        counts["err"] += 1
    batch.append(bytes(d))
assert len(read_images(batch)) == len(batch)
print(counts["ok"], counts["err"])
"""


def test_corrupted_jpegs_raise_and_never_crash_the_process():
    """Truncated, byte-flipped, zeroed and header-damaged JPEGs, decoded in a child process
    (a crash there would fail this test instead of killing the suite)."""
    r = subprocess.run([sys.executable, "-c", FUZZ, "800"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ok, bad = map(int, r.stdout.split())
    assert ok + bad == 800 and ok > 50 and bad > 200
