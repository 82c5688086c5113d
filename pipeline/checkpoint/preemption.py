"""Checkpoint-and-stop on the signals a scheduler sends before it takes the machines away.

Slurm sends SIGUSR1 ahead of the time limit (``--signal=USR1@T``) or on preemption; Kubernetes sends SIGTERM
when it evicts a pod (a Slurm preemption with a grace time does too). Either signal, on any rank, makes the
run write a committed checkpoint at an optimizer-step boundary (so the saved data position and the weights
agree, and a resume is exact), stop, and report itself preempted. One process acts at its next step; several
agree at the next logging step (every ``trainer.log_every_n_steps`` steps), where they synchronise anyway:
learning of another rank's signal needs a collective whose result the host reads, a stall every step would
pay. Under Slurm, rank 0 then requeues the job (``scontrol requeue``), and the restarted job resumes with ``--resume auto``.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
from typing import Any

import lightning as L
import torch

from .callback import CommittedCheckpoint

log = logging.getLogger(__name__)
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class PreemptionCheckpoint(L.Callback):
    def __init__(self, saver: CommittedCheckpoint, requeue: bool):
        self.saver, self.requeue = saver, requeue
        self.received: int | None = None
        self.preempted: int | None = None  # the signal number once the run stopped for it
        self._last_step = -1

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum  # acted on at the next step boundary, not inside the handler

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning installed its own handlers (its SIGTERM one would abort the run without a
        # checkpoint); Lightning puts back the handlers it found when the run ends.
        for sig in SIGNALS:
            signal.signal(sig, self._handle)
        if trainer.received_sigterm:  # Lightning's handler caught one before this point: ours acts on it
            self.received = signal.SIGTERM
            trainer._signal_connector.received_sigterm = False
        self._last_step = trainer.global_step
        # With several processes Lightning broadcasts its SIGTERM flag from rank 0 before every batch and reads
        # it back: a collective and a host synchronisation per micro-batch. Its handler is replaced above, so the
        # flag it broadcasts can no longer be set; the ranks agree on a signal here, at logging steps.
        loop = trainer.fit_loop.epoch_loop
        if hasattr(loop, "_broadcast_sigterm_tensor"):
            loop._broadcast_sigterm_tensor = lambda: None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._last_step:  # inside a gradient accumulation: not a step boundary
            return
        self._last_step = trainer.global_step
        if trainer.world_size == 1:
            signum = self.received or 0
        elif trainer.global_step % trainer.log_every_n_steps == 0:  # a logging step: the ranks sync there anyway
            # every rank learns of a signal any rank got (one small all-reduce)
            got = torch.tensor(self.received or 0, device=pl_module.device)
            signum = int(trainer.strategy.reduce(got, reduce_op="max"))
        else:
            return
        if not signum:
            return
        log.warning("%s received: checkpointing step %d and stopping", signal.Signals(signum).name,
                    trainer.global_step)
        self.saver.save(trainer)
        self.preempted = signum
        trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.preempted and self.requeue and trainer.is_global_zero and os.environ.get("SLURM_JOB_ID"):
            job = os.environ["SLURM_JOB_ID"]
            out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
            if out.returncode:
                log.error("scontrol requeue %s failed: %s", job, out.stderr.strip())
            else:
                log.warning("Slurm job %s requeued: it resumes from the checkpoint when it runs again", job)
