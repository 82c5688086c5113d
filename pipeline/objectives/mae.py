"""MAE pretraining (He et al., 2022): a ViT encoder sees a random 25 % of the patches, a light decoder
reconstructs the rest; the encoder is what fine-tuning and evaluation use."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..models.config import MAEConfig
from ..recipe import RunRecipe
from ..tasks.config import OptimConfig
from .hooks import encoder_features, register_after_training
from .spec import Objective, Training

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from ..stages.train import RunPlan


@dataclass
class MAERecipe(RunRecipe):
    """MAE pretraining."""

    image_size_key: ClassVar[str] = "model.encoder.image_size"
    task: Literal["mae"] = "mae"
    model: MAEConfig = field(default_factory=MAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


def build(recipe: MAERecipe, plan: RunPlan) -> Training:
    from ..models.flops import mae_train_flops_per_image
    from ..tasks import MAEPretrainTask
    from ..tracking.callbacks import ReconstructionImages

    task = MAEPretrainTask(recipe.model, recipe.optim, plan.schedule)
    callbacks = []
    if recipe.tracking.recon_every_n_steps:  # input / masked / reconstruction grids logged to the run
        t = recipe.data.transform
        callbacks.append(ReconstructionImages(recipe.tracking.recon_every_n_steps, t.mean, t.std))
    return Training(task, callbacks, flops_per_image=mae_train_flops_per_image(recipe.model))


def build_model(recipe: MAERecipe) -> nn.Module:
    from ..models import MAE

    return MAE(recipe.model)


def write_export(out: Path, model: nn.Module, recipe: MAERecipe, meta: dict[str, Any]) -> Path:
    """The encoder alone (what fine-tuning and evaluation load) and the full MAE, decoder included."""
    from ..exports.vit import write_export as write_vit

    return write_vit(out, model.encoder, model, meta["normalisation"], meta, objective="mae")


OBJECTIVE = Objective("mae", MAERecipe, "masked-autoencoder pretraining of a ViT encoder", build, build_model,
                      write_export, after_training=register_after_training, features=encoder_features,
                      stage="pretrain")
