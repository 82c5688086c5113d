"""The DeiT teacher: any classifier the pipeline can load without a network, frozen, fed the student's batch.

Sources: a registered model (``models:/name@alias`` or ``models:/name/3``) or an export folder holding a
fine-tuned ViT classifier or a timm classifier (``exports.timm_classifier``); or ``timm:<arch>`` with a local
weights file.
The student's normalised images are re-normalised to the teacher's statistics and resized to its input size.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from ..exports.timm_classifier import build_timm, load_timm_classifier
from ..exports.vit import load_classifier
from ..tasks.config import TeacherConfig
from .models import ModelError, resolve_model


class Teacher(nn.Module):
    """Frozen classifier: student images [B, C, H, W] (normalised with ``student_norm``) -> logits [B, K]."""

    def __init__(self, model: nn.Module, norm: dict[str, list[float]], image_size: tuple[int, int] | None,
                 student_norm: dict[str, list[float]]):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.image_size = tuple(image_size) if image_size else None
        # x_teacher = (x_student * std_s + mean_s - mean_t) / std_t = x_student * scale + shift, per channel
        ms, ss = torch.tensor(student_norm["mean"]), torch.tensor(student_norm["std"])
        mt, st = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
        self.register_buffer("scale", (ss / st).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("shift", ((ms - mt) / st).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> Teacher:
        return super().train(False)  # always in eval mode: batch-norm statistics and dropout stay fixed

    @torch.no_grad()
    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = imgs * self.scale.to(imgs.dtype) + self.shift.to(imgs.dtype)
        if self.image_size and tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        return self.model(x)


def load_teacher(cfg: TeacherConfig, tracking_uri: str, student_norm: dict[str, list[float]]) -> Teacher:
    if cfg.model.startswith("timm:"):
        model = build_timm(cfg.model[5:], cfg.num_classes, cfg.in_chans)
        path = Path(cfg.weights)
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(path, map_location="cpu",
                                                                                     weights_only=True)
        try:
            model.load_state_dict(state.get("state_dict", state) if isinstance(state, dict) else state)
        except RuntimeError as err:
            raise ModelError(f"teacher weights {path} do not fit timm:{cfg.model[5:]}: {err}") from None
        return Teacher(model, cfg.normalisation, cfg.image_size, student_norm)
    ref = resolve_model(cfg.model, tracking_uri)
    meta = ref.metadata()
    norm = meta["normalisation"] if meta["normalisation"].get("mean") else student_norm
    if "timm" in meta:
        return Teacher(load_timm_classifier(ref.folder), norm, tuple(meta["timm"]["image_size"]), student_norm)
    if "classifier" not in meta:
        raise ModelError(f"{cfg.model}: an encoder without a classification head cannot teach")
    return Teacher(load_classifier(ref.folder), norm, tuple(meta["encoder"]["image_size"]), student_norm)
