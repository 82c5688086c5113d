"""AdamW with MAE's parameter groups and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class OptimConfig:
    """Optimizer and schedule. The learning rate scales with the effective (global) batch."""

    base_lr: float = 1.5e-4
    """lr = base_lr * effective_batch / 256 (the MAE paper's linear scaling rule)."""
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 40.0
    warmup_steps: int | None = None
    """Overrides warmup_epochs when set."""
    min_lr: float = 0.0
    grad_clip: float | None = None
    """Clip the global gradient norm to this value; None disables clipping."""


# Parameters that get no weight decay besides norms and biases (found by name).
NO_DECAY_NAMES = ("cls_token", "dist_token", "mask_token", "pos_embed", "encoder_mask_token")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and norms / biases / tokens / position embeddings without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim <= 1 or any(n in name for n in NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def absolute_lr(cfg: OptimConfig, effective_batch: int) -> float:
    return cfg.base_lr * effective_batch / 256


def warmup_cosine(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then half-cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_optimizer(model: nn.Module, cfg: OptimConfig, effective_batch: int, total_steps: int,
                    warmup_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    peak = absolute_lr(cfg, effective_batch)
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=peak, betas=cfg.betas)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warmup_steps, total_steps, peak, cfg.min_lr) / peak)
    return opt, sched
