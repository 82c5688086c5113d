"""A straightforward MAE, written from the paper's description (He et al., 2022, Sec. 3) on timm ``Block``s:
the yardstick ``mae_step.py`` holds vitpipe's model against. Nothing here is tuned for speed.

Patchify with a conv, add fixed 2D sin-cos positions, keep a random 25 % of the patches (argsort of uniform
noise), prepend CLS, run the encoder blocks and a final norm; project to the decoder width, append mask
tokens, unshuffle, add decoder positions, run the decoder blocks, predict the pixels of every patch, and take
the mean squared error over the masked patches against per-patch normalised pixels.
"""
from __future__ import annotations

import numpy as np
import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import Block
from torch import nn


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """[grid * grid, dim] fixed positions: half the channels encode the row, half the column."""
    def one_axis(d: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # [M, d/2]
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    rows, cols = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    table = np.concatenate([one_axis(dim // 2, rows), one_axis(dim // 2, cols)], axis=1)
    return torch.from_numpy(table).float()


class ReferenceMAE(nn.Module):
    def __init__(self, image: int = 224, patch: int = 16, dim: int = 768, depth: int = 12, heads: int = 12,
                 dec_dim: int = 512, dec_depth: int = 8, dec_heads: int = 16, mask_ratio: float = 0.75):
        super().__init__()
        self.patch, self.mask_ratio = patch, mask_ratio
        self.patch_embed = PatchEmbed(image, patch, 3, dim)
        grid = image // patch
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", torch.cat([torch.zeros(1, dim), sincos_2d(dim, grid)])[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_embed = nn.Linear(dim, dec_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec_dim))
        self.register_buffer("dec_pos", torch.cat([torch.zeros(1, dec_dim), sincos_2d(dec_dim, grid)])[None],
                             persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dec_dim, dec_heads, mlp_ratio=4.0, qkv_bias=True)
                                            for _ in range(dec_depth))
        self.decoder_norm = nn.LayerNorm(dec_dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec_dim, patch * patch * 3)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs) + self.pos[:, 1:]  # [B, L, D]
        B, L, D = x.shape
        keep = int(L * (1 - self.mask_ratio))
        shuffle = torch.argsort(torch.rand(B, L, device=x.device), dim=1)
        restore = torch.argsort(shuffle, dim=1)
        x = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, D))  # [B, K, D]
        x = torch.cat([(self.cls_token + self.pos[:, :1]).expand(B, -1, -1), x], dim=1)
        for block in self.blocks:
            x = block(x)
        x = self.decoder_embed(self.norm(x))  # [B, 1 + K, Dd]
        filler = self.mask_token.expand(B, L - keep, -1)
        y = torch.gather(torch.cat([x[:, 1:], filler], dim=1), 1, restore[..., None].expand(-1, -1, x.shape[-1]))
        x = torch.cat([x[:, :1], y], dim=1) + self.dec_pos
        for block in self.decoder_blocks:
            x = block(x)
        pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]  # [B, L, p*p*3]
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, restore)
        p, g = self.patch, imgs.shape[-1] // self.patch
        target = imgs.reshape(B, 3, g, p, g, p).permute(0, 2, 4, 3, 5, 1).reshape(B, L, p * p * 3)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The paper's AdamW groups: no decay on biases, norms and tokens."""
        decay = [p for n, p in self.named_parameters() if p.ndim > 1 and "token" not in n]
        rest = [p for n, p in self.named_parameters() if not (p.ndim > 1 and "token" not in n)]
        return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]
