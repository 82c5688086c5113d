"""``trainer.guard``: what the training guard watches and how it heals a run."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class GuardConfig:
    """Skip non-finite optimizer steps; roll back to the newest sound checkpoint on a loss spike or a burst of
    skipped steps."""

    enabled: bool = True
    """Off: non-finite steps are applied as they are (NaN weights) and spikes are not looked for."""
    window: int = 50
    """Steps of the rolling loss median a spike is measured against; also the span ``max_skips`` counts in."""
    warmup_steps: int = 100
    """Steps of the run before spikes are looked for (the loss falls fastest there)."""
    spike_factor: float | None = 3.0
    """A step's loss (mean over ranks) above this times the rolling median is a spike; None: no spike check."""
    patience: int = 3
    """Consecutive spiking steps that call for a rollback (one bad batch is noise, a run of them is not)."""
    max_skips: int = 10
    """More skipped (non-finite) steps than this within ``window`` steps call for a rollback."""
    lr_factor: float = 1.0
    """Each rollback multiplies the learning rate (the whole schedule onwards) by this."""
    max_rollbacks: int = 3
    """The run stops with an error when it would roll back once more."""

    def __post_init__(self) -> None:
        if self.window < 1 or self.patience < 1 or self.max_skips < 0 or self.max_rollbacks < 0:
            raise ValueError("trainer.guard: window and patience must be >= 1, max_skips and max_rollbacks >= 0")
        if self.spike_factor is not None and self.spike_factor <= 1.0:
            raise ValueError(f"trainer.guard.spike_factor {self.spike_factor} must be > 1 (or null: no spike "
                             "check)")
        if not 0.0 < self.lr_factor <= 1.0:
            raise ValueError(f"trainer.guard.lr_factor {self.lr_factor} must be in (0, 1]")
