"""Committed checkpoints, resume discovery and retention. Knows nothing of the objective."""
from .callback import CommittedCheckpoint
from .store import CheckpointConfig, complete_checkpoints, latest_complete, prune, resolve_resume

__all__ = ["CommittedCheckpoint", "CheckpointConfig", "complete_checkpoints", "latest_complete", "prune",
           "resolve_resume"]
