"""MAE pretraining as a LightningModule: masking noise, loss, optimizer, schedule and throughput logging."""
from __future__ import annotations

from typing import Any

import torch

from ..models import MAE, MAEConfig
from .base import Schedule, StreamTask, sample_seed
from .config import OptimConfig
from .optim import build_optimizer


class MAEPretrainTask(StreamTask):
    def __init__(self, model_cfg: MAEConfig, optim_cfg: OptimConfig, schedule: Schedule):
        super().__init__()
        self.model = MAE(model_cfg)
        self.optim_cfg, self.schedule = optim_cfg, schedule

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
        if imgs.shape[0] == 0:  # every sample of this batch was corrupt
            return self.zero_step()
        noise = self.masking_noise(batch["key"], imgs.device) if batch.get("key") else None
        loss, _, _ = self.model(imgs, noise)
        self.record_loss(loss, imgs.shape[0])
        return loss

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
