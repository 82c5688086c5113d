"""The DeiT stage: a distilled ViT student and its teacher on the common training path, then the held-out
top-1 of the trained weights and, when the recipe names a registered model, its export and registration."""
from __future__ import annotations

from typing import Sequence

import lightning as L

from ..checkpoint.state import read_module_state, submodule_state
from ..checkpoint.store import STATE
from ..models.deit import DistilledViT
from ..models.vit import ViTEncoder
from ..recipe import DeiTRecipe
from ..registry.teacher import load_teacher
from ..tasks.deit import DeiTTask
from ..tracking import resolve_uri
from .held_out import report_classifier
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

    def held_out(trainer: L.Trainer, result: TrainResult) -> None:
        if result.checkpoint is None:
            print("deit: checkpoints disabled, so no trained weights to evaluate or register")
            return
        # read back from the final checkpoint: under ZeRO-3 this process holds only its shard of the weights
        trained = DistilledViT(ViTEncoder(m.encoder), m.num_classes, m.head)
        trained.load_state_dict(submodule_state(read_module_state(result.checkpoint / STATE)))
        report_classifier(trained, recipe, result, "deit")

    return fit(recipe, plan, task, extra_callbacks, run_tags=tags, on_trained=held_out, stage="deit")
