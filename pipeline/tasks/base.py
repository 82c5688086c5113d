"""What every training task logs the same way: loss, learning rate, skipped samples (throughput and MFU are
the training path's, ``tracking.throughput``); and the collective check that stops a run delivering too many
bad samples."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import lightning as L
import numpy as np
import torch

from ..data.bad_samples import BadSampleTally, judge_bad_samples, too_many_bad
from ..distributed.gather import every_rank
from ..tracking.device_log import log_number, logs_this_step


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
        self._last_loss: torch.Tensor | None = None  # kept on the device: no host sync per step
        self._bad = BadSampleTally()
        self._batches = 0  # training batches this process has seen: equal on every rank
        self._skipped_in_epoch = 0  # bad samples this rank skipped in the current epoch

    @property
    def last_loss(self) -> float | None:
        return None if self._last_loss is None else float(self._last_loss)

    def record_loss(self, loss: torch.Tensor, batch_size: int) -> None:
        if logs_this_step(self.trainer):  # not prog_bar: it would read the value back every step
            self.log("train/loss", loss, batch_size=batch_size)
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
        if logs_this_step(self.trainer):
            log_number(self, "train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        self._skipped_in_epoch += int(batch.get("skipped", 0))
        self._bad.add(batch)
        self._batches += 1
        # The last batch of each logging step: the same batch on every rank, and a step that syncs anyway.
        if self._batches % (self.trainer.log_every_n_steps * self.trainer.accumulate_grad_batches) == 0:
            self.check_bad_samples()

    def on_train_epoch_end(self) -> None:
        # the epoch's bad samples, summed over ranks: counted on the host, logged once
        log_number(self, "data/skipped_samples", self._skipped_in_epoch, reduce_fx="sum", sync_dist=True,
                   on_step=False, on_epoch=True, batch_size=1)
        self._skipped_in_epoch = 0
        self.check_bad_samples()

    def check_bad_samples(self) -> None:
        """Stop the run when more than ``data.max_bad_fraction`` of the samples delivered so far, over all
        ranks, were bad. A collective: every rank calls it at the same batch, sums the counts of all, and so
        reaches the same verdict; a rank raising alone would leave the others waiting in the next collective."""
        cfg = getattr(getattr(self.trainer, "datamodule", None), "cfg", None)
        if cfg is None or not hasattr(cfg, "max_bad_fraction"):  # not our shard stream: nothing to judge
            return
        counts = torch.tensor([self._bad.bad, self._bad.seen], dtype=torch.long, device=self.device)  # [2]
        bad, seen = (int(v) for v in self.trainer.strategy.reduce(counts, reduce_op="sum").tolist())
        examples = self._bad.examples
        if too_many_bad(bad, seen, cfg):  # every rank's first bad keys, to name them
            examples = [e for rank in every_rank(examples) for e in rank][: self._bad.keep]
        judge_bad_samples(bad, seen, examples, cfg)
