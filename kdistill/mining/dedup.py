"""Near-duplicate detection of pool images against evaluation images.

Two independent tests; a pool image is a duplicate if EITHER fires (pHash is reported
when both do):

* **pHash** (perceptual hash): grayscale, resized to 32x32 (whole image, aspect squashed),
  orthonormal 2-D DCT, the 8x8 lowest frequencies thresholded at their median -> 64 bits.
  Robust to re-encoding, resizing and small colour shifts. Each evaluation image is hashed
  whole and as centre crops of :data:`EVAL_CROPS` of its side, so a pool image that is a
  slight crop of it is compared at the right framing. Duplicate at
  ``min Hamming distance <= phash_threshold`` (:data:`PHASH_THRESHOLD`; < 0 disables).
* **Embedding**: the teacher's pooled features (the classifier's input), L2-normalised,
  centred on the evaluation images' mean and normalised again -- pooled ReLU features are
  all positive, so raw cosines crowd near 1 (median nearest-neighbour cosine 0.96 between
  CIFAR-10 train and val with a ResNet-56); centring restores contrast. Duplicate at
  ``cosine >= embed_threshold`` (:data:`EMBED_THRESHOLD`; > 1 disables). Catches shifts,
  re-shoots and colour changes that move the DCT.

Thresholds, measured on CIFAR-10 (50k train as pool vs the 5k val images, ResNet-56
teacher) and on the generated test images of ``tests/test_mining.py``:

* pHash: JPEG q70, resizing, +10% brightness and 80-92% centre crops of CIFAR val images
  all land at distance <= 6 (100% recall); among CIFAR train/val nearest pairs, distance
  <= 4 were all true near-duplicates in a visual check, 6 most, 8 about half, 10 mostly
  distinct. 8 flags 1.1% of CIFAR train (0.5% at 6): losing a few pool images is cheap,
  leaking evaluation images is not, hence 8. Distinct generated test images are >= 12.
* Embedding: at 0.99 (centred) the CIFAR hits beyond pHash were re-shot/shifted copies
  (the CIFAR "Audi" family); at 0.98 most were distinct look-alikes.

Hashes of a small, busy image are less reliable than of a photo; lower the pHash
threshold for very large evaluation sets (more chances of a chance match) and check the
dedup report. Toy images that differ only by pixel noise (``tests/conftest.make_image``)
are perceptual near-duplicates of each other by construction and are flagged as such.

Comparisons are matrix products in chunks, so memory is ``chunk x n_eval`` whatever the
pool size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..data.transforms import to_unit

PHASH_THRESHOLD = 8
EMBED_THRESHOLD = 0.99
EVAL_CROPS = (1.0, 0.95, 0.9, 0.85, 0.8)  # framings of each evaluation image that are hashed
HASH_SIZE = 8  # 8x8 low DCT frequencies -> 64 bits
DCT_SIZE = 32
_LUMA = (0.299, 0.587, 0.114)
_CHUNK_ELEMENTS = 2**24  # pairs compared per matmul chunk (64 MiB as float32)


def _dct_matrix(n: int) -> torch.Tensor:
    """Orthonormal DCT-II matrix ``D``: ``D @ x`` is the DCT of the column vector ``x``."""
    k = torch.arange(n, dtype=torch.float64).unsqueeze(1)
    i = torch.arange(n, dtype=torch.float64).unsqueeze(0)
    d = torch.cos(math.pi * (2 * i + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    d[0] /= math.sqrt(2.0)
    return d.float()


_DCT = _dct_matrix(DCT_SIZE)
_BITS = torch.arange(HASH_SIZE * HASH_SIZE, dtype=torch.int64)


def phash(images: torch.Tensor) -> torch.Tensor:
    """64-bit DCT perceptual hashes of uint8 (or [0, 1] float) images (B, 3|1, H, W) -> int64 (B,)."""
    x = to_unit(images).float()
    if x.dim() == 3:
        x = x.unsqueeze(0)
    if x.shape[1] == 3:
        x = (x * torch.tensor(_LUMA).view(1, 3, 1, 1)).sum(1, keepdim=True)
    x = F.interpolate(x, size=(DCT_SIZE, DCT_SIZE), mode="bilinear", align_corners=False,
                      antialias=True)[:, 0]
    coeffs = (_DCT @ x @ _DCT.T)[:, :HASH_SIZE, :HASH_SIZE].flatten(1)  # (B, 64)
    bits = (coeffs > coeffs.median(dim=1, keepdim=True).values).long()
    return (bits << _BITS).sum(1)  # bit 63 wraps into the sign: harmless for bit comparisons


def hash_bits(h: torch.Tensor) -> torch.Tensor:
    """int64 hashes (N,) -> float 0/1 bit matrix (N, 64)."""
    return ((h.reshape(-1).unsqueeze(-1) >> _BITS) & 1).float()


def _distances(bits_q: torch.Tensor, bits_r: torch.Tensor) -> torch.Tensor:
    # |a xor b| = |a| + |b| - 2 a.b for 0/1 vectors: one matmul for all pairs
    return bits_q.sum(1, keepdim=True) + bits_r.sum(1).unsqueeze(0) - 2 * bits_q @ bits_r.T


def hamming(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pairwise Hamming distances of int64 hashes ``a`` (N,) and ``b`` (M,) -> int64 (N, M)."""
    return _distances(hash_bits(a), hash_bits(b)).round().long()


