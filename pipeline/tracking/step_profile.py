"""Profile chosen optimizer steps of a run with ``torch.profiler``: the top operators for a benchmark's table,
and the host synchronisations a step makes (reads of a device value back to Python).

A read of a tensor's value (``.item()``, ``float(t)``, ``if t:``, a progress bar formatting a loss) runs the
operator ``aten::_local_scalar_dense``; on a GPU it waits for every kernel queued before it, so the host stops
running ahead of the device. A step that does not log should make none.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

SCALAR_READ = "aten::_local_scalar_dense"
# Kernels whose CPU implementation reads a scalar argument back, where the CUDA one keeps it on the device: the
# fused AdamW's step counter.
CPU_KERNEL_READS = ("aten::_fused_adamw_", "aten::_fused_adam_")
# CUDA runtime calls in which the host waits for the device: what a read back (``.item()``, ``.tolist()``), a
# blocking copy to the device (``torch.tensor(x, device=cuda)``, ``.to(cuda)``), a size read (``nonzero``) and
# an explicit synchronisation all end in. Only a GPU profile shows the copies; a CPU one has no such calls.
CUDA_WAITS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
# Callbacks that read a value every step by design, when a user turns them on: the sample trace (an audit).
AUDIT_FILES = ("pipeline/tracking/sample_trace.py",)


def _audit(chain: list[str]) -> bool:
    """Whether a call was made from one of the ``AUDIT_FILES``."""
    return any(f in name for name in chain for f in AUDIT_FILES)


class StepProfile(L.Callback):
    """Profiles optimizer steps ``first`` .. ``first + steps - 1`` (every micro-batch of them, the data fetch
    between them included)."""

    def __init__(self, first: int, steps: int = 1):
        self.first, self.steps = first, steps
        self._prof: profile | None = None
        self.events: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self._prof is None and self.events is None and step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
            self._prof = profile(activities=activities, with_stack=True)
            self._prof.__enter__()
        elif self._prof is not None and step >= self.first + self.steps:
            self._stop()

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if self._prof is not None:
            self._stop()

    def _stop(self) -> None:
        assert self._prof is not None
        self._prof.__exit__(None, None, None)
        self.events, self._prof = self._prof.events(), None

    def _calls(self, names: tuple[str, ...]) -> list[tuple[list[str], list[str]]]:
        """Each event of the profiled steps named in ``names``: (its chain of calling operators and Python
        frames, innermost first; its own Python stack)."""
        found = []
        for event in self.events or []:
            if event.name not in names:
                continue
            chain, parent = [], event.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            found.append((chain, list(event.stack or [])))
        return found

    def scalar_reads(self) -> list[tuple[list[str], list[str]]]:
        """Each value read back in the profiled steps (``aten::_local_scalar_dense``)."""
        return self._calls((SCALAR_READ,))

    def device_waits(self) -> list[tuple[list[str], list[str]]]:
        """On a GPU, each CUDA call of the profiled steps in which the host waited for the device
        (``CUDA_WAITS``), the audits' left out; none on a CPU."""
        return [(chain, stack) for chain, stack in self._calls(CUDA_WAITS) if not _audit(chain)]

    def host_syncs(self) -> list[tuple[list[str], list[str]]]:
        """The reads that would stop the host on a GPU: all but those inside ``CPU_KERNEL_READS``, which read
        host memory on the CPU only, and those of the audits in ``AUDIT_FILES``."""
        return [(chain, stack) for chain, stack in self.scalar_reads()
                if not any(name in CPU_KERNEL_READS for name in chain) and not _audit(chain)]

    def device_busy(self) -> float | None:
        """The share of the profiled steps' host span (first to last host event) in which the GPU ran at least
        one kernel or copy, overlapping streams counted once; None without GPU events. Well below 1 in steps
        with no host wait: the device waits on the host (its per-step work outlasts the device's) or on data."""
        if self.events is None:
            return None
        host = [e.time_range for e in self.events if e.device_type == DeviceType.CPU]
        device = sorted((e.time_range.start, e.time_range.end) for e in self.events
                        if e.device_type == DeviceType.CUDA)
        if not host or not device:
            return None
        start, end = min(r.start for r in host), max(r.end for r in host)
        busy, reach = 0.0, start  # the union of the device intervals, clipped to the host span
        for a, b in device:
            a, b = max(a, reach), min(b, end)
            if b > a:
                busy, reach = busy + b - a, b
        return busy / (end - start) if end > start else None

    def table(self, rows: int = 10) -> str:
        """The top operators by self time on the device (on the CPU without a GPU)."""
        if self.events is None:
            return "(no step was profiled)"
        key = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self.events.key_averages().table(sort_by=key, row_limit=rows)
