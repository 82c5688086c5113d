"""MAE pretraining as a LightningModule: masking noise, loss, optimizer, schedule and throughput logging."""
from __future__ import annotations

from typing import Any

import torch

from ..models import MAE, MAEConfig
from .base import Schedule, StreamTask, sample_seed
from .config import OptimConfig
from .optim import build_optimizer

_GOLDEN, _MIX1, _MIX2 = -7046029254386353131, -4658895280553007687, -7723592293110705685  # splitmix64, as int64


def _logical_shift(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x >> bits as on uint64 (torch's int64 shift is arithmetic: clear the copied sign bits)."""
    return (x >> bits) & ((1 << (64 - bits)) - 1)


def counter_uniform(seeds: torch.Tensor, n: int) -> torch.Tensor:
    """[B, n] floats in [0, 1): splitmix64 of (seed_b + (j + 1) * golden ratio) for each row's seed (int64 [B])
    and column j. Integer arithmetic wraps alike on every device, so CPU and GPU give the same numbers."""
    x = seeds[:, None] + torch.arange(1, n + 1, device=seeds.device, dtype=torch.int64)[None] * _GOLDEN  # [B, n]
    x = (x ^ _logical_shift(x, 30)) * _MIX1
    x = (x ^ _logical_shift(x, 27)) * _MIX2
    x = x ^ _logical_shift(x, 31)
    return _logical_shift(x, 40).to(torch.float32) * (1.0 / (1 << 24))  # the top 24 bits: exact in float32


class MAEPretrainTask(StreamTask):
    def __init__(self, model_cfg: MAEConfig, optim_cfg: OptimConfig, schedule: Schedule):
        super().__init__()
        self.model = MAE(model_cfg)
        self.optim_cfg, self.schedule = optim_cfg, schedule
        self.keep_reconstructions = 0  # > 0: training steps keep that many (input, prediction, mask) rows
        self.kept: tuple[torch.Tensor, ...] | None = None

    def masking_noise(self, keys: list[str], device: torch.device) -> torch.Tensor:
        """[B, L] uniform noise, a function of (seed, epoch, sample key) alone: the same sample is masked the
        same way in an uninterrupted and a resumed run, whichever rank, step or device it lands on. Generated
        on ``device`` in one pass (``counter_uniform``): only the B seeds cross from the host."""
        seeds = torch.tensor([sample_seed(self.schedule.seed, self.current_epoch, k) for k in keys],
                             dtype=torch.int64).to(device, non_blocking=True)  # [B]
        return counter_uniform(seeds, self.model.encoder.num_patches)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]
        if imgs.shape[0] == 0:  # every sample of this batch was corrupt
            return self.zero_step()
        noise = self.masking_noise(batch["key"], imgs.device) if batch.get("key") else None
        loss, pred, mask = self.model(imgs, noise)
        if self.keep_reconstructions:  # for the reconstruction figure: no forward pass of its own
            n = self.keep_reconstructions
            self.kept = tuple(t[:n].detach().clone() for t in (imgs, pred, mask))  # not views of the batch's
        self.record_loss(loss, imgs.shape[0])
        return loss

    def configure_optimizers(self):
        s = self.schedule
        opt, sched = build_optimizer(self.model, self.optim_cfg, s.effective_batch, s.total_steps, s.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def reconstruction_grid(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Rows of (input, masked input, reconstruction), [3B, C, H, W] in input space, from a forward pass's
        images [B, C, H, W], predictions [B, L, p*p*C] and mask [B, L]."""
        masked, recon = self.model.reconstruct(imgs.float(), pred.float(), mask.float())
        return torch.stack([imgs.float(), masked, recon], dim=1).flatten(0, 1)
