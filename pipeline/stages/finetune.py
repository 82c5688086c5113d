"""The fine-tune stage: a registered encoder + classification head on the common training path, then
its accuracy on the held-out split, logged to the same run."""
from __future__ import annotations

from typing import Sequence

import lightning as L
from lightning.pytorch.utilities import rank_zero_only

from ..models.classifier import ViTClassifier, set_drop_path
from ..recipe import FinetuneRecipe
from ..registry import load_model_encoder, resolve_model
from ..registry.models import resolution_change
from ..tasks import FinetuneTask
from ..tracking import resolve_uri
from .held_out import report_classifier, trained_weights
from .train import TrainResult, fit, plan_run


def finetune(recipe: FinetuneRecipe, resume: str | None = "auto",
             extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    cfg = recipe.model
    plan = plan_run(recipe, resume)
    tracking_uri = resolve_uri(recipe.tracking)
    ref = resolve_model(cfg.init, tracking_uri)

    def classifier() -> ViTClassifier:
        encoder = load_model_encoder(ref, cfg.image_size)  # positions resampled if the resolution changed
        set_drop_path(encoder, cfg.drop_path)
        return ViTClassifier(encoder, cfg.num_classes, cfg.pool)

    params = {}
    if (change := resolution_change(ref, cfg.image_size)) is not None:
        if rank_zero_only.rank == 0:
            print(f"finetune {ref.uri}: {change}")
        params["model.position_resample"] = str(change)
    model = classifier()
    task = FinetuneTask(model, cfg, recipe.optim, plan.schedule)
    tags = {"vitpipe.init_model": ref.uri}
    if ref.run_id:
        tags["vitpipe.init_run"] = ref.run_id
    if ref.name:
        tags["vitpipe.init_model_version"] = f"{ref.name}/{ref.version}"

    def held_out(trainer: L.Trainer, result: TrainResult) -> None:
        if (weights := trained_weights(result, "finetune")) is not None:
            trained = classifier()
            trained.load_state_dict(weights)
            report_classifier(trained, recipe, result, "finetune")

    return fit(recipe, plan, task, extra_callbacks, run_tags=tags, run_params=params, on_trained=held_out,
               stage="finetune")
