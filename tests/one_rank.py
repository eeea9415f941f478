"""A one-rank gloo process group inside the test process, for the code paths that need a
process group but not a second process (FSDP2's ``fully_shard`` on one rank); not a test module."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def one_rank_group(mode: str = "fsdp") -> Iterator:
    """A world of one gloo rank (an in-memory store: no port, no environment variables) and its
    DistInfo; the group is torn down afterwards, so later tests see no process group."""
    import torch.distributed as dist

    from ibridge.distributed import DistInfo

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield DistInfo(rank=0, world_size=1, mode=mode)
    finally:
        dist.destroy_process_group()
