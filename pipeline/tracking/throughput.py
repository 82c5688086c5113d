"""Throughput and model FLOPs utilisation (MFU) of every run.

Images/s are measured over the optimizer steps between two logging steps, the device synchronised only at
those steps (never per micro-batch): a step that does not log leaves the host free to run ahead. With the
objective's model FLOPs per image (``pipeline.models.flops``) and the device's dense peak, each logging step
gives ``perf/images_per_s`` (all ranks), ``perf/tflops_per_device`` and ``perf/mfu``; the run summary gets
their means over the run.

Peaks are dense (no sparsity) tensor-core figures for 16-bit precisions and plain FP32 otherwise, by device
name; ``trainer.peak_tflops`` wins everywhere (a device not in the table, the CPU, a clock-limited part).
"""
from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch

from ..step_boundary import StepBoundary

log = logging.getLogger(__name__)

# (name fragments that must all appear, 16-bit dense TFLOP/s, FP32 TFLOP/s or None when unknown); first match wins
PEAKS: list[tuple[tuple[str, ...], float, float | None]] = [
    (("H100", "PCIE"), 756.0, 51.0),
    (("H100",), 989.0, 67.0),  # SXM
    (("H200",), 989.0, 67.0),
    (("B200",), 2250.0, None),
    (("A100",), 312.0, 19.5),
]
SIXTEEN_BIT = ("bf16-mixed", "bf16-true", "16-mixed", "16-true")


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The dense peak of ``device_name`` at ``precision`` (Lightning's precision string); None: not known."""
    name = device_name.upper()
    for fragments, half, single in PEAKS:
        if all(f in name for f in fragments):
            return half if precision in SIXTEEN_BIT else single
    return None


class Throughput(L.Callback):
    """``perf/images_per_s``, ``perf/tflops_per_device`` and ``perf/mfu`` over windows of optimizer steps.

    ``flops_per_image``: model FLOPs of one training step per image (None: images/s only). ``peak``: the
    recipe's ``trainer.peak_tflops``, else looked up by device name when training starts."""

    def __init__(self, flops_per_image: int | None, peak: float | None = None):
        self.flops, self.peak = flops_per_image, peak
        self.images, self.boundary = 0, StepBoundary()
        self.window: tuple[float, int] | None = None  # (time, images) at the window's start
        self.windows: list[tuple[float, int]] = []  # (seconds, images on this rank) of each finished window
        self.note: str | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        device = pl_module.device
        if self.peak is None and device.type == "cuda":
            self.peak = peak_tflops(torch.cuda.get_device_name(device), str(trainer.precision))
        if self.flops is None:
            self.note = "no MFU: this objective gives no FLOP count"
        elif self.peak is None:
            where = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type.upper()
            self.note = (f"no MFU: the peak TFLOP/s of {where} at precision {trainer.precision} is not known; "
                         "set trainer.peak_tflops")
        if self.note:
            log.info(self.note)
        self.boundary.start(trainer)
        self._sync(device)
        self.window = (time.perf_counter(), 0)

    @staticmethod
    def _sync(device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        self.images += batch["image"].shape[0] + int(batch.get("skipped", 0))  # delivered, bad ones included
        if not self.boundary.crossed(trainer):
            return
        if trainer.global_step % trainer.log_every_n_steps or self.window is None:
            return
        self._sync(pl_module.device)  # the window's end: one synchronisation per logging step
        now = time.perf_counter()
        seconds, images = now - self.window[0], self.images - self.window[1]
        self.window = (now, self.images)
        if seconds <= 0 or images <= 0:
            return
        self.windows.append((seconds, images))
        for name, value in self.figures(seconds, images, trainer.world_size).items():
            pl_module.log(name, value, batch_size=1)

    def figures(self, seconds: float, images: int, world: int) -> dict[str, float]:
        """The perf/ metrics of ``images`` delivered to one rank in ``seconds`` (every rank alike)."""
        out = {"perf/images_per_s": images * world / seconds}
        if self.flops is not None:
            tflops = self.flops * images / seconds / 1e12  # this device's share
            out["perf/tflops_per_device"] = tflops
            if self.peak:
                out["perf/mfu"] = tflops / self.peak
        return out

    def steady(self) -> list[tuple[float, int]]:
        """The windows that measure the steady state: all but the first (start-up: compilation, allocator and
        loader warm-up) when there are three or more, else all."""
        return self.windows[1:] if len(self.windows) >= 3 else self.windows

    def steady_figures(self, world: int) -> dict[str, float] | None:
        """The perf/ figures over the steady-state windows together; None before any window ended."""
        windows = self.steady()
        seconds, images = sum(s for s, _ in windows), sum(n for _, n in windows)
        return self.figures(seconds, images, world) if seconds > 0 else None

    def summary(self, world: int) -> str | None:
        """One line for the run summary: the run's figures over its steady-state windows."""
        if (f := self.steady_figures(world)) is None:
            return None
        line = f"throughput: {f['perf/images_per_s']:.1f} images/s"
        if "perf/tflops_per_device" in f:
            line += f", {f['perf/tflops_per_device']:.3g} TFLOP/s per device"
        if "perf/mfu" in f:
            line += f", MFU {f['perf/mfu']:.1%} of {self.peak:g} TFLOP/s"
        if len(self.steady()) < len(self.windows):
            line += " after the first logging window"
        return line + (f" ({self.note})" if self.note else "")
