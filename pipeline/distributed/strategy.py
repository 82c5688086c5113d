"""Training strategy from the recipe: single device, DDP, or DeepSpeed ZeRO."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal


@dataclass
class ZeroConfig:
    """DeepSpeed ZeRO settings, used when ``trainer.strategy`` is ``deepspeed``. Sizes count elements."""

    stage: Literal[1, 2, 3] = 2
    """1: optimizer state sharded over the ranks; 2: and gradients; 3: and the weights."""
    offload_optimizer: bool = False
    offload_parameters: bool = False
    allgather_bucket_size: int = 200_000_000
    reduce_bucket_size: int = 200_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    sub_group_size: int = 1_000_000_000
    """The optimizer steps each rank's partition in groups of this size: smaller groups, smaller temporaries."""
    stage3_max_live_parameters: int = 1_000_000_000
    """ZeRO-3: most gathered parameters held at once."""
    stage3_max_reuse_distance: int = 1_000_000_000
    """ZeRO-3: keep a gathered parameter if it is used again within this many; 0 frees every one after use."""
    stage3_prefetch_bucket_size: int = 50_000_000


def build_strategy(name: str, zero: ZeroConfig, device_skips: bool = False) -> Any:
    """A Lightning strategy object or name; ``auto`` lets Lightning pick (single device on one process).
    ``device_skips``: the training guard skips non-finite steps on the device (ZeRO need not check them)."""
    if name == "deepspeed":
        from .zero import ZeroStrategy

        strategy = ZeroStrategy(device_skips=device_skips, stage=zero.stage, offload_optimizer=zero.offload_optimizer,
                                offload_parameters=zero.offload_parameters,
                                allgather_bucket_size=zero.allgather_bucket_size,
                                reduce_bucket_size=zero.reduce_bucket_size, overlap_comm=zero.overlap_comm,
                                contiguous_gradients=zero.contiguous_gradients, sub_group_size=zero.sub_group_size)
        # DeepSpeed times each step when it does not own the data loader (Lightning's case), by default with a
        # device synchronisation at the forward's start and at the step's end: two host waits per step that let
        # the host queue nothing ahead. Throughput is measured by vitpipe's own callback, at window ends.
        strategy.config["timers"] = {"throughput": {"enabled": False}}
        if zero.stage == 3:  # keys Lightning's constructor does not take
            strategy.config["zero_optimization"].update(
                stage3_max_live_parameters=zero.stage3_max_live_parameters,
                stage3_max_reuse_distance=zero.stage3_max_reuse_distance,
                stage3_prefetch_bucket_size=zero.stage3_prefetch_bucket_size)
        return strategy
    if name == "ddp":
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(find_unused_parameters=False)
    return name
