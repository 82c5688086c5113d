"""Supervised fine-tuning of a pretrained encoder with a classification head (the MAE paper's recipe:
layer-wise lr decay, drop path, mixup / cutmix, label smoothing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from timm.data import Mixup

from ..models.classifier import ViTClassifier
from .base import Schedule, StreamTask
from .optim import FinetuneOptimConfig, build_optimizer, layer_decay_groups


@dataclass
class MixupConfig:
    """Mixup and CutMix on each batch (timm's Mixup); both alphas 0 turn it off."""

    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    """Chance of CutMix rather than Mixup when both are on."""


@dataclass
class FinetuneConfig:
    """The model being fine-tuned and its head."""

    init: str = ""
    """The pretrained encoder: models:/<name>@<alias>, models:/<name>/<version>, or an export folder."""
    num_classes: int = 1000
    image_size: tuple[int, int] = (224, 224)
    """Fine-tuning resolution; position embeddings are resampled when it differs from pretraining."""
    pool: Literal["avg", "cls"] = "avg"
    drop_path: float = 0.1
    label_smoothing: float = 0.1
    mixup: MixupConfig = field(default_factory=MixupConfig)
    eval_crop_pct: float = 0.875
    """Centre-crop fraction of the held-out evaluation at the end of the run."""
    eval_limit: int | None = None
    """Evaluate on the first this-many held-out samples (None: all)."""

    def __post_init__(self) -> None:
        if not self.init:
            raise ValueError("model.init must name the pretrained model (models:/<name>@<alias> or a folder)")
        self.image_size = tuple(self.image_size)


class FinetuneTask(StreamTask):
    def __init__(self, model: ViTClassifier, cfg: FinetuneConfig, optim_cfg: FinetuneOptimConfig,
                 schedule: Schedule):
        super().__init__()
        self.model, self.cfg, self.optim_cfg, self.schedule = model, cfg, optim_cfg, schedule
        m = cfg.mixup
        self.mixup = None
        if m.mixup_alpha > 0 or m.cutmix_alpha > 0:
            self.mixup = Mixup(mixup_alpha=m.mixup_alpha, cutmix_alpha=m.cutmix_alpha, prob=m.prob,
                               switch_prob=m.switch_prob, label_smoothing=cfg.label_smoothing,
                               num_classes=cfg.num_classes)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        imgs, labels = batch["image"], batch["label"]
        if imgs.shape[0] == 0:
            return self.zero_step()
        if (labels < 0).any() or (labels >= self.cfg.num_classes).any():
            bad = [k for k, y in zip(batch.get("key", []), labels.tolist()) if not 0 <= y < self.cfg.num_classes]
            raise ValueError(f"samples without a label in [0, {self.cfg.num_classes}): {bad[:5]} "
                             f"(shard them with class labels, or fix model.num_classes)")
        if self.mixup is not None and imgs.shape[0] % 2 == 0:  # timm's Mixup pairs samples: even batches
            imgs, target = self.mixup(imgs, labels)  # target: soft labels [B, C], smoothing included
            loss = torch.sum(-target * F.log_softmax(self.model(imgs), dim=-1), dim=-1).mean()
        else:
            logits = self.model(imgs)
            loss = F.cross_entropy(logits, labels, label_smoothing=self.cfg.label_smoothing)
            self.log("train/top1", (logits.argmax(-1) == labels).float().mean(), batch_size=imgs.shape[0])
        self.record_loss(loss, imgs.shape[0])
        return loss

    def configure_optimizers(self):
        s, o = self.schedule, self.optim_cfg
        depth = len(self.model.encoder.blocks)
        groups = layer_decay_groups(self.model, o.weight_decay, o.layer_decay, self.model.layer_id, depth + 1)
        opt, sched = build_optimizer(self.model, o, s.effective_batch, s.total_steps, s.warmup_steps, groups)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
