"""The pretrain stage: the MAE task (with its reconstruction images) or the DeiT task (with its teacher) on the
common training path, then an optional export + registration of the result."""
from __future__ import annotations

from typing import Sequence

import lightning as L

from ..recipe import DeiTRecipe, Recipe
from ..registry.teacher import load_teacher
from ..tasks import MAEPretrainTask
from ..tasks.deit import DeiTTask
from ..tracking import resolve_uri
from ..tracking.callbacks import ReconstructionImages
from .register import register_checkpoint
from .train import RunPlan, TrainResult, fit, plan_run

PretrainResult = TrainResult


def deit_task(recipe: DeiTRecipe, plan: RunPlan) -> DeiTTask:
    """The student, and the teacher loaded (offline) from the registry, an export or a local timm file."""
    m, t = recipe.model, recipe.data.transform
    teacher = None
    if m.distill.kind != "none":
        teacher = load_teacher(m.teacher, resolve_uri(recipe.tracking), {"mean": list(t.mean), "std": list(t.std)})
    task = DeiTTask(m, recipe.optim, plan.schedule, teacher)
    task.model.encoder.grad_checkpointing = recipe.trainer.activation_checkpointing
    return task


def pretrain(recipe: Recipe | DeiTRecipe, resume: str | None = "auto",
             extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    plan = plan_run(recipe, resume)
    callbacks: list[L.Callback] = []
    if isinstance(recipe, DeiTRecipe):
        if recipe.register.name:
            raise ValueError("register.name: DeiT models cannot be registered yet (their export is not written)")
        task = deit_task(recipe, plan)
    else:
        task = MAEPretrainTask(recipe.model, recipe.optim, plan.schedule)
        task.model.set_grad_checkpointing(recipe.trainer.activation_checkpointing)
    if recipe.tracking.recon_every_n_steps and isinstance(task, MAEPretrainTask):
        t = recipe.data.transform
        callbacks.append(ReconstructionImages(recipe.tracking.recon_every_n_steps, t.mean, t.std))
    callbacks.extend(extra_callbacks)

    def register(trainer: L.Trainer, result: TrainResult) -> None:
        if recipe.register.name and result.checkpoint is not None:
            register_checkpoint(result.checkpoint, recipe.register.name, recipe.register.alias,
                                result.tracking_uri)

    return fit(recipe, plan, task, callbacks, on_trained=register, stage="pretrain")
