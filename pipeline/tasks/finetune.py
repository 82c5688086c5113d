"""Supervised fine-tuning of a pretrained encoder with a classification head (the MAE paper's recipe:
layer-wise lr decay, drop path, mixup / cutmix, label smoothing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from ..models.classifier import ViTClassifier
from .base import Schedule, StreamTask
from .mixing import MixupConfig, build_mixup, label_loss, mix
from .optim import FinetuneOptimConfig, build_optimizer, layer_decay_groups


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
        self.mixup = build_mixup(cfg.mixup, cfg.num_classes, cfg.label_smoothing)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        imgs, labels = batch["image"], batch["label"]
        if imgs.shape[0] == 0:
            return self.zero_step()
        if (labels < 0).any() or (labels >= self.cfg.num_classes).any():
            bad = [k for k, y in zip(batch.get("key", []), labels.tolist()) if not 0 <= y < self.cfg.num_classes]
            raise ValueError(f"samples without a label in [0, {self.cfg.num_classes}): {bad[:5]} "
                             f"(shard them with class labels, or fix model.num_classes)")
        imgs, target = mix(self.mixup, imgs, labels)  # target: soft labels [B, C] when mixed
        logits = self.model(imgs)
        loss = label_loss(logits, target, self.cfg.label_smoothing)
        if target.dim() == 1:
            self.log("train/top1", (logits.argmax(-1) == labels).float().mean(), batch_size=imgs.shape[0])
        self.record_loss(loss, imgs.shape[0])
        return loss

    def configure_optimizers(self):
        s, o = self.schedule, self.optim_cfg
        depth = len(self.model.encoder.blocks)
        groups = layer_decay_groups(self.model, o.weight_decay, o.layer_decay, self.model.layer_id, depth + 1)
        opt, sched = build_optimizer(self.model, o, s.effective_batch, s.total_steps, s.warmup_steps, groups)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
