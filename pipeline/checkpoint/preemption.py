"""Checkpoint-and-stop on the signals a scheduler sends before it takes the machines away.

Slurm sends SIGUSR1 ahead of the time limit (``--signal=USR1@T``) or on preemption; Kubernetes sends SIGTERM
when it evicts a pod (a Slurm preemption with a grace time does too). Either signal, on any rank, makes the
run write a committed checkpoint at an optimizer-step boundary (so the saved data position and the weights
agree, and a resume is exact), stop, and report itself preempted. With checkpoints off the run stops the
same way, with nothing to resume from, and is not requeued. One process acts at its next step; several
agree at the next logging step (every ``trainer.log_every_n_steps`` steps), where they synchronise anyway:
learning of another rank's signal needs a collective whose result the host reads, a stall every step would
pay. Under Slurm, rank 0 then requeues the job (``scontrol requeue``), and the restarted job resumes with
``--resume auto``.

The signals belong to this module for the whole training stage (``held_signals``), not only while the loop
runs: one that comes while the model is built or a checkpoint restored stops the run at its first step, and
one that comes after the last step lets the stage finish (its final checkpoint is written anyway). Lightning's
own handlers are never installed: its SIGTERM handler broadcasts from inside the handler, a collective that
deadlocks when the ranks are elsewhere.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lightning as L
import torch

from ..step_boundary import StepBoundary
from .callback import CommittedCheckpoint

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
_noted: list[int] = []  # the signals received while held, first one first


def _note(signum: int, frame: Any) -> None:
    _noted.append(signum)  # acted on at the next step boundary, never inside the handler


def received() -> int | None:
    """The first signal received since ``held_signals`` began, if any."""
    return _noted[0] if _noted else None


@contextlib.contextmanager
def held_signals() -> Iterator[None]:
    """SIGUSR1 and SIGTERM are noted (``received``) instead of ending the process; the handlers found are put
    back at the end. Only the main thread can set handlers: elsewhere nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _noted.clear()
    previous = {sig: signal.signal(sig, _note) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class PreemptionStop(L.Callback):
    """Stops the run at the step boundary after a held signal (see ``held_signals``), with a checkpoint when
    there is a ``saver`` (checkpoints on)."""

    def __init__(self, saver: CommittedCheckpoint | None, on_stop: Callable[[str, int], None] | None = None):
        self.saver = saver
        self.on_stop = on_stop  # told (signal name, step) when the run stops: the tracking run's status
        self.preempted: int | None = None  # the signal number once the run stopped for it
        self.boundary = StepBoundary()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        # Before Lightning installs its handlers (later in the same call): it must not, see the module's text.
        # Checkpoints off included: its per-batch broadcast below would otherwise stay.
        trainer._signal_connector.register_signal_handlers = lambda: None
        # With several processes Lightning also broadcasts its SIGTERM flag from rank 0 before every batch and
        # reads it back: a collective and a host synchronisation per micro-batch, for a flag nothing sets now.
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = lambda: None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.boundary.start(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if not self.boundary.crossed(trainer):
            return
        if trainer.world_size == 1:
            signum = received() or 0
        elif trainer.global_step % trainer.log_every_n_steps == 0:  # a logging step: the ranks sync there anyway
            # every rank learns of a signal any rank got (one small all-reduce)
            got = torch.tensor(received() or 0, device=pl_module.device)
            signum = int(trainer.strategy.reduce(got, reduce_op="max"))
        else:
            return
        if not signum:
            return
        if 0 < trainer.max_steps <= trainer.global_step:  # the last step: the run ends here with its checkpoint
            log.warning("%s received at the last step (%d): the run ends as planned", signal.Signals(signum).name,
                        trainer.global_step)
            return
        name = signal.Signals(signum).name
        if self.saver is None:
            log.warning("%s received: stopping after step %d (checkpoints are off: nothing to resume from)", name,
                        trainer.global_step)
        else:
            log.warning("%s received: checkpointing step %d and stopping", name, trainer.global_step)
            self.saver.save(trainer)
        self.preempted = signum
        trainer.should_stop = True
        if self.on_stop is not None:
            self.on_stop(name, trainer.global_step)


def end_preempted_stage(requeue: bool) -> None:
    """The last act of a stage a signal stopped, on every rank, once each has written all it writes.

    Rank 0 requeues the Slurm job (``requeue``) only when every rank has finished, and no rank leaves before
    it did: Slurm ends the job's processes as it requeues, and ``srun --kill-on-bad-exit`` ends them all as
    soon as one exits with its 128 + signal. Either, coming early, cut a rank short (its MLflow run, its
    files), or the requeue itself."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized()
    if group:
        torch.distributed.barrier()  # every rank is done
    job = os.environ.get("SLURM_JOB_ID")
    if requeue and job and (not group or torch.distributed.get_rank() == 0):
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
        if out.returncode:
            log.error("scontrol requeue %s failed: %s", job, out.stderr.strip())
        else:
            log.warning("Slurm job %s requeued: it resumes from the checkpoint when it runs again", job)
    if group:
        torch.distributed.barrier()  # nobody exits before the requeue was asked for
