"""DeiT-style supervised training of a ViT student with a distillation token, with or without a teacher
(Touvron et al., 2021); at the end, the held-out top-1 of its weights and of their moving average."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from ..recipe import RunRecipe
from ..tasks.config import DeiTConfig, OptimConfig, supervised_optim
from .hooks import classifier_after_training, encoder_features, held_out_outputs, held_out_top1
from .spec import Objective, Training

if TYPE_CHECKING:
    from pathlib import Path

    from torch import nn

    from ..stages.run_record import TrainResult
    from ..stages.train import RunPlan


@dataclass
class DeiTRecipe(RunRecipe):
    """DeiT-style supervised pretraining, with or without a teacher. DeiT's lr is 5e-4 x batch / 512, i.e.
    base_lr 2.5e-4 under the batch / 256 rule."""

    image_size_key: ClassVar[str] = "model.encoder.image_size"
    labelled = True
    task: Literal["deit"] = "deit"
    model: DeiTConfig = field(default_factory=DeiTConfig)
    optim: OptimConfig = field(default_factory=lambda: supervised_optim(base_lr=2.5e-4))


def build(recipe: DeiTRecipe, plan: RunPlan) -> Training:
    from ..models.flops import vit_forward_flops
    from ..registry.teacher import load_teacher
    from ..tasks.deit import DeiTTask
    from ..tasks.ema import WeightEMA
    from ..tracking import resolve_uri

    m = recipe.model
    teacher, tags = None, {"vitpipe.distill": m.distill.kind}
    if m.distill.kind != "none":  # loaded offline: the registry, an export folder or a local timm file
        teacher = load_teacher(m.teacher, resolve_uri(recipe.tracking), recipe.normalisation())
        tags["vitpipe.teacher"] = m.teacher.model
    task = DeiTTask(m, recipe.optim, plan.schedule, teacher)
    # the student's FLOPs (both heads); the teacher's forward is work beside the model, not counted
    flops = 3 * sum(vit_forward_flops(m.encoder, m.num_classes, heads=2).values())
    return Training(task, [WeightEMA(m.ema_decay)] if m.ema_decay else [], tags, flops_per_image=flops)


def build_model(recipe: DeiTRecipe) -> nn.Module:
    from ..models.deit import DistilledViT
    from ..models.vit import ViTEncoder

    m = recipe.model
    return DistilledViT(ViTEncoder(m.encoder), m.num_classes, m.head)


def write_export(out: Path, model: nn.Module, recipe: DeiTRecipe, meta: dict[str, Any]) -> Path:
    """The student's encoder and both heads: evaluation and fine-tuning load its encoder, a later DeiT run can
    use it as a teacher."""
    from ..exports.vit import write_classifier_export

    return write_classifier_export(out, model, meta["normalisation"], meta, objective="deit")


def after_training(objective: Objective, recipe: DeiTRecipe, result: TrainResult) -> None:
    """Held-out top-1 (and registration) of the trained weights, with a teacher in the same pass what the
    distillation did (see ``distillation_scores``), then the top-1 of the weights' moving average when kept."""
    m = recipe.model
    with_teacher = m.distill.kind != "none"
    trained = classifier_after_training(objective, recipe, result,
                                        (lambda model: distillation_scores(model, recipe)) if with_teacher else None)
    if trained is None or not m.ema_decay:
        return

    from mlflow import MlflowClient

    from ..checkpoint.state import read_callback_state
    from ..checkpoint.store import STATE
    from ..tasks.ema import STATE_KEY as EMA_KEY

    ema = read_callback_state(result.checkpoint / STATE, EMA_KEY)
    if ema is None:
        return
    trained.load_state_dict({**trained.state_dict(), **ema["shadow"]})
    top1, n = held_out_top1(trained, recipe, m.eval_crop_pct, m.eval_limit)
    MlflowClient(result.tracking_uri).log_metric(result.run_id, "val/top1_ema", top1, step=result.global_step)
    result.summary.add(f"deit: held-out top-1 of the weight average (decay {m.ema_decay}) {top1:.4f} on {n} samples")


def distillation_scores(student: nn.Module, recipe: DeiTRecipe) -> tuple[dict[str, float], int]:
    """One pass over the held-out images, exactly as the student's pipeline hands them to the teacher (the
    student's eval transform, re-normalised and resized by ``Teacher``): the student's top-1 (``val/top1``,
    its ``head`` prediction), the teacher's, each head's, and how often each head's class agrees with the
    teacher's; and the number of images. A teacher that loses accuracy through this path, or a distillation head
    that does not follow it, is what keeps distillation from helping."""
    import torch

    from ..registry.teacher import load_teacher
    from ..tracking import resolve_uri

    m = recipe.model
    teacher = load_teacher(m.teacher, resolve_uri(recipe.tracking), recipe.normalisation())
    device = next(student.parameters()).device
    teacher.to(device)
    student.eval()

    def heads(imgs: torch.Tensor) -> torch.Tensor:  # [b, 4, K]: the prediction, CLS head, distillation head, teacher
        imgs = imgs.to(device)
        cls, dist = student.both_logits(imgs)
        return torch.stack([student.combine(cls, dist), cls, dist, teacher(imgs).to(cls.dtype)], dim=1)

    out = held_out_outputs(heads, recipe, m.eval_crop_pct, m.eval_limit)
    pred, cls, dist, taught = out.feats.argmax(-1).unbind(1)  # each [N]
    rates = {"top1": pred == out.labels, "teacher_top1": taught == out.labels, "top1_cls_head": cls == out.labels,
             "top1_dist_head": dist == out.labels, "dist_head_teacher_agreement": dist == taught,
             "cls_head_teacher_agreement": cls == taught}
    return {f"val/{name}": hit.float().mean().item() for name, hit in rates.items()}, len(out.labels)


OBJECTIVE = Objective("deit", DeiTRecipe, "DeiT: a ViT student with a distillation token, with or without a teacher",
                      build, build_model, write_export, after_training=after_training, features=encoder_features)
