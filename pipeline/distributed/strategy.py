"""Training strategy from the recipe: single device, DDP, or DeepSpeed ZeRO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings, used when ``trainer.strategy`` is ``deepspeed``."""

    stage: Literal[1, 2, 3] = 2
    offload_optimizer: bool = False
    offload_parameters: bool = False
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True


def build_strategy(name: str, zero: ZeroConfig) -> Any:
    """A Lightning strategy object or name; ``auto`` lets Lightning pick (single device on one process)."""
    if name == "deepspeed":
        from .zero import ZeroStrategy

        return ZeroStrategy(stage=zero.stage, offload_optimizer=zero.offload_optimizer,
                            offload_parameters=zero.offload_parameters,
                            allgather_bucket_size=zero.allgather_bucket_size,
                            reduce_bucket_size=zero.reduce_bucket_size, overlap_comm=zero.overlap_comm,
                            contiguous_gradients=zero.contiguous_gradients)
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return name
