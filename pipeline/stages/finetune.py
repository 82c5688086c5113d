"""The fine-tune stage: a registered encoder + classification head on the common training path, then
its accuracy on the held-out split, logged to the same run."""
from __future__ import annotations

from typing import Sequence

import lightning as L
import torch
from mlflow import MlflowClient

from ..checkpoint.export import write_classifier_export
from ..checkpoint.state import read_module_state, submodule_state
from ..checkpoint.store import STATE
from ..evaluation.features import EvalTransform, LabelledSplit, extract
from ..models.classifier import ViTClassifier, set_drop_path
from ..recipe import FinetuneRecipe
from ..registry import load_model_encoder, register_export, resolve_model
from ..tasks import FinetuneTask
from ..tracking import resolve_uri
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

    model = classifier()
    task = FinetuneTask(model, cfg, recipe.optim, plan.schedule)
    tags = {"vitpipe.init_model": ref.uri}
    if ref.run_id:
        tags["vitpipe.init_run"] = ref.run_id
    if ref.name:
        tags["vitpipe.init_model_version"] = f"{ref.name}/{ref.version}"

    def held_out(trainer: L.Trainer, result: TrainResult) -> None:
        if result.checkpoint is None:
            print("finetune: checkpoints disabled, so no trained weights to evaluate or register")
            return
        # The trained weights are read back from the final checkpoint rather than taken from memory: under
        # ZeRO-3 this process holds only its shard of them.
        trained = classifier()
        trained.load_state_dict(submodule_state(read_module_state(result.checkpoint / STATE)))
        top1, n = held_out_top1(trained, recipe)
        client = MlflowClient(result.tracking_uri)
        client.log_metric(result.run_id, "val/top1", top1, step=result.global_step)
        print(f"finetune: held-out top-1 {top1:.4f} on {n} samples of {recipe.data.val}")
        if recipe.register.name:
            t = recipe.data.transform
            out = write_classifier_export(result.checkpoint.parent / "exports" / result.checkpoint.name,
                                          trained, {"mean": list(t.mean), "std": list(t.std)},
                                          {"recipe_name": recipe.name, "recipe_hash": recipe.digest(),
                                           "step": result.global_step, "val_top1": top1})
            version = register_export(client, out, result.run_id, recipe.register.name, recipe.register.alias,
                                      {"vitpipe.eval.finetune_top1": f"{top1:.4f}"})
            print(f"registered models:/{recipe.register.name}/{version.version} (alias @{recipe.register.alias})")

    return fit(recipe, plan, task, extra_callbacks, run_tags=tags, on_trained=held_out, stage="finetune")


@torch.no_grad()
def held_out_top1(model: ViTClassifier, recipe: FinetuneRecipe) -> tuple[float, int]:
    """Top-1 of ``model`` on the first ``eval_limit`` samples of ``data.val`` (centre crop, no augmentation)."""
    t = recipe.data.transform
    transform = EvalTransform(recipe.model.image_size, t.mean, t.std, recipe.model.eval_crop_pct)
    split = LabelledSplit(recipe.data.val, transform, batch_size=256, limit=recipe.model.eval_limit)
    device = next(model.parameters()).device
    model.eval()
    out = extract(lambda x: model(x.to(device)), split)  # logits [N, C] with their labels
    return (out.feats.argmax(-1) == out.labels).float().mean().item(), len(out.labels)
