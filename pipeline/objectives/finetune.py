"""Supervised fine-tuning of a pretrained (registered or exported) ViT encoder with a classification head:
the MAE paper's recipe (layer-wise lr decay, drop path, mixup / cutmix, label smoothing)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..console import report
from ..recipe import RunRecipe
from ..tasks.config import FinetuneConfig, FinetuneOptimConfig
from .hooks import classifier_after_training, encoder_features
from .spec import Objective, Training

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from ..registry.models import ModelRef
    from ..stages.train import RunPlan


@dataclass
class FinetuneRecipe(RunRecipe):
    """Supervised fine-tuning of a registered encoder with a classification head."""

    labelled = True
    task: Literal["finetune"] = "finetune"
    model: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)


def init_model(recipe: FinetuneRecipe) -> ModelRef:
    """The pretrained model ``model.init`` names, resolved (downloaded once into the cache)."""
    from ..registry import resolve_model
    from ..tracking import resolve_uri

    return resolve_model(recipe.model.init, resolve_uri(recipe.tracking, create=False))


def classifier(recipe: FinetuneRecipe, ref: ModelRef) -> nn.Module:
    from ..models.classifier import ViTClassifier, set_drop_path
    from ..registry import load_model_encoder

    m = recipe.model
    # positions resampled if the resolution changed; from scratch: the architecture only, fresh weights
    encoder = load_model_encoder(ref, m.image_size, fresh=m.from_scratch)
    set_drop_path(encoder, m.drop_path)
    return ViTClassifier(encoder, m.num_classes, m.pool)


def build(recipe: FinetuneRecipe, plan: RunPlan) -> Training:
    from lightning.pytorch.utilities import rank_zero_only

    from ..models.flops import vit_forward_flops
    from ..registry.models import resolution_change
    from ..tasks import FinetuneTask

    ref = init_model(recipe)
    params = {}
    change = None if recipe.model.from_scratch else resolution_change(ref, recipe.model.image_size)
    if change is not None:
        if rank_zero_only.rank == 0:
            report.info(f"finetune {ref.uri}: {change}")
        params["model.position_resample"] = str(change)
    tags = {"vitpipe.init_model": ref.uri, "vitpipe.init": "scratch" if recipe.model.from_scratch else "pretrained"}
    if ref.run_id:
        tags["vitpipe.init_run"] = ref.run_id
    if ref.name:
        tags["vitpipe.init_model_version"] = f"{ref.name}/{ref.version}"
    model = classifier(recipe, ref)
    flops = 3 * sum(vit_forward_flops(model.encoder.cfg, recipe.model.num_classes).values())
    return Training(FinetuneTask(model, recipe.model, recipe.optim, plan.schedule), tags=tags, params=params,
                    flops_per_image=flops)


def build_model(recipe: FinetuneRecipe) -> nn.Module:
    """The classifier's architecture: the init model's encoder at the fine-tuning size, and the head."""
    return classifier(recipe, init_model(recipe))


def write_export(out: Path, model: nn.Module, recipe: FinetuneRecipe, meta: dict[str, Any]) -> Path:
    from ..exports.vit import write_classifier_export

    return write_classifier_export(out, model, meta["normalisation"], meta, objective="finetune")


OBJECTIVE = Objective("finetune", FinetuneRecipe, "a classification head on a pretrained ViT encoder, fine-tuned",
                      build, build_model, write_export, after_training=classifier_after_training,
                      features=encoder_features, verb="finetune")
