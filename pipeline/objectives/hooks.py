"""Hooks the built-in objectives share: frozen ViT-encoder features for ``vitpipe evaluate``, registration of
a run's final checkpoint, and a classifier's end of run (held-out top-1, export, registration)."""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .spec import Embedding, Objective
from .trained import export_trained, exports_dir, trained_model

if TYPE_CHECKING:
    from collections.abc import Callable

    import torch
    from torch import nn

    from ..evaluation.config import EvalConfig
    from ..evaluation.features import Features
    from ..recipe import RunRecipe
    from ..registry.models import ModelRef
    from ..stages.run_record import TrainResult

    # a trained classifier -> its held-out metrics ("val/top1" among them) and the number of samples they count
    HeldOutScore = Callable[[nn.Module], tuple[dict[str, float], int]]


def encoder_features(ref: ModelRef, cfg: EvalConfig) -> Embedding:
    """A ViT export's frozen encoder (MAE, DeiT student, fine-tuned classifier): its CLS token or patch mean,
    at the export's image size or ``cfg.image_size`` (positions resampled, said so)."""
    from ..evaluation.features import encoder_embedding
    from ..registry.models import load_model_encoder, resolution_change

    meta = ref.metadata()
    change = resolution_change(ref, cfg.image_size)
    encoder = load_model_encoder(ref, cfg.image_size)
    return Embedding(encoder_embedding(encoder, cfg.pool), tuple(cfg.image_size or meta["encoder"]["image_size"]),
                     meta["normalisation"], notes=[str(change)] if change else [],
                     params={"eval.position_resample": str(change)} if change else {})


def final_checkpoint(result: TrainResult, stage: str) -> bool:
    """Whether the run left a checkpoint to read its trained weights from (said in the summary if not)."""
    if result.checkpoint is None:
        result.summary.add(f"{stage}: checkpoints disabled, so no trained weights to evaluate or register")
    return result.checkpoint is not None


def register_final(objective: Objective, recipe: RunRecipe, result: TrainResult, model: nn.Module | None = None,
                   tags: dict[str, str] | None = None, **meta: Any) -> None:
    """Export the run's final checkpoint (``model``: its network, already loaded) and register it as a new version
    of ``register.name``, when the recipe names one."""
    if not recipe.register.name or result.checkpoint is None:
        return
    from mlflow import MlflowClient

    from ..registry import register_export

    out = export_trained(objective, recipe, result.checkpoint, exports_dir(result.checkpoint), model, **meta)
    version = register_export(MlflowClient(result.tracking_uri), out, result.run_id, recipe.register.name,
                              recipe.register.alias, tags)
    result.summary.add(f"registered models:/{recipe.register.name}/{version.version} "
                       f"(alias @{recipe.register.alias}) from run {result.run_id}")


def register_after_training(objective: Objective, recipe: RunRecipe, result: TrainResult) -> None:
    """End of a pretraining run: register its final checkpoint when the recipe names a model."""
    register_final(objective, recipe, result)


def held_out_outputs(fn: Callable[[torch.Tensor], torch.Tensor], recipe: RunRecipe, crop_pct: float,
                     limit: int | None) -> Features:
    """``fn`` (images [b, 3, H, W] on its device -> [b, ...]) over the first ``limit`` samples of ``data.val``
    (centre crop of ``crop_pct``, no augmentation), without autograd; outputs [N, ...] with their labels [N]."""
    from ..evaluation.features import EvalTransform, LabelledSplit, extract  # (extract runs without autograd)

    t = recipe.data.transform
    transform = EvalTransform(recipe.input_size(), t.mean, t.std, crop_pct)
    return extract(fn, LabelledSplit(recipe.data.val, transform, batch_size=256, limit=limit))


def held_out_top1(model: nn.Module, recipe: RunRecipe, crop_pct: float, limit: int | None) -> tuple[float, int]:
    """Top-1 of ``model`` on the first ``limit`` samples of ``data.val`` (centre crop of ``crop_pct``, no
    augmentation)."""
    device = next(model.parameters()).device
    model.eval()
    out = held_out_outputs(lambda x: model(x.to(device)), recipe, crop_pct, limit)  # logits [N, C]
    return (out.feats.argmax(-1) == out.labels).float().mean().item(), len(out.labels)


def classifier_after_training(objective: Objective, recipe: RunRecipe, result: TrainResult,
                              score: HeldOutScore | None = None) -> nn.Module | None:
    """End of a classifier's run: held-out metrics of the final checkpoint's weights (``score``; by default the
    top-1 alone) -> the run's ``val/*`` metrics, then export and registration when the recipe names a model.
    Returns the trained network (None without checkpoints)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    stage = objective.stage
    if not final_checkpoint(result, stage):
        return None
    model = trained_model(objective, recipe, result.checkpoint)
    m = recipe.model
    if score is None:
        top1, n = held_out_top1(model, recipe, m.eval_crop_pct, m.eval_limit)
        metrics = {"val/top1": top1}
    else:
        metrics, n = score(model)
        top1 = metrics["val/top1"]
    now = int(time.time() * 1000)
    MlflowClient(result.tracking_uri).log_batch(
        result.run_id, [Metric(k, v, now, result.global_step) for k, v in metrics.items()])
    others = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in metrics.items() if k != "val/top1")
    result.summary.add(f"{stage}: held-out top-1 {top1:.4f} on {n} samples of {recipe.data.val}"
                       + (f"; {others}" if others else ""))
    register_final(objective, recipe, result, model, {f"vitpipe.eval.{stage}_top1": f"{top1:.4f}"}, val_top1=top1)
    return model
