"""SSLD mining: a teacher scores an unlabeled pool (a folder, a list file or WebDataset
shards) shard by shard in bounded memory, near-duplicates of the evaluation images are
dropped, and the top-k images per class become a PaddleClas list or new shards
(``kdistill mine``)."""
from .cli import MineConfig, add_mine_parser, cmd_mine, mine
from .dedup import EMBED_THRESHOLD, PHASH_THRESHOLD, DedupIndex, hamming, nearest_hash, phash
from .output import ListTarget, ShardTarget, open_target
from .pool import PathPool, Pool, ShardPool, open_pool, open_reference
from .score import TopK, assign, merge_shards

__all__ = ["mine", "MineConfig", "add_mine_parser", "cmd_mine", "phash", "hamming", "nearest_hash", "DedupIndex",
           "PHASH_THRESHOLD", "EMBED_THRESHOLD", "open_pool", "open_reference", "Pool", "PathPool", "ShardPool",
           "TopK", "assign", "merge_shards", "open_target", "ListTarget", "ShardTarget"]
