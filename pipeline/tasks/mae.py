"""MAE pretraining as a LightningModule: masking noise, loss, optimizer, schedule and throughput logging."""
from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch

from ..models import MAE, MAEConfig
from .optim import OptimConfig, build_optimizer


@dataclass
class Schedule:
    """Step counts resolved from the recipe, the data size and the world size (see stages.plan)."""

    total_steps: int
    warmup_steps: int
    effective_batch: int
    seed: int = 0


def sample_seed(seed: int, epoch: int, key: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}/{epoch}/{key}".encode(), digest_size=8).digest(), "little") >> 1


class MAEPretrainTask(L.LightningModule):
    def __init__(self, model_cfg: MAEConfig, optim_cfg: OptimConfig, schedule: Schedule):
        super().__init__()
        self.model = MAE(model_cfg)
        self.optim_cfg, self.schedule = optim_cfg, schedule
        self._t_last: float | None = None
        self._last_loss: torch.Tensor | None = None  # kept on the device: no host sync per step

    def masking_noise(self, keys: list[str], device: torch.device) -> torch.Tensor:
        """[B, L] uniform noise, a function of (seed, epoch, sample key) alone: the same sample is masked the
        same way in an uninterrupted and a resumed run, whichever rank or step it lands on."""
        g = torch.Generator()
        L_ = self.model.encoder.num_patches
        noise = [torch.rand(L_, generator=g.manual_seed(sample_seed(self.schedule.seed, self.current_epoch, k)))
                 for k in keys]
        return torch.stack(noise).to(device)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        imgs = batch["image"]
        if imgs.shape[0] == 0:  # every sample of this batch was corrupt: step with zero gradient
            return sum(p.sum() for p in self.parameters() if p.requires_grad) * 0.0
        noise = self.masking_noise(batch["key"], imgs.device) if batch.get("key") else None
        loss, _, _ = self.model(imgs, noise)
        self.log("train/loss", loss, prog_bar=True, batch_size=imgs.shape[0])
        self._last_loss = loss.detach()
        return loss

    @property
    def last_loss(self) -> float | None:
        return None if self._last_loss is None else float(self._last_loss)

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        now = time.perf_counter()
        if self._t_last is not None:
            imgs = batch["image"].shape[0] * self.trainer.world_size
            self.log("perf/images_per_s", imgs / max(now - self._t_last, 1e-9), batch_size=1)
        self._t_last = now
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], batch_size=1)
        self.log("data/skipped_samples", float(batch.get("skipped", 0)), reduce_fx="sum", sync_dist=True,
                 on_step=False, on_epoch=True, batch_size=1)

    def configure_optimizers(self):
        s = self.schedule
        opt, sched = build_optimizer(self.model, self.optim_cfg, s.effective_batch, s.total_steps, s.warmup_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def reconstruction_grid(self, imgs: torch.Tensor, keys: list[str] | None = None, n: int = 8) -> torch.Tensor:
        """Rows of (input, masked input, reconstruction) for ``n`` images, [3n, C, H, W], in input space."""
        was_training = self.training
        self.eval()
        imgs = imgs[:n]
        noise = self.masking_noise(keys[:n], imgs.device) if keys else None
        _, pred, mask = self.model(imgs, noise)
        masked, recon = self.model.reconstruct(imgs, pred, mask)
        self.train(was_training)
        return torch.stack([imgs, masked, recon], dim=1).flatten(0, 1)
