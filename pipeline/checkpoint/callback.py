"""Lightning callback that writes committed checkpoints every N optimizer steps and at the end, and copies
each one to the mirror when the recipe names one."""
from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L

from ..data.storage import StorageError
from ..errors import RunStopped
from .mirror import Mirror, files_of_rank
from .shared_fs import folder_owner
from .store import STATE, CheckpointConfig, commit, complete_checkpoints, latest_complete, partial_dir, prune, step_dir

log = logging.getLogger(__name__)


class CheckpointWriteError(RunStopped):
    """A checkpoint could not be written (no space left, a quota, a read-only disk): the run stops."""


class CommittedCheckpoint(L.Callback):
    def __init__(self, cfg: CheckpointConfig, write_extras: Callable[[Path], None] | None = None):
        self.cfg, self.root = cfg, Path(cfg.dir)
        self.write_extras = write_extras  # e.g. the resolved config, written into each checkpoint
        self.mirror = Mirror(cfg.mirror) if cfg.mirror else None
        self._last_saved = -1
        self._owner = True  # this process creates, commits and prunes its node's copy of the folder
        self.held = False  # set by a rollback: the weights of the abandoned trajectory are not saved

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._owner = folder_owner(trainer.strategy, self.root)
        shared = trainer.strategy.reduce_boolean_decision(self._owner == trainer.is_global_zero, all=True)
        if not shared and self.mirror is None and trainer.is_global_zero:
            log.warning("%s is not shared between the nodes: each node keeps only its own ranks' files, and a "
                        "resume needs all of them; set checkpoint.mirror to an object-store prefix", self.root)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step > 0 and step % self.cfg.every_n_steps == 0 and step != self._last_saved and not self.held:
            self.save(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step != self._last_saved and not self.held:
            self.save(trainer)

    def hold(self, trainer: L.Trainer, after: int) -> None:
        """Save nothing more in this run, and set aside the checkpoints of steps after ``after`` (renamed
        ``step-N.rolled-back``, mirrored copies removed): a later ``--resume auto`` must not pick them."""
        self.held = True
        if self._owner:
            for step, folder in complete_checkpoints(self.root):
                if step > after:
                    target = folder.with_name(folder.name + ".rolled-back")
                    shutil.rmtree(target, ignore_errors=True)
                    folder.rename(target)
        if self.mirror is not None and trainer.is_global_zero:
            try:
                for step in self.mirror.complete_steps():
                    if step > after:
                        self.mirror.clear(step)
            except StorageError as err:
                log.error("rolled-back checkpoints stay in %s: %s", self.mirror.url, err)
        trainer.strategy.barrier("checkpoint-held")

    def save(self, trainer: L.Trainer) -> Path | None:
        step = trainer.global_step
        if self.held:
            return None
        tmp, final = partial_dir(self.root, step), step_dir(self.root, step)
        if step == self._last_saved:  # e.g. a preemption at a step that was just checkpointed
            return final
        if self._owner:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        trainer.strategy.barrier("checkpoint-begin")
        failure: OSError | None = None
        try:  # full state (optimizer, loops, callbacks); every rank takes part (sharded strategies write per rank)
            trainer.save_checkpoint(tmp / STATE, weights_only=False)
        except OSError as err:  # a full disk, a quota: the ranks agree below, so none waits for another
            failure = err
            # the strategy's save raises once its collectives are done (ZeroStrategy defers its ranks' write
            # errors to the end); this stands in for the barrier that closes Trainer.save_checkpoint
            trainer.strategy.barrier("Trainer.save_checkpoint")
        # every rank's files are written (sharded strategies: each rank its own) before any copy is committed
        written = trainer.strategy.reduce_boolean_decision(failure is None, all=True)
        committed = False
        if written and self._owner:
            try:
                if self.write_extras is not None:
                    self.write_extras(tmp)
                commit(tmp, final, step)
                committed = True
            except OSError as err:
                failure = err
        if not trainer.strategy.reduce_boolean_decision(failure is None, all=True):
            if self._owner:
                shutil.rmtree(tmp, ignore_errors=True)
                if committed:  # another node's copy failed: this one is not a checkpoint of the whole run
                    shutil.rmtree(final, ignore_errors=True)
            newest = latest_complete(self.root)
            raise CheckpointWriteError(
                f"checkpoint of step {step}: writing {tmp} failed "
                f"({failure if failure is not None else 'on another rank'}); the partial folder is removed "
                f"and no resume picks it. The newest complete checkpoint is {newest or 'none'}: free space "
                f"under {self.root} (or set checkpoint.dir elsewhere) and run again with --resume auto")
        trainer.strategy.barrier("checkpoint-committed")
        if self.mirror is not None:
            self._mirror(trainer, step, final)
        if self._owner:
            prune(self.root, self.cfg.keep_last, self.cfg.keep_every_n_steps)
        self._last_saved = step
        return final

    def _mirror(self, trainer: L.Trainer, step: int, final: Path) -> None:
        """Every rank uploads the files it wrote; rank 0 writes the marker once all uploads succeeded. A failed
        upload leaves the step unmirrored (and unmarked) and training goes on: the next checkpoint tries again."""
        assert self.mirror is not None
        start = time.perf_counter()
        if trainer.is_global_zero:
            self.mirror.clear(step)
        trainer.strategy.barrier("mirror-begin")
        try:
            sent, ok = self.mirror.upload(final, step, files_of_rank(final, trainer.global_rank)), True
        except StorageError as err:
            log.error("rank %d: %s", trainer.global_rank, err)
            sent, ok = 0, False
        ok = trainer.strategy.reduce_boolean_decision(ok, all=True)
        if trainer.is_global_zero:
            try:
                if ok:
                    self.mirror.mark_complete(step)
                    self.mirror.prune(self.cfg.keep_last, self.cfg.keep_every_n_steps)
            except StorageError as err:
                log.error("%s", err)
                ok = False
            if ok:
                log.info("checkpoint step %d mirrored to %s in %.1f s (rank 0 sent %.1f MB)", step,
                         self.mirror.step_url(step), time.perf_counter() - start, sent / 1e6)
            else:
                log.error("checkpoint step %d was NOT mirrored to %s: a resume from the mirror would take an "
                          "older step", step, self.mirror.url)
        trainer.strategy.barrier("mirror-end")
