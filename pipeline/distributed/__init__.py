"""Batch arithmetic, world size from the launcher, and the strategy object. Knows nothing of models or data."""
from .batch import BatchPlan, derive_batch
from .environment import launcher_world_size, world_size
from .strategy import ZeroConfig, build_strategy

__all__ = ["BatchPlan", "derive_batch", "launcher_world_size", "world_size", "ZeroConfig", "build_strategy"]
