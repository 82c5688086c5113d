"""Linear probing on cached frozen features, after the MAE paper's protocol (He et al. 2021, appendix).

The head is MAE's: a BatchNorm without affine parameters, then one linear layer. The BN only
re-standardises the features (MAE features have large, uneven scales across channels); with no affine
it adds no capacity, and at eval time it folds into the linear layer, so the classifier stays linear.

Why SGD on cached features instead of the paper's LARS on augmented images: LARS is a large-batch
optimiser and MAE probes with batch 16,384; at batch 256 plain momentum SGD (the DINO / MoCo linear
evaluation recipe) fits a linear head on fixed features as well. Features are extracted once, without
RandomResizedCrop, so a probe runs in seconds on CPU; expect numbers close to, not equal to, the paper's.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..console import Progress
from .config import LinearProbeConfig


@dataclass
class ProbeResult:
    top1: float
    """Held-out top-1 accuracy in [0, 1]."""
    train_top1: float
    """Top-1 on the training features, with the head in eval mode (BN running statistics)."""
    head: nn.Sequential
    """The trained head, in eval mode: BatchNorm1d(affine=False) -> Linear."""
    epochs: int


def build_head(dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    """MAE's probe head; Linear weight ~ trunc_normal(std 0.01), bias 0."""
    linear = nn.utils.skip_init(nn.Linear, dim, num_classes)  # no draw from the global RNG
    nn.init.trunc_normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False, eps=1e-6), linear)


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Linear warm-up over ``warmup`` steps, then half-cycle cosine from ``peak`` to 0 at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1.0 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@torch.no_grad()
def accuracy(head: nn.Module, feats: torch.Tensor, labels: torch.Tensor, batch: int = 4096) -> float:
    """Top-1 in [0, 1] of ``head`` (put in eval mode) on feats [N, D]."""
    head.eval()
    correct = sum((head(feats[i:i + batch]).argmax(1) == labels[i:i + batch]).sum().item()
                  for i in range(0, feats.shape[0], batch))
    return correct / max(1, feats.shape[0])


def train_linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    val_feats: torch.Tensor,
    val_labels: torch.Tensor,
    num_classes: int,
    cfg: LinearProbeConfig | None = None,
    seed: int = 0,
) -> ProbeResult:
    """Train the MAE probe head on train_feats [N, D] / train_labels [N]; report top-1 on the val split.

    Runs on CPU in float32. Deterministic for a given ``seed``: the init and the per-epoch shuffles
    draw from a private ``torch.Generator``, never the global RNG.
    """
    cfg = cfg or LinearProbeConfig()
    x = train_feats.detach().to("cpu", torch.float32)  # [N, D]
    y = train_labels.detach().to("cpu", torch.long)  # [N]
    n, dim = x.shape
    if n < 2 or y.shape != (n,):
        raise ValueError(f"need >= 2 training features with one label each, got {tuple(x.shape)}, "
                         f"{tuple(y.shape)}")
    gen = torch.Generator().manual_seed(seed)
    head = build_head(dim, num_classes, gen)
    batch = min(cfg.batch_size, n)  # >= 2, so BatchNorm can estimate a variance
    steps_per_epoch = n // batch
    total = cfg.epochs * steps_per_epoch
    peak = cfg.base_lr * batch / 256
    opt = torch.optim.SGD(head.parameters(), lr=peak, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    head.train()
    progress = Progress(f"linear probe on {n:,} x {dim} features", cfg.epochs, "epochs")
    for epoch in progress.wrap(range(cfg.epochs)):
        perm = torch.randperm(n, generator=gen)[:steps_per_epoch * batch].view(steps_per_epoch, batch)
        for b, ids in enumerate(perm):  # ids: [B]
            step = epoch * steps_per_epoch + b
            opt.param_groups[0]["lr"] = lr_at(step, total, cfg.warmup_epochs * steps_per_epoch, peak)
            loss = F.cross_entropy(head(x[ids]), y[ids])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    val_x = val_feats.detach().to("cpu", torch.float32)
    val_y = val_labels.detach().to("cpu", torch.long)
    return ProbeResult(top1=accuracy(head, val_x, val_y), train_top1=accuracy(head, x, y),
                       head=head.eval(), epochs=cfg.epochs)
