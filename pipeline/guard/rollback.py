"""Restarting a run from a rollback: the checkpoint's full state (weights, optimizer, schedule, step count,
callbacks), with the data stream and the loop's epoch and batch counters where the abandoned trajectory left
them, so the offending batches are not read again; the learning rate scaled by the guard's ``lr_factor``.

A callback of the restarted run, because it edits the checkpoint as Lightning loads it, before the loops (and
with them the data loader's position) are restored."""
from __future__ import annotations

from typing import Any

import lightning as L

from .callback import Rollback

_FIELDS = ("ready", "started", "processed", "completed")


def _shift(progress: dict[str, Any], by: int) -> None:
    for name in _FIELDS:
        progress[name] = max(0, progress[name] + by)


class ContinueAt(L.Callback):
    def __init__(self, rollback: Rollback):
        self.rollback = rollback

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        """Before Lightning restores its loops: the data loader's state (which the loop restores last) and the
        loop's epoch and in-epoch batch counters move to the data position."""
        position, loop = self.rollback.position, checkpoint["loops"]["fit_loop"]
        (saved,) = loop["state_dict"]["combined_loader"]
        loop["state_dict"]["combined_loader"] = [position]
        for part in ("total", "current"):
            _shift(loop["epoch_progress"][part], position["epoch"] - saved["epoch"])
        # The batch counters move as far as the loader's count did. Their offsets from each other stay (a
        # checkpoint is written between a batch's processing and its completion), never below 0 (a new epoch).
        batches = loop["epoch_loop.batch_progress"]
        for part in ("total", "current"):
            _shift(batches[part], position["batches"] - saved["batches"])

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        factor = self.rollback.lr_factor
        if factor == 1.0:
            return
        for config in trainer.lr_scheduler_configs:  # the schedule onwards, and the step about to run
            scheduler = config.scheduler
            scheduler.base_lrs = [lr * factor for lr in scheduler.base_lrs]
            for group in scheduler.optimizer.param_groups:
                group["lr"] *= factor
