"""Committed checkpoints, resume discovery and retention (objective-agnostic), and export of MAE weights."""
from .._lazy import lazy_exports

_WHERE = {"CommittedCheckpoint": ".callback", "CheckpointConfig": ".store", "complete_checkpoints": ".store",
          "export_checkpoint": ".export", "latest_complete": ".store", "load_encoder": ".export", "prune": ".store",
          "resolve_resume": ".store"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
