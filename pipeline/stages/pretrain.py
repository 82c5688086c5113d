"""The pretrain stage: the MAE task (with its reconstruction images), the DeiT task (with its teacher) or a
timm classifier trained from scratch, on the common training path, then an optional export + registration."""
from __future__ import annotations

from typing import Sequence

import lightning as L

from ..recipe import ClassifyRecipe, DeiTRecipe, Recipe
from ..tasks import MAEPretrainTask
from ..tracking.callbacks import ReconstructionImages
from .classify import train_classifier
from .deit import train_deit
from .register import register_checkpoint
from .train import TrainResult, fit, plan_run

PretrainResult = TrainResult


def pretrain(recipe: Recipe | DeiTRecipe | ClassifyRecipe, resume: str | None = "auto",
             extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    if isinstance(recipe, DeiTRecipe):
        return train_deit(recipe, resume, extra_callbacks)
    if isinstance(recipe, ClassifyRecipe):
        return train_classifier(recipe, resume, extra_callbacks)
    plan = plan_run(recipe, resume)
    task = MAEPretrainTask(recipe.model, recipe.optim, plan.schedule)
    task.model.set_grad_checkpointing(recipe.trainer.activation_checkpointing)
    callbacks: list[L.Callback] = []
    if recipe.tracking.recon_every_n_steps:
        t = recipe.data.transform
        callbacks.append(ReconstructionImages(recipe.tracking.recon_every_n_steps, t.mean, t.std))
    callbacks.extend(extra_callbacks)

    def register(trainer: L.Trainer, result: TrainResult) -> None:
        if recipe.register.name and result.checkpoint is not None:
            register_checkpoint(result.checkpoint, recipe.register.name, recipe.register.alias,
                                result.tracking_uri)

    return fit(recipe, plan, task, callbacks, on_trained=register, stage="pretrain")
