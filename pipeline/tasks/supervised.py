"""Classifiers trained on labels (fine-tuning, a timm teacher, the DeiT student): label checks, mixup /
cutmix drawn per batch, soft-target cross-entropy with smoothing, top-1 on unmixed batches."""
from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from ..data.bad_samples import without_samples
from ..tracking.device_log import logs_this_step
from .base import Schedule, StreamTask
from .config import MixupConfig, OptimConfig
from .mixing import build_mixup, label_loss, mix
from .optim import build_optimizer

# The shard datamodule has no batch-transfer hook of its own: the task's label check below is meant to run.
warnings.filterwarnings("ignore", message=r".*overridden `on_before_batch_transfer` in `LightningModule`.*")


def drop_unusable_labels(batch: dict[str, Any], num_classes: int) -> dict[str, Any]:
    """``batch`` without its samples whose label is outside [0, num_classes), which join its bad samples
    ("skipped" count, "bad" (key, reason) pairs). Labels [b] on the host."""
    labels = batch["label"].tolist()
    return without_samples(batch, {i: "no label" if y < 0 else f"label {y} is outside [0, {num_classes})"
                                   for i, y in enumerate(labels) if not 0 <= y < num_classes})


class SupervisedTask(StreamTask):
    def __init__(self, model: nn.Module, num_classes: int, label_smoothing: float, mixup: MixupConfig,
                 optim_cfg: OptimConfig, schedule: Schedule):
        super().__init__()
        self.model, self.num_classes, self.label_smoothing = model, num_classes, label_smoothing
        self.optim_cfg, self.schedule = optim_cfg, schedule
        self.mixup = build_mixup(mixup, num_classes, label_smoothing)

    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Drop the samples whose label is outside [0, num_classes) and count and name them as bad, like the
        stream does when it knows num_classes. On the host, before the batch moves to the device, so the check
        costs no device synchronisation; a batch left empty takes a zero step, so ranks stay in step."""
        return drop_unusable_labels(batch, self.num_classes)

    def mixed(self, batch: dict[str, Any], batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, target) of a batch: mixed with soft targets [B, C], or as is with labels [B]."""
        self.seed_batch(batch.get("key") or [str(batch_idx)])
        return mix(self.mixup, batch["image"], batch["label"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if batch["image"].shape[0] == 0:
            return self.zero_step()
        imgs, target = self.mixed(batch, batch_idx)
        logits = self.model(imgs)
        loss = label_loss(logits, target, self.label_smoothing)
        if target.dim() == 1 and logs_this_step(self.trainer):
            self.log("train/top1", (logits.argmax(-1) == target).float().mean(), batch_size=imgs.shape[0])
        self.record_loss(loss, imgs.shape[0])
        return loss

    def param_groups(self) -> list[dict] | None:
        """Optimizer parameter groups; None: decayed weights and undecayed norms / biases / tokens."""
        return None

    def configure_optimizers(self):
        s = self.schedule
        opt, sched = build_optimizer(self.model, self.optim_cfg, s.effective_batch, s.total_steps, s.warmup_steps,
                                     self.param_groups())
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
