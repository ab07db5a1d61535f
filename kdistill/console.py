"""Console output: one-line messages and progress bars on stderr, from rank 0 only."""
from __future__ import annotations

import sys

from . import distributed as dist


def log(msg: str) -> None:
    """One line on stderr, from rank 0 only (kept clear of progress bars)."""
    if dist.is_main():
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


def progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, disable=not (enabled and dist.is_main()), file=sys.stderr,
                dynamic_ncols=True, leave=False, mininterval=0.5)
