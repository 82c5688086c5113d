"""Keep a recipe's global batch on any world size: per-device batch x world x accumulation = global."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class BatchPlan:
    global_batch: int
    world_size: int
    per_device: int
    accumulate: int

    def __str__(self) -> str:
        return (f"global batch {self.global_batch} = {self.per_device} per device x {self.world_size} devices "
                f"x {self.accumulate} accumulation steps")


def derive_batch(global_batch: int, world_size: int, max_micro_batch: int | None = None) -> BatchPlan:
    """Smallest accumulation such that the per-device batch fits ``max_micro_batch`` and divides exactly."""
    if global_batch % world_size:
        raise ValueError(f"global batch {global_batch} is not divisible by world size {world_size}")
    per_rank = global_batch // world_size
    cap = max_micro_batch or per_rank
    for accumulate in range(max(1, math.ceil(per_rank / cap)), per_rank + 1):
        if per_rank % accumulate == 0:
            return BatchPlan(global_batch, world_size, per_rank // accumulate, accumulate)
    raise AssertionError("unreachable: accumulate = per_rank always divides")
