"""A classification head on a ViT encoder, as MAE fine-tunes it: global average pooling with a fresh
LayerNorm (``fc_norm``, the encoder's final norm removed), or the CLS token after the final norm."""
from __future__ import annotations

from typing import Literal

import torch
from timm.layers import DropPath
from torch import nn

from .vit import ViTEncoder, layer_id

Pool = Literal["avg", "cls"]


def set_drop_path(encoder: ViTEncoder, rate: float) -> None:
    """Stochastic depth on a built encoder: rate rising linearly to ``rate`` at the last block."""
    depth = len(encoder.blocks)
    for i, block in enumerate(encoder.blocks):
        r = rate * i / max(depth - 1, 1)
        block.drop_path1 = DropPath(r) if r > 0 else nn.Identity()
        block.drop_path2 = DropPath(r) if r > 0 else nn.Identity()


class ViTClassifier(nn.Module):
    """imgs [B, C, H, W] -> logits [B, num_classes]."""

    def __init__(self, encoder: ViTEncoder, num_classes: int, pool: Pool = "avg"):
        super().__init__()
        self.encoder, self.pool, self.num_classes = encoder, pool, num_classes
        dim = encoder.cfg.embed_dim
        if pool == "avg":
            # MAE's global-pool fine-tuning normalises the pooled feature instead of every token.
            encoder.norm = nn.Identity()
            self.fc_norm = nn.LayerNorm(dim, eps=1e-6)
        else:
            self.fc_norm = nn.Identity()
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # near-zero start: the encoder leads at first
        nn.init.zeros_(self.head.bias)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        tokens = self.encoder(imgs)  # [B, prefix + L, D]
        if self.pool == "avg":
            return self.fc_norm(tokens[:, self.encoder.num_prefix_tokens:].mean(dim=1))
        return tokens[:, 0]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(imgs))

    def layer_id(self, name: str) -> int:
        return layer_id(name, len(self.encoder.blocks))
