"""Committed checkpoints, resume discovery and retention. Knows nothing of the objective."""
from .callback import CommittedCheckpoint
from .export import export_checkpoint, load_encoder
from .store import CheckpointConfig, complete_checkpoints, latest_complete, prune, resolve_resume

__all__ = ["CommittedCheckpoint", "export_checkpoint", "load_encoder", "CheckpointConfig", "complete_checkpoints", "latest_complete", "prune",
           "resolve_resume"]
