"""Classifiers trained on labels (fine-tuning, a timm teacher, the DeiT student): label checks, mixup /
cutmix drawn per batch, soft-target cross-entropy with smoothing, top-1 on unmixed batches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .base import Schedule, StreamTask
from .mixing import MixupConfig, build_mixup, label_loss, mix
from .optim import OptimConfig, build_optimizer


@dataclass
class TimmClassifierConfig:
    """A timm architecture trained from scratch (e.g. a CNN teacher for DeiT); weights are never downloaded."""

    arch: str = "resnet18"
    num_classes: int = 1000
    in_chans: int = 3
    image_size: tuple[int, int] = (224, 224)
    label_smoothing: float = 0.1
    mixup: MixupConfig = field(default_factory=MixupConfig)
    eval_crop_pct: float = 0.875
    """Centre-crop fraction of the held-out evaluation at the end of the run."""
    eval_limit: int | None = None
    """Evaluate on the first this-many held-out samples (None: all)."""

    def __post_init__(self) -> None:
        self.image_size = tuple(self.image_size)


class SupervisedTask(StreamTask):
    def __init__(self, model: nn.Module, num_classes: int, label_smoothing: float, mixup: MixupConfig,
                 optim_cfg: OptimConfig, schedule: Schedule):
        super().__init__()
        self.model, self.num_classes, self.label_smoothing = model, num_classes, label_smoothing
        self.optim_cfg, self.schedule = optim_cfg, schedule
        self.mixup = build_mixup(mixup, num_classes, label_smoothing)

    def check_labels(self, batch: dict[str, Any]) -> None:
        labels = batch["label"]
        if (labels < 0).any() or (labels >= self.num_classes).any():
            bad = [k for k, y in zip(batch.get("key", []), labels.tolist()) if not 0 <= y < self.num_classes]
            raise ValueError(f"samples without a label in [0, {self.num_classes}): {bad[:5]} "
                             f"(shard them with class labels, or fix model.num_classes)")

    def mixed(self, batch: dict[str, Any], batch_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(images, target) of a checked batch: mixed with soft targets [B, C], or as is with labels [B]."""
        self.check_labels(batch)
        self.seed_batch(batch.get("key") or [str(batch_idx)])
        return mix(self.mixup, batch["image"], batch["label"])

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if batch["image"].shape[0] == 0:
            return self.zero_step()
        imgs, target = self.mixed(batch, batch_idx)
        logits = self.model(imgs)
        loss = label_loss(logits, target, self.label_smoothing)
        if target.dim() == 1:
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
