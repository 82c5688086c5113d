"""DeiT's distilled ViT: CLS and distillation tokens, a classification head on each.

The CLS head learns from the labels, the distillation head from the teacher; at inference the two heads'
predictions are averaged (DeiT's choice), or either is used alone (``head``).
"""
from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .vit import ViTEncoder, layer_id

Head = Literal["both", "cls", "dist"]


class DistilledViT(nn.Module):
    """imgs [B, C, H, W] -> logits [B, num_classes] (``forward``), or both heads' logits (``both_logits``)."""

    def __init__(self, encoder: ViTEncoder, num_classes: int, head: Head = "both"):
        super().__init__()
        if encoder.num_prefix_tokens != 2:
            raise ValueError("a distilled ViT needs an encoder built with distill_token: true")
        self.encoder, self.num_classes, self.head_mode = encoder, num_classes, head
        dim = encoder.cfg.embed_dim
        # timm's names (VisionTransformerDistilled): head on CLS, head_dist on the distillation token
        self.head = nn.Linear(dim, num_classes)
        self.head_dist = nn.Linear(dim, num_classes)
        for h in (self.head, self.head_dist):
            nn.init.trunc_normal_(h.weight, std=0.02)
            nn.init.zeros_(h.bias)

    def both_logits(self, imgs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = self.encoder(imgs)  # [B, 2 + L, D]: CLS, DIST, patches (after the final norm)
        return self.head(tokens[:, 0]), self.head_dist(tokens[:, 1])

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.combine(*self.both_logits(imgs))

    def combine(self, cls: torch.Tensor, dist: torch.Tensor) -> torch.Tensor:
        """Both heads' logits [B, K] -> the prediction ``head`` names [B, K]."""
        if self.head_mode == "cls":
            return cls
        if self.head_mode == "dist":
            return dist
        return (cls + dist) / 2  # averaged logits, as DeiT evaluates

    def layer_id(self, name: str) -> int:
        return layer_id(name, len(self.encoder.blocks))
