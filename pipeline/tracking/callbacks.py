"""Callbacks that measure training and send what it produces to MLflow: reconstruction images, system metrics,
the time the loop waits for data."""
from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import psutil
import torch
from lightning.pytorch.loggers import MLFlowLogger
from torchvision.utils import save_image

from ..step_boundary import StepBoundary
from .device_log import log_number, logs_this_step


class ReconstructionImages(L.Callback):
    """Every N steps, log a grid of (input | masked | reconstruction) rows as an MLflow image artifact.

    The grid comes from the step's own forward pass (the task keeps the first ``n`` rows of that step's
    micro-batches, the last one's wins), not from a forward pass of its own: that would cost a forward, and
    under ZeRO-3 break the trace of module calls DeepSpeed prefetches weights by (recorded again over the next
    two steps, one of them unprefetched)."""

    def __init__(self, every_n_steps: int, mean: tuple[float, ...], std: tuple[float, ...], n: int = 8):
        self.every, self.n = every_n_steps, n
        self.mean = torch.tensor(mean).view(1, -1, 1, 1)
        self.std = torch.tensor(std).view(1, -1, 1, 1)
        self.boundary = StepBoundary()

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.boundary.start(trainer)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        # on rank 0 only, in the micro-batches of a step that ends on a multiple of N
        due = self.every and trainer.is_global_zero and (trainer.global_step + 1) % self.every == 0
        pl_module.keep_reconstructions = self.n if due else 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        if not self.boundary.crossed(trainer):
            return
        step = trainer.global_step
        kept, pl_module.kept = pl_module.kept, None
        pl_module.keep_reconstructions = 0
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if not self.every or step % self.every or kept is None or logger is None or kept[0].shape[0] == 0:
            return
        grid = pl_module.reconstruction_grid(*kept).cpu()
        grid = (grid * self.std + self.mean).clamp(0, 1)
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"reconstruction_step{step:08d}.png"
            save_image(grid, path, nrow=3, padding=1)
            logger.experiment.log_artifact(logger.run_id, str(path), artifact_path="reconstructions")


class SystemMetrics(L.Callback):
    """Every N steps, log host CPU and memory and this process's (GPU) memory under ``system/``, the prefix
    the MLflow UI shows in its System Metrics tab. Step-aligned and sent through the run's own logger, so
    an unreachable server is handled like any other logging call."""

    def __init__(self, every_n_steps: int):
        self.every = every_n_steps
        self.process = psutil.Process()
        psutil.cpu_percent(None)  # starts the CPU-time window the first reading is measured over

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        step = trainer.global_step
        if not self.every or step % self.every or not trainer.is_global_zero or trainer.logger is None:
            return
        mem = psutil.virtual_memory()
        metrics = {"system/cpu_utilization_percentage": psutil.cpu_percent(None),
                   "system/system_memory_usage_megabytes": (mem.total - mem.available) / 2**20,
                   "system/system_memory_usage_percentage": mem.percent,
                   "system/process_rss_megabytes": self.process.memory_info().rss / 2**20}
        if torch.cuda.is_available():
            device = pl_module.device
            metrics["system/gpu_memory_allocated_megabytes"] = torch.cuda.memory_allocated(device) / 2**20
            metrics["system/gpu_memory_peak_megabytes"] = torch.cuda.max_memory_allocated(device) / 2**20
        trainer.logger.log_metrics(metrics, step=step)


class DataWait(L.Callback):
    """``perf/data_wait_frac``: the share of the wall time since the last logging step that the loop spent
    waiting for batches (the loader's ``wait_s``); above a few percent the devices are starved of data. The
    run's overall share is ``fraction()``, which the run summary shows."""

    def __init__(self) -> None:
        self.started: tuple[float, float] | None = None  # (time, loader's wait_s) when training started
        self.window: tuple[float, float] | None = None  # ... at the last logging step
        self.last: tuple[float, float] | None = None  # ... at the last batch's end

    @staticmethod
    def _loader(trainer: L.Trainer) -> Any:
        return getattr(getattr(trainer, "datamodule", None), "loader", None)

    def _now(self, trainer: L.Trainer) -> tuple[float, float] | None:
        loader = self._loader(trainer)
        return None if loader is None else (time.perf_counter(), loader.wait_s)

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.started = self.window = self.last = self._now(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        now = self._now(trainer)
        if now is None or self.window is None:
            return
        self.last = now
        if not logs_this_step(trainer):
            return
        (t0, w0), (t1, w1) = self.window, now
        self.window = now
        log_number(pl_module, "perf/data_wait_frac", (w1 - w0) / max(t1 - t0, 1e-9), batch_size=1)

    def fraction(self) -> tuple[float, float] | None:
        """(waited seconds, the loop's seconds) since training started; None before."""
        if self.started is None or self.last is None:
            return None
        return self.last[1] - self.started[1], self.last[0] - self.started[0]
