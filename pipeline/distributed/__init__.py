"""Batch arithmetic, the process layout from the launcher, and the strategy object. Knows nothing of models or data."""
from .._lazy import lazy_exports

_WHERE = {"BatchPlan": ".batch", "derive_batch": ".batch", "Layout": ".environment",
          "cluster_environment": ".environment", "launcher_layout": ".environment", "resolve_layout": ".environment",
          "world_size": ".environment", "ZeroConfig": ".strategy", "build_strategy": ".strategy"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
