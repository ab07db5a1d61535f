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


def read_image(source: str | bytes, max_pixels: int | None = None) -> torch.Tensor:
    """Decode a file path or bytes to a uint8 (3, H, W) RGB tensor (first frame of an
    animation); raises :class:`UnreadableImage` on anything that is not a usable image.

    Decoded with PIL, not torchvision.io: with torchvision 0.29 a PNG whose compressed data
    is corrupt (one flipped byte in IDAT with a valid CRC) kills the process with a segfault
    in libpng's error path, which no ``except`` can catch, so one bad file would end a
    training run; PIL raises instead, and gives the same pixels on valid JPEG / PNG / WebP /
    GIF files. The size is read from the header before decoding: over ``max_pixels``
    (decompression bombs), or over PIL's own bomb limit, it is refused with ``too_large``.
    """
    import io
    import warnings

    from PIL import Image, UnidentifiedImageError

    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise UnreadableImage("empty file")
        fh = io.BytesIO(source)
    else:
        if os.path.getsize(source) == 0:
            raise UnreadableImage("empty file")
        fh = source
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
