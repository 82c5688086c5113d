"""Logging a Python number from a training step without stopping the host.

Lightning turns a number passed to ``self.log`` into ``torch.tensor(value, device=...)``: a blocking copy to the
device, which on a GPU waits for every kernel queued before it (a stream synchronisation per call, per step).
``torch.full`` writes the number on the device with a kernel of its own, and the host runs on.
"""
from __future__ import annotations

from typing import Any

import lightning as L
import torch


def log_number(module: L.LightningModule, name: str, value: float, **kwargs: Any) -> None:
    """``module.log(name, value, **kwargs)`` for a host number, with no copy that waits for the device."""
    module.log(name, torch.full((), float(value), device=module.device), **kwargs)
