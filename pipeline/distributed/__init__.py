"""Batch arithmetic, the process layout from the launcher, and the strategy object. Knows nothing of models or data."""
from .batch import BatchPlan, derive_batch
from .environment import Layout, cluster_environment, launcher_layout, resolve_layout, world_size
from .strategy import ZeroConfig, build_strategy

__all__ = ["BatchPlan", "derive_batch", "Layout", "cluster_environment", "launcher_layout", "resolve_layout",
           "world_size", "ZeroConfig", "build_strategy"]
