"""What every training task logs the same way: loss, learning rate, throughput, skipped samples."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch


def sample_seed(seed: int, epoch: int, key: str) -> int:
    """A 63-bit seed that depends on (seed, epoch, key) alone: the same draws in an uninterrupted and a resumed
    run, whichever rank or step the sample (or batch) lands on."""
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest(), "little") >> 1


@dataclass
class Schedule:
    """Step counts resolved from the recipe, the data size and the world size (see stages.train)."""

    total_steps: int
    warmup_steps: int
    effective_batch: int
    seed: int = 0


class StreamTask(L.LightningModule):
    """Base of the tasks trained on our shard stream (batches of {"image", "label", "key", "skipped"})."""

    def __init__(self) -> None:
        super().__init__()
        self._t_last: float | None = None
        self._last_loss: torch.Tensor | None = None  # kept on the device: no host sync per step

    @property
    def last_loss(self) -> float | None:
        return None if self._last_loss is None else float(self._last_loss)

    def record_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        self._last_loss = loss.detach()

    def seed_batch(self, keys: list[str]) -> None:
        """Seed the global generators that batch-level randomness draws from (timm's Mixup: numpy; stochastic
        depth: torch) with the batch's sample keys: a resumed run draws what the uninterrupted one drew."""
        s = sample_seed(self.schedule.seed, self.current_epoch, "|".join(keys))
        np.random.seed(s % 2**32)
        torch.manual_seed(s)

    def zero_step(self) -> torch.Tensor:
        """A step with zero gradient, for a batch whose samples were all corrupt (ranks must stay in step)."""
        return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            imgs = batch["image"].shape[0] * self.trainer.world_size
            self.log("perf/images_per_s", imgs / max(now - self._t_last, 1e-9), batch_size=1)
        self._t_last = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        self.log("data/skipped_samples", float(batch.get("skipped", 0)), reduce_fx="sum", sync_dist=True,
                 on_step=False, on_epoch=True, batch_size=1)