def _chunks(n: int, m: int):
    step = max(1, _CHUNK_ELEMENTS // max(m, 1))
    for start in range(0, n, step):
        yield start, min(n, start + step)


def nearest_hash(query: torch.Tensor, ref: torch.Tensor,
                 ref_bits: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query hash (N,), the smallest Hamming distance to ``ref`` (M,) and its index
    (65 and -1 when ``ref`` is empty)."""
    dist = torch.full((len(query),), 65, dtype=torch.long)
    idx = torch.full((len(query),), -1, dtype=torch.long)
    if len(ref) == 0 or len(query) == 0:
        return dist, idx
    bits_r = hash_bits(ref) if ref_bits is None else ref_bits
    for s, e in _chunks(len(query), len(bits_r)):
        vals, inds = _distances(hash_bits(query[s:e]), bits_r).min(1)
        dist[s:e], idx[s:e] = vals.round().long(), inds
    return dist, idx


def nearest_cosine(query: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For L2-normalised rows, the largest cosine similarity to ``ref`` and its index."""
    sim = torch.full((len(query),), -2.0)
    idx = torch.full((len(query),), -1, dtype=torch.long)
    if len(ref) == 0 or len(query) == 0:
        return sim, idx
    ref = ref.to(query.device, torch.float32)
    for s, e in _chunks(len(query), len(ref)):
        v, i = (query[s:e].float() @ ref.T).max(1)
        sim[s:e], idx[s:e] = v.cpu(), i.cpu()
    return sim, idx


@dataclass
class Match:
    """Why a pool image was removed: its nearest evaluation image and the firing test."""

    eval_index: int
    method: str  # "phash" or "embedding"
    score: float  # Hamming distance (phash) or cosine (embedding)
    distance: int  # nearest pHash distance, whichever test fired
    cosine: float  # nearest centred cosine (nan when the embedding test is off)


@dataclass
class DedupIndex:
    """Fingerprints of the evaluation images: pHashes (M, len(EVAL_CROPS)) and, optionally,
    raw L2-normalised teacher embeddings (M, D) whose mean becomes the centre."""

    paths: list[str]
    hashes: torch.Tensor
    embeds: torch.Tensor | None = None
    phash_threshold: int = PHASH_THRESHOLD
    embed_threshold: float = EMBED_THRESHOLD
    skipped: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.hashes = self.hashes.reshape(len(self.paths), -1)
        self._bits = hash_bits(self.hashes)
        self.center: torch.Tensor | None = None
        self._keys: torch.Tensor | None = None
        if self.use_embedding and self.embeds is not None and len(self.embeds):
            self.center = F.normalize(self.embeds.float().flatten(1), dim=1).mean(0)
            self._keys = self.embed_keys(self.embeds)

    @property
    def use_embedding(self) -> bool:
        return self.embeds is not None and self.embed_threshold <= 1.0

    def embed_keys(self, embeds: torch.Tensor) -> torch.Tensor:
        """Raw embeddings -> L2-normalised, centred, L2-normalised (the compared vectors)."""
        x = F.normalize(embeds.float().flatten(1), dim=1)
        if self.center is not None:
            x = F.normalize(x - self.center.to(x.device), dim=1)
        return x

    def check(self, hashes: torch.Tensor, embeds: torch.Tensor | None = None) -> list[Match | None]:
        """Per query image (hashes (N,), raw embeddings (N, D)): a :class:`Match` or None."""
        n = len(hashes)
        if not self.paths or n == 0:
            return [None] * n
        per = self.hashes.shape[1]
        dist, hidx = nearest_hash(hashes.reshape(-1), self.hashes.reshape(-1), self._bits)
        sim = torch.full((n,), float("nan"))
        eidx = torch.full((n,), -1, dtype=torch.long)
        if self._keys is not None and embeds is not None:
            sim, eidx = nearest_cosine(self.embed_keys(embeds), self._keys)
        out: list[Match | None] = []
        for d, hi, s, ei in zip(dist.tolist(), hidx.tolist(), sim.tolist(), eidx.tolist()):
            if d <= self.phash_threshold:
                out.append(Match(hi // per, "phash", float(d), d, s))
            elif ei >= 0 and s >= self.embed_threshold:
                out.append(Match(ei, "embedding", round(s, 6), d, s))
            else:
                out.append(None)
        return out

    def state(self) -> dict:
        return {"paths": self.paths, "hashes": self.hashes, "embeds": self.embeds,
                "skipped": self.skipped}

    @classmethod
    def from_state(cls, state: dict, phash_threshold: int, embed_threshold: float) -> "DedupIndex":
        return cls(list(state["paths"]), state["hashes"], state["embeds"], phash_threshold,
                   embed_threshold, list(state["skipped"]))
