"""The guard's judgement, on the host: given each optimizer step's mean loss over ranks and whether it was
skipped, when does the run need a rollback? Pure bookkeeping, the same on every rank (it sees the same
all-reduced numbers), saved with every checkpoint."""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass
from typing import Any

from .config import GuardConfig


@dataclass(frozen=True)
class Verdict:
    """Why the run must roll back and the steps that say so (oldest first)."""

    reason: str
    steps: tuple[int, ...]

    @property
    def first(self) -> int:
        return self.steps[0]

    def describe(self) -> str:
        span = f"step {self.steps[0]}" if len(self.steps) == 1 else f"steps {self.steps[0]}-{self.steps[-1]}"
        return f"{self.reason} at {span}"


class Detector:
    """Loss spikes against a rolling median, and bursts of skipped steps."""

    def __init__(self, cfg: GuardConfig):
        self.cfg = cfg
        self.history: deque[float] = deque(maxlen=cfg.window)  # losses of applied, unspiked steps
        self.streak: list[int] = []  # consecutive spiking steps so far
        self.skips: deque[int] = deque()  # skipped steps within the last ``window`` steps

    def observe(self, step: int, loss: float, skipped: bool) -> Verdict | None:
        cfg = self.cfg
        while self.skips and self.skips[0] <= step - cfg.window:
            self.skips.popleft()
        if skipped:
            self.skips.append(step)
            if len(self.skips) > cfg.max_skips:
                return Verdict(f"{len(self.skips)} non-finite steps within {cfg.window}", tuple(self.skips))
            return None
        if cfg.spike_factor is not None and step > cfg.warmup_steps and len(self.history) == cfg.window:
            median = statistics.median(self.history)
            if loss > cfg.spike_factor * median:
                self.streak.append(step)  # kept out of the history: the baseline stays the healthy loss
                if len(self.streak) >= cfg.patience:
                    return Verdict(f"loss spike (above {cfg.spike_factor:g} x the median {median:.4g})",
                                   tuple(self.streak))
                return None
        self.streak.clear()
        self.history.append(loss)
        return None

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history), "streak": list(self.streak), "skips": list(self.skips)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = deque(state["history"], maxlen=self.cfg.window)
        self.streak, self.skips = list(state["streak"]), deque(state["skips"])
