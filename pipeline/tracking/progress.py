"""Training progress on the console: step, loss, images/s and ETA, as a bar on a terminal or as one line every
``log_every_n_steps`` optimizer steps in a log file (Slurm, Kubernetes, a pipe), where a bar's carriage
returns would pile up into one unreadable line.

Metrics are read from the trainer only on logging steps (when Lightning has reduced them anyway), so showing
progress adds no host synchronisation to the other steps."""
from __future__ import annotations

import sys
import time
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar

from ..console import duration, is_terminal

SHOWN = {"train/loss": "loss", "perf/images_per_s": "img/s", "perf/mfu": "mfu"}


def _shown_metrics(trainer: L.Trainer) -> dict[str, float]:
    out = {}
    for key, name in SHOWN.items():
        value = trainer.callback_metrics.get(key)
        if value is not None:
            out[name] = float(value)
    return out


def _logging_step(trainer: L.Trainer) -> bool:
    return trainer.global_step % max(trainer.log_every_n_steps, 1) == 0


class StepBar(TQDMProgressBar):
    """Lightning's bar without ``v_num`` (the run id's tail), showing the optimizer step, loss and images/s."""

    def __init__(self) -> None:
        super().__init__()
        self._cache: dict[str, Any] = {}

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        if not self._cache or _logging_step(trainer):
            self._cache = {k: round(v, 4 if k == "loss" else 1) for k, v in _shown_metrics(trainer).items()}
        return {"step": trainer.global_step, **self._cache}


class StepLines(L.Callback):
    """``step 120/400 (30%), loss 0.8123, 85.2 img/s, 1m02s elapsed, ETA 2m24s`` every N optimizer steps, and a
    line without the metrics (read only on logging steps) whenever ``quiet_s`` pass without one: slow steps
    never leave a log silent for long."""

    def __init__(self, every_n_steps: int, out=None, quiet_s: float = 15.0):
        self.every, self.quiet_s = max(every_n_steps, 1), quiet_s
        self.out = out
        self._t0: float | None = None
        self._last = 0.0
        self._step0 = 0
        self._printed = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._t0, self._step0 = time.monotonic(), trainer.global_step  # a resume starts counting here
        self._last = self._t0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if not trainer.is_global_zero or step in (self._printed, self._step0):
            return
        now = time.monotonic()
        logging_step = step % self.every == 0 or step == trainer.max_steps
        if not logging_step and now - self._last < self.quiet_s:
            return
        self._printed, self._last = step, now
        elapsed = now - (self._t0 or now)
        total = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
        parts = [f"step {step}" + (f"/{total} ({step / total:.0%})" if total else "")]
        metrics = _shown_metrics(trainer) if logging_step else {}
        if "loss" in metrics:
            parts.append(f"loss {metrics['loss']:.4f}")
        if "img/s" in metrics:
            parts.append(f"{metrics['img/s']:.1f} img/s")
        if "mfu" in metrics:
            parts.append(f"MFU {metrics['mfu']:.1%}")
        parts.append(f"{duration(elapsed)} elapsed")
        done = step - self._step0
        if total and done > 0:
            parts.append(f"ETA {duration(elapsed / done * (total - step))}")
        print(", ".join(parts), file=self.out or sys.stdout, flush=True)


def progress_callbacks(log_every_n_steps: int) -> tuple[list[L.Callback], bool]:
    """(callbacks, enable_progress_bar) for the Trainer: the bar on a terminal, lines otherwise."""
    if is_terminal(sys.stdout):
        return [StepBar()], True
    return [StepLines(log_every_n_steps)], False
