"""The DeiT stage: a distilled ViT student and its teacher on the common training path, then the held-out
top-1 of the trained weights and, when the recipe names a registered model, its export and registration."""
from __future__ import annotations

from typing import Sequence

import lightning as L
from mlflow import MlflowClient

from ..checkpoint.state import read_callback_state
from ..checkpoint.store import STATE
from ..models.deit import DistilledViT
from ..models.vit import ViTEncoder
from ..recipe import DeiTRecipe
from ..registry.teacher import load_teacher
from ..tasks.deit import DeiTTask
from ..tasks.ema import STATE_KEY as EMA_KEY
from ..tasks.ema import WeightEMA
from ..tracking import resolve_uri
from .held_out import held_out_top1, report_classifier, trained_weights
from .train import TrainResult, fit, plan_run


def train_deit(recipe: DeiTRecipe, resume: str | None = "auto",
               extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    m, t = recipe.model, recipe.data.transform
    plan = plan_run(recipe, resume)
    teacher, tags = None, {"vitpipe.distill": m.distill.kind}
    if m.distill.kind != "none":  # loaded offline: the registry, an export folder or a local timm file
        teacher = load_teacher(m.teacher, resolve_uri(recipe.tracking), {"mean": list(t.mean), "std": list(t.std)})
        tags["vitpipe.teacher"] = m.teacher.model
    task = DeiTTask(m, recipe.optim, plan.schedule, teacher)
    task.model.encoder.grad_checkpointing = recipe.trainer.activation_checkpointing
    callbacks = [*extra_callbacks, *([WeightEMA(m.ema_decay)] if m.ema_decay else [])]

    def held_out(trainer: L.Trainer, result: TrainResult) -> None:
        if (weights := trained_weights(result, "deit")) is None:
            return
        trained = DistilledViT(ViTEncoder(m.encoder), m.num_classes, m.head)
        trained.load_state_dict(weights)
        report_classifier(trained, recipe, result, "deit")
        ema = read_callback_state(result.checkpoint / STATE, EMA_KEY) if m.ema_decay else None
        if ema is not None:
            trained.load_state_dict({**weights, **ema["shadow"]})
            top1, n = held_out_top1(trained, recipe)
            MlflowClient(result.tracking_uri).log_metric(result.run_id, "val/top1_ema", top1, step=result.global_step)
            print(f"deit: held-out top-1 of the weight average (decay {m.ema_decay}) {top1:.4f} on {n} samples")

    return fit(recipe, plan, task, callbacks, run_tags=tags, on_trained=held_out, stage="deit")
