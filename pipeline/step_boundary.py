"""Which micro-batch ends an optimizer step, for callbacks that act once per step.

Lightning calls ``on_train_batch_end`` after every micro-batch. Under gradient accumulation
``trainer.global_step`` moves only after a step's last micro-batch, so a callback that acts once per optimizer
step compares it with the step it saw last."""

from __future__ import annotations

import lightning as L


class StepBoundary:
    def __init__(self) -> None:
        self.step = -1  # the global step seen last (-1: none yet, so the first micro-batch ends one)

    def start(self, trainer: L.Trainer) -> None:
        """At the start of training (a resume included): the step the run begins at is not a boundary."""
        self.step = trainer.global_step

    def crossed(self, trainer: L.Trainer) -> bool:
        """True once per optimizer step, at the end of its last micro-batch; False inside an accumulation."""
        if trainer.global_step == self.step:
            return False
        self.step = trainer.global_step
        return True
