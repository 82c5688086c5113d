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
from torch.profiler import ProfilerActivity, profile

SCALAR_READ = "aten::_local_scalar_dense"
# Kernels whose CPU implementation reads a scalar argument back, where the CUDA one keeps it on the device: the
# fused AdamW's step counter.
CPU_KERNEL_READS = ("aten::_fused_adamw_", "aten::_fused_adam_")
# Callbacks that read a value every step by design, when a user turns them on: the sample trace (an audit).
AUDIT_FILES = ("pipeline/tracking/sample_trace.py",)


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

    def scalar_reads(self) -> list[tuple[list[str], list[str]]]:
        """Each value read back in the profiled steps: (its chain of calling operators, innermost first; the
        Python frames that issued it)."""
        reads = []
        for event in self.events or []:
            if event.name != SCALAR_READ:
                continue
            chain, parent = [], event.cpu_parent
            while parent is not None:
                chain.append(parent.name)
                parent = parent.cpu_parent
            reads.append((chain, list(event.stack or [])))
        return reads

    def host_syncs(self) -> list[tuple[list[str], list[str]]]:
        """The reads that would stop the host on a GPU: all but those inside ``CPU_KERNEL_READS``, which read
        host memory on the CPU only, and those of the audits in ``AUDIT_FILES``."""
        return [(chain, stack) for chain, stack in self.scalar_reads()
                if not any(name in CPU_KERNEL_READS or any(f in name for f in AUDIT_FILES) for name in chain)]

    def table(self, rows: int = 10) -> str:
        """The top operators by self time on the device (on the CPU without a GPU)."""
        if self.events is None:
            return "(no step was profiled)"
        key = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
        return self.events.key_averages().table(sort_by=key, row_limit=rows)
