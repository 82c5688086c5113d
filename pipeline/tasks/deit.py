"""DeiT-style supervised pretraining as a LightningModule: a distilled ViT (CLS + distillation token) learning
from the labels and, through the distillation head, from a frozen teacher; mixup / cutmix and label smoothing.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..models.deit import DistilledViT
from ..models.vit import ViTEncoder
from ..tracking.device_log import SpanTimer, log_number, logs_this_step
from .base import Schedule
from .config import DeiTConfig, OptimConfig
from .distill import distillation_loss
from .supervised import SupervisedTask


class DeiTTask(SupervisedTask):
    def __init__(self, cfg: DeiTConfig, optim_cfg: OptimConfig, schedule: Schedule,
                 teacher: nn.Module | None = None):
        model = DistilledViT(ViTEncoder(cfg.encoder), cfg.num_classes, cfg.head)
        super().__init__(model, cfg.num_classes, cfg.label_smoothing, cfg.mixup, optim_cfg, schedule)
        self.cfg = cfg
        # Kept out of the module tree: not trained, not in checkpoints, not partitioned by ZeRO.
        self._teacher = (teacher,) if teacher is not None and cfg.distill.kind != "none" else ()
        self._teacher_time = SpanTimer()

    def on_fit_start(self) -> None:
        if self._teacher:  # the student's device and dtype ("bf16-true" casts the student's weights)
            dtype = next(self.model.parameters()).dtype
            self._teacher[0].to(device=self.device, dtype=dtype)

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        if batch["image"].shape[0] == 0:
            return self.zero_step()
        imgs, target = self.mixed(batch, batch_idx)  # the teacher sees the same mixed images, as in DeiT
        logs = logs_this_step(self.trainer)
        teacher_logits = None
        if self._teacher:
            with self._teacher_time.span(self.device):
                teacher_logits = self._teacher[0](imgs)
            seconds = self._teacher_time.take()  # on a GPU: an earlier step's, when done
            if seconds is not None and logs:
                log_number(self, "perf/teacher_s", seconds, batch_size=1)
        cls, dist = self.model.both_logits(imgs)
        parts = distillation_loss(cls, dist, target, teacher_logits, self.cfg.distill, self.label_smoothing)
        if logs:
            self.log_parts(parts, cls, dist, target, teacher_logits)
        self.record_loss(parts["loss"], imgs.shape[0])
        return parts["loss"]

    def log_parts(self, parts: dict[str, torch.Tensor], cls: torch.Tensor, dist: torch.Tensor, target: torch.Tensor,
                  teacher_logits: torch.Tensor | None) -> None:
        """The loss's parts and the heads' agreement with the teacher and the labels, in a logging step."""
        n = cls.shape[0]
        self.log("train/loss_label", parts["label"], batch_size=n)
        self.log("train/loss_distill", parts["distill"], batch_size=n)
        if teacher_logits is not None:  # what the distillation head is taught, and how closely it follows
            taught = teacher_logits.argmax(-1)
            self.log("train/dist_teacher_agreement", (dist.argmax(-1) == taught).float().mean(), batch_size=n)
            # the teacher's top-1 on the very images the student trains on, against the label (of a mixed image:
            # its dominant class, the one with the larger share)
            label = target if target.dim() == 1 else target.argmax(-1)
            self.log("train/teacher_top1", (taught == label).float().mean(), batch_size=n)
        if target.dim() == 1:
            self.log("train/top1", ((cls + dist).argmax(-1) == target).float().mean(), batch_size=n)
