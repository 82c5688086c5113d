"""Committed checkpoints, resume discovery and retention: writing and reading state, for any objective.
(Building networks from it belongs to the objectives; export folders to ``pipeline.exports``.)"""
from .._lazy import lazy_exports

_WHERE = {"CommittedCheckpoint": ".callback", "CheckpointConfig": ".store", "complete_checkpoints": ".store",
          "latest_complete": ".store", "prune": ".store", "resolve_resume": ".store"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
