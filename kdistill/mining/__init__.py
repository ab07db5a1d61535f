"""SSLD mining: a teacher scores an unlabeled pool, near-duplicates of the evaluation images
are dropped, and the top-k images per class become a PaddleClas list (``kdistill mine``)."""
from .cli import MineConfig, add_mine_parser, cmd_mine, mine
from .dedup import EMBED_THRESHOLD, PHASH_THRESHOLD, DedupIndex, hamming, nearest_hash, phash
from .pool import PathTable, Pool, open_pool
from .score import TopK, assign, merge_shards

__all__ = ["mine", "MineConfig", "add_mine_parser", "cmd_mine", "phash", "hamming", "nearest_hash", "DedupIndex",
           "PHASH_THRESHOLD", "EMBED_THRESHOLD", "open_pool", "Pool", "PathTable", "TopK", "assign",
           "merge_shards"]
