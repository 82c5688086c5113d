"""A timm architecture trained from scratch on labelled shards: e.g. the CNN teacher of a DeiT student."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..recipe import RunRecipe
from ..tasks.config import OptimConfig, TimmClassifierConfig, supervised_optim
from .hooks import classifier_after_training
from .spec import Embedding, Objective, Training

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from ..evaluation.config import EvalConfig
    from ..registry.models import ModelRef
    from ..stages.train import RunPlan


@dataclass
class ClassifyRecipe(RunRecipe):
    """A timm classifier trained from scratch on labelled shards, e.g. the CNN teacher of a DeiT student."""

    labelled = True
    task: Literal["classify"] = "classify"
    model: TimmClassifierConfig = field(default_factory=TimmClassifierConfig)
    optim: OptimConfig = field(default_factory=lambda: supervised_optim(base_lr=5e-4))


def build(recipe: ClassifyRecipe, plan: RunPlan) -> Training:
    from ..models.flops import measured_train_flops_per_image
    from ..tasks.supervised import SupervisedTask

    m = recipe.model
    model = build_model(recipe)
    flops = measured_train_flops_per_image(model, (m.in_chans, *m.image_size))  # no formula for any timm net
    task = SupervisedTask(model, m.num_classes, m.label_smoothing, m.mixup, recipe.optim, plan.schedule)
    return Training(task, tags={"vitpipe.arch": m.arch}, flops_per_image=flops)


def build_model(recipe: ClassifyRecipe) -> nn.Module:
    from ..exports.timm_classifier import build_timm

    m = recipe.model
    return build_timm(m.arch, m.num_classes, m.in_chans)


def write_export(out: Path, model: nn.Module, recipe: ClassifyRecipe, meta: dict[str, Any]) -> Path:
    from ..exports.timm_classifier import write_timm_export

    m = recipe.model
    return write_timm_export(out, m.arch, model, m.num_classes, m.in_chans, m.image_size, meta["normalisation"], meta)


def features(ref: ModelRef, cfg: EvalConfig) -> Embedding:
    """The classifier's pre-logits features (timm's ``forward_head(pre_logits=True)``: pooled, before the
    last linear layer), at its training size unless ``cfg.image_size``; ``cfg.pool`` does not apply."""
    import torch

    from ..exports.timm_classifier import load_timm_classifier

    meta = ref.metadata()
    model = load_timm_classifier(ref.folder).eval()

    def embed(imgs: torch.Tensor) -> torch.Tensor:
        return model.forward_head(model.forward_features(imgs), pre_logits=True).flatten(1)  # [b, D]

    return Embedding(embed, tuple(cfg.image_size or meta["timm"]["image_size"]), meta["normalisation"])


OBJECTIVE = Objective("classify", ClassifyRecipe, "a timm classifier trained from scratch (e.g. a CNN teacher)",
                      build, build_model, write_export, after_training=classifier_after_training, features=features)
