"""Committed checkpoints, resume discovery and retention (objective-agnostic), and export of MAE weights."""
from .callback import CommittedCheckpoint
from .export import export_checkpoint, load_encoder
from .store import CheckpointConfig, complete_checkpoints, latest_complete, prune, resolve_resume

__all__ = ["CommittedCheckpoint", "CheckpointConfig", "complete_checkpoints", "export_checkpoint",
           "latest_complete", "load_encoder", "prune", "resolve_resume"]
