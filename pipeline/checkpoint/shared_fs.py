"""Which process owns a folder: one per copy of it, whether the nodes share a filesystem or not."""
from __future__ import annotations

import uuid
from pathlib import Path

from lightning.pytorch.strategies import Strategy


def folder_owner(strategy: Strategy, folder: Path) -> bool:
    """True on exactly one process per copy of ``folder``: global rank 0 when every process sees the same folder
    (a shared filesystem), otherwise local rank 0 of each node (each node has its own copy). Collective: every
    process must call it."""
    if getattr(strategy, "world_size", 1) == 1:
        return True
    folder.mkdir(parents=True, exist_ok=True)
    token = folder / f".shared-{strategy.broadcast(uuid.uuid4().hex)}"
    if strategy.is_global_zero:
        token.touch()
    strategy.barrier("shared-fs-probe")
    shared = strategy.reduce_boolean_decision(token.exists(), all=True)
    strategy.barrier("shared-fs-probed")
    if strategy.is_global_zero:
        token.unlink()
    return strategy.is_global_zero if shared else getattr(strategy, "local_rank", 0) == 0
