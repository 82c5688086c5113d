"""Lightning callback that writes committed checkpoints every N optimizer steps and at the end."""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable

import lightning as L

from .store import STATE, CheckpointConfig, commit, partial_dir, prune, step_dir


class CommittedCheckpoint(L.Callback):
    def __init__(self, cfg: CheckpointConfig, write_extras: Callable[[Path], None] | None = None):
        self.cfg, self.root = cfg, Path(cfg.dir)
        self.write_extras = write_extras  # e.g. the resolved config, written into each checkpoint
        self._last_saved = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0 and step != self._last_saved:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved:
            self.save(trainer)

    def save(self, trainer: L.Trainer) -> Path:
        step = trainer.global_step
        tmp, final = partial_dir(self.root, step), step_dir(self.root, step)
        if trainer.is_global_zero:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("checkpoint-begin")
        trainer.save_checkpoint(tmp / STATE)  # every rank takes part (sharded strategies write per rank)
        trainer.strategy.barrier("checkpoint-written")
        if trainer.is_global_zero:
            if self.write_extras is not None:
                self.write_extras(tmp)
            commit(tmp, final, step)
            prune(self.root, self.cfg.keep_last, self.cfg.keep_every_n_steps)
        trainer.strategy.barrier("checkpoint-committed")
        self._last_saved = step
        return final
