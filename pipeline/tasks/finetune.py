"""Supervised fine-tuning of a pretrained encoder with a classification head (the MAE paper's recipe:
layer-wise lr decay, drop path, mixup / cutmix, label smoothing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


from ..models.classifier import ViTClassifier
from .base import Schedule
from .mixing import MixupConfig
from .optim import FinetuneOptimConfig, layer_decay_groups
from .supervised import SupervisedTask


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


class FinetuneTask(SupervisedTask):
    def __init__(self, model: ViTClassifier, cfg: FinetuneConfig, optim_cfg: FinetuneOptimConfig,
                 schedule: Schedule):
        super().__init__(model, cfg.num_classes, cfg.label_smoothing, cfg.mixup, optim_cfg, schedule)
        self.cfg = cfg

    def param_groups(self) -> list[dict]:
        o = self.optim_cfg
        depth = len(self.model.encoder.blocks)
        return layer_decay_groups(self.model, o.weight_decay, o.layer_decay, self.model.layer_id, depth + 1)
