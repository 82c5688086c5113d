"""Mixup / CutMix on a batch (timm's Mixup) and the cross-entropy against the soft targets they make."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.data import Mixup

from .config import MixupConfig


def build_mixup(cfg: MixupConfig, num_classes: int, label_smoothing: float) -> Mixup | None:
    if cfg.mixup_alpha <= 0 and cfg.cutmix_alpha <= 0:
        return None
    # correct_lam: with CutMix the label weight is the pasted box's actual share of the image, after clipping
    return Mixup(mixup_alpha=cfg.mixup_alpha, cutmix_alpha=cfg.cutmix_alpha, prob=cfg.prob,
                 switch_prob=cfg.switch_prob, label_smoothing=label_smoothing, num_classes=num_classes,
                 correct_lam=True)


def mix(mixup: Mixup | None, imgs: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, target): mixed images with soft targets [B, K], or the batch unchanged with its labels [B]
    when mixing is off or the batch is odd (timm pairs sample i with sample B - 1 - i)."""
    if mixup is None or imgs.shape[0] % 2:
        return imgs, labels
    return mixup(imgs, labels)


def label_loss(logits: torch.Tensor, target: torch.Tensor, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy of logits [B, K] against class indices [B] or soft targets [B, K] (mixup / cutmix,
    which already carry the smoothing). Computed in fp32, whatever the logits' dtype (bf16 under DeepSpeed's bf16,
    where no autocast lifts the softmax to fp32)."""
    logits = logits.float()
    if target.dim() == 2:
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()
    return F.cross_entropy(logits, target, label_smoothing=label_smoothing)
