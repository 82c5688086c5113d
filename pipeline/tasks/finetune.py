"""Supervised fine-tuning of a pretrained encoder with a classification head (the MAE paper's recipe:
layer-wise lr decay, drop path, mixup / cutmix, label smoothing)."""
from __future__ import annotations

from ..models.classifier import ViTClassifier
from .base import Schedule
from .config import FinetuneConfig, FinetuneOptimConfig
from .optim import layer_decay_groups
from .supervised import SupervisedTask


class FinetuneTask(SupervisedTask):
    def __init__(self, model: ViTClassifier, cfg: FinetuneConfig, optim_cfg: FinetuneOptimConfig,
                 schedule: Schedule):
        super().__init__(model, cfg.num_classes, cfg.label_smoothing, cfg.mixup, optim_cfg, schedule)
        self.cfg = cfg

    def param_groups(self) -> list[dict]:
        o = self.optim_cfg
        depth = len(self.model.encoder.blocks)
        return layer_decay_groups(self.model, o.weight_decay, o.layer_decay, self.model.layer_id, depth + 1)
