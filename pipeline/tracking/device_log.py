"""Logging from a training step without stopping the host, and only in the steps whose values are written.

Lightning turns a number passed to ``self.log`` into ``torch.tensor(value, device=...)``: a blocking copy to the
device, which on a GPU waits for every kernel queued before it (a stream synchronisation per call, per step).
``torch.full`` writes the number on the device with a kernel of its own, and the host runs on. ``SpanTimer``
times device work the same way: without waiting for it.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch


def logs_this_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes this training batch's step values (``on_step``) to the logger: a logging step
    (every ``trainer.log_every_n_steps``) or a stopping one. A value logged in any other batch is dropped
    unwritten, yet each ``self.log`` call costs the host its bookkeeping (about a millisecond on a slow CPU) and
    a copy of the value: with a small per-GPU batch, the host's time per step is what bounds the GPU's
    (``benchmarks/host_overhead.py``).
    Valid from ``training_step`` to ``on_train_batch_end``; the test Lightning's own monitors use."""
    return trainer._logger_connector.should_update_logs


def log_number(module: L.LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` for a host number, with no copy that waits for the device."""
    module.log(name, torch.full((), float(value), device=module.device), **kwargs)


class SpanTimer:
    """Seconds a span of work takes, measured without waiting for the device.

    On a CPU the host clock times the work itself. On a GPU the host only queues kernels, so its clock would
    time their launch: CUDA events around the span time the device instead, and a span is read once its end
    event has passed (``query`` does not wait), during a later span. While one is still running on the device,
    later spans go untimed. ``take`` returns the newest time read since the last ``take`` (None if none)."""

    def __init__(self) -> None:
        self._running: tuple[torch.cuda.Event, torch.cuda.Event] | None = None
        self._done: float | None = None

    @contextlib.contextmanager
    def span(self, device: torch.device) -> Iterator[None]:
        if device.type != "cuda":
            start = time.perf_counter()
            yield
            self._done = time.perf_counter() - start
            return
        if self._running is not None and self._running[1].query():
            self._done = self._running[0].elapsed_time(self._running[1]) / 1e3  # milliseconds
            self._running = None
        if self._running is not None:
            yield
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        yield
        end.record()
        self._running = (start, end)

    def take(self) -> float | None:
        done, self._done = self._done, None
        return done
