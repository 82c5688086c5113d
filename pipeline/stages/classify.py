"""The classify stage: a timm architecture trained from scratch on labelled shards (e.g. a CNN teacher for
DeiT), then its held-out top-1 and, when the recipe names a registered model, its export and registration."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import lightning as L

from ..checkpoint.timm_export import build_timm, write_timm_export
from ..recipe import ClassifyRecipe
from ..tasks.supervised import SupervisedTask
from .held_out import report_classifier, trained_weights
from .train import TrainResult, fit, plan_run


def train_classifier(recipe: ClassifyRecipe, resume: str | None = "auto",
                     extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    m = recipe.model
    plan = plan_run(recipe, resume)
    task = SupervisedTask(build_timm(m.arch, m.num_classes, m.in_chans), m.num_classes, m.label_smoothing, m.mixup,
                          recipe.optim, plan.schedule)

    def write(out: Path, model: Any, normalisation: dict[str, Any], extra: dict[str, Any]) -> Path:
        return write_timm_export(out, m.arch, model, m.num_classes, m.in_chans, m.image_size, normalisation, extra)

    def held_out(trainer: L.Trainer, result: TrainResult) -> None:
        if (weights := trained_weights(result, "classify")) is not None:
            trained = build_timm(m.arch, m.num_classes, m.in_chans)
            trained.load_state_dict(weights)
            report_classifier(trained, recipe, result, "classify", write)

    return fit(recipe, plan, task, extra_callbacks, run_tags={"vitpipe.arch": m.arch}, on_trained=held_out,
               stage="classify")
