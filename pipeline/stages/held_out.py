"""The end of a classifier's training run (fine-tuning, DeiT): held-out top-1 of the trained weights, logged
to the run, and the classifier exported and registered when the recipe names a registered model."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from mlflow import MlflowClient
from torch import nn

from ..checkpoint.export import write_classifier_export
from ..checkpoint.state import read_module_state, submodule_state
from ..checkpoint.store import STATE
from ..evaluation.features import EvalTransform, LabelledSplit, extract
from ..recipe import RunRecipe
from ..registry import register_export
from .train import TrainResult


@torch.no_grad()
def held_out_top1(model: nn.Module, recipe: RunRecipe) -> tuple[float, int]:
    """Top-1 of ``model`` on the first ``model.eval_limit`` samples of ``data.val`` (centre crop of
    ``model.eval_crop_pct``, no augmentation)."""
    t = recipe.data.transform
    transform = EvalTransform(recipe.input_size(), t.mean, t.std, recipe.model.eval_crop_pct)
    split = LabelledSplit(recipe.data.val, transform, batch_size=256, limit=recipe.model.eval_limit)
    device = next(model.parameters()).device
    model.eval()
    out = extract(lambda x: model(x.to(device)), split)  # logits [N, C] with their labels
    return (out.feats.argmax(-1) == out.labels).float().mean().item(), len(out.labels)


def trained_weights(result: TrainResult, stage: str) -> dict[str, Any] | None:
    """The model's weights read back from the run's final checkpoint rather than taken from memory (under
    ZeRO-3 a process holds only its shard of them); None, said so, when checkpoints were off."""
    if result.checkpoint is None:
        print(f"{stage}: checkpoints disabled, so no trained weights to evaluate or register")
        return None
    return submodule_state(read_module_state(result.checkpoint / STATE))


def report_classifier(trained: nn.Module, recipe: RunRecipe, result: TrainResult, stage: str,
                      write: Callable[..., Path] = write_classifier_export) -> float:
    """Held-out top-1 -> ``val/top1`` of the run; export (``write(out, model, normalisation, extra)``) and
    register when ``register.name`` is set."""
    top1, n = held_out_top1(trained, recipe)
    client = MlflowClient(result.tracking_uri)
    client.log_metric(result.run_id, "val/top1", top1, step=result.global_step)
    print(f"{stage}: held-out top-1 {top1:.4f} on {n} samples of {recipe.data.val}")
    if recipe.register.name:
        t = recipe.data.transform
        out = write(result.checkpoint.parent / "exports" / result.checkpoint.name, trained,
                    {"mean": list(t.mean), "std": list(t.std)},
                    {"recipe_name": recipe.name, "recipe_hash": recipe.digest(), "step": result.global_step,
                     "val_top1": top1})
        version = register_export(client, out, result.run_id, recipe.register.name, recipe.register.alias,
                                  {f"vitpipe.eval.{stage}_top1": f"{top1:.4f}"})
        print(f"registered models:/{recipe.register.name}/{version.version} (alias @{recipe.register.alias})")
    return top1
