"""Decoding one image file or upload into a uint8 RGB tensor, safely.

A leaf shared by the data sources, the mining pool and deploy (predict, serve): it imports
nothing from the package's layers.
"""
from __future__ import annotations

import os

import numpy as np
import torch

from .utils import first_line


class UnreadableImage(ValueError):
    """A file or upload that is not a usable image; ``too_large`` marks a pixel-count limit."""

    def __init__(self, message: str, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


JPEG_MAGIC = b"\xff\xd8\xff"
_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # frame headers (not DHT, JPG, DAC)


def jpeg_header(data: bytes) -> tuple[int, int, int] | None:
    """``(height, width, components)`` from a JPEG's frame header (its SOFn marker), read
    without decoding; None when ``data`` is not a JPEG or no frame header comes before the
    scan data."""
    if not data.startswith(JPEG_MAGIC):
        return None
    i, n = 2, len(data)
    while i + 4 <= n:
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
        elif marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
        elif marker in (0xD9, 0xDA):  # end of image, start of scan: no frame header first
            return None
        elif marker in _SOF:
            if i + 10 > n:
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), data[i + 9]
        else:
            i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
    return None


def _jpeg_input(data: bytes, max_pixels: int | None) -> torch.Tensor | None:
    """The bytes as the uint8 tensor libjpeg-turbo decodes, when the fast path may take them:
    a JPEG with 1 (grey) or 3 (YCbCr) components whose header size is within ``max_pixels``
    and PIL's bomb limit; None sends the image to PIL (CMYK, anything odd, refusals)."""
    header = jpeg_header(data)
    if header is None or header[2] not in (1, 3):
        return None
    from PIL import Image

    pixels = header[0] * header[1]
    limits = [x for x in (max_pixels, Image.MAX_IMAGE_PIXELS) if x is not None]
    if pixels == 0 or any(pixels > x for x in limits):  # PIL refuses (or warns) with the reason
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


def _decode_jpegs(inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(inputs, mode=ImageReadMode.RGB)


def _read_bytes(source: str | bytes) -> bytes:
    if isinstance(source, (bytes, bytearray)):
        data = bytes(source)
    else:
        with open(source, "rb") as fh:
            data = fh.read()
    if not data:
        raise UnreadableImage("empty file")
    return data


def read_image(source: str | bytes, max_pixels: int | None = None) -> torch.Tensor:
    """Decode a file path or bytes to a uint8 (3, H, W) RGB tensor (first frame of an
    animation); raises :class:`UnreadableImage` on anything that is not a usable image.

    Baseline and progressive JPEGs (grey or YCbCr) are decoded by torchvision's libjpeg-turbo
    (``decode_jpeg``): the same pixels as PIL's libjpeg-turbo, without PIL's Python header
    parsing, most of the cost of a small image. A JPEG it rejects, and every other format,
    goes to PIL. Not torchvision.io for the rest: with torchvision 0.29 a PNG whose
    compressed data is corrupt (one flipped byte in IDAT with a valid CRC) kills the process
    with a segfault in libpng's error path, which no ``except`` can catch; libjpeg's errors
    are raised as exceptions (tests/test_images.py decodes hundreds of corrupted JPEGs in a
    child process). The size is read from the header before decoding: over ``max_pixels``
    (decompression bombs), or over PIL's own bomb limit, it is refused with ``too_large``.
    """
    data = _read_bytes(source)
    fast = _jpeg_input(data, max_pixels)
    if fast is not None:
        try:
            return _decode_jpegs([fast])[0]
        except RuntimeError:  # libjpeg gave up: PIL gives the reason (or the pixels)
            pass
    return _read_pil(data, max_pixels)


def read_images(sources: list[str | bytes]) -> list[torch.Tensor | UnreadableImage | OSError]:
    """:func:`read_image` of many images: each one's tensor, or the error it raised. The
    JPEGs go to libjpeg-turbo in one call (per-call overhead is a large part of a 32-px
    image's decode); if that call fails, they are decoded one by one."""
    out: list = [None] * len(sources)
    fast: dict[int, torch.Tensor] = {}
    for i, source in enumerate(sources):
        try:
            data = _read_bytes(source)
        except (UnreadableImage, OSError) as err:
            out[i] = err
            continue
        t = _jpeg_input(data, None)
        if t is not None:
            fast[i] = t
        out[i] = data
    try:
        for i, img in zip(fast, _decode_jpegs(list(fast.values())) if fast else ()):
            out[i] = img
    except RuntimeError:  # one of them is corrupt: the per-image path finds which
        pass
    for i, x in enumerate(out):
        if isinstance(x, bytes):
            try:
                out[i] = read_image(x)
            except UnreadableImage as err:
                out[i] = err
    return out


def _read_pil(data: bytes, max_pixels: int | None) -> torch.Tensor:
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    fh = io.BytesIO(data)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(fh) as im:
                width, height = im.size  # header only: nothing decoded yet
                if max_pixels is not None and width * height > max_pixels:
                    raise UnreadableImage(f"image has {width}x{height} = {width * height} pixels, "
                                          f"over the limit of {max_pixels}", too_large=True)
                # (convert() of an RGB image would copy it once more)
                arr = np.array(im if im.mode == "RGB" else im.convert("RGB"))
    except UnreadableImage:
        raise
    except Image.DecompressionBombError as err:
        raise UnreadableImage(f"image too large ({first_line(err)})", too_large=True) from None
    except UnidentifiedImageError:
        raise UnreadableImage("not a readable image (unknown format or corrupt header)") from None
    except Exception as err:  # noqa: BLE001 - PIL raises many types for corrupt data
        raise UnreadableImage(f"not a readable image ({type(err).__name__}: {first_line(err)})") from None
    if arr.ndim != 3 or arr.shape[0] * arr.shape[1] == 0:
        raise UnreadableImage("image has no pixels")
    # a (3, H, W) view of the (H, W, 3) pixels, not a contiguous copy: torch's uint8 resize
    # kernels read channels-last memory (they would convert a contiguous CHW image back), and
    # the copy was a large part of the 224-px decode cost
    return torch.from_numpy(arr).permute(2, 0, 1)
