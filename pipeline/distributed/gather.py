"""Python objects from every rank, for the rare, small exchanges (sample keys to name in an error or a log)."""
from __future__ import annotations

from typing import TypeVar

import torch.distributed as dist

T = TypeVar("T")


def every_rank(obj: T) -> list[T]:
    """``obj`` of every rank, in rank order; ``[obj]`` outside a process group of several. A collective: every
    rank calls it at the same point, so every rank reaches the same verdict from the same list."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[T] = [obj] * dist.get_world_size()  # placeholders, replaced by each rank's object
    dist.all_gather_object(out, obj)
    return out
