"""Attention probabilities of a ViT encoder, computed explicitly, and the classic analyses of them.

Training runs fused SDPA, which never materialises the probabilities; ``encoder_attention`` runs the same
blocks with the same weights through ``softmax(q k^T / sqrt(d)) v`` instead and returns every layer's
probabilities beside the block outputs (a test shows the outputs equal the fused path's).

- ``mean_attention_distance``: per head, the attention-weighted mean distance in pixels from each patch query's
  centre to every patch key's centre, prefix tokens left out and weights renormalised over patches, averaged
  over queries and images (the ViT paper, Fig. 11 / App. D.7).
- ``attention_rollout``: mean over heads, 0.5 A + 0.5 I (the residual), rows renormalised, multiplied over the
  layers (Abnar & Zuidema, 2020).
"""
from __future__ import annotations

import torch

from ..models.vit import ViTEncoder, attention_heads, attention_output


@torch.no_grad()
def encoder_attention(encoder: ViTEncoder, imgs: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """imgs [B, C, H, W] -> (each block's output [B, T, D], each block's attention [B, heads, T, T]), with
    T = prefix tokens + patches."""
    x, rope = encoder.with_prefix(encoder.embed_patches(imgs))
    outputs, probs = [], []
    for block in encoder.blocks:
        attn = block.attn
        q, k, v = attention_heads(attn, block.norm1(x), rope, encoder.num_prefix_tokens)
        p = ((q * attn.scale) @ k.transpose(-2, -1)).softmax(dim=-1)  # [B, H, T, T]
        x = x + block.drop_path1(block.ls1(attention_output(attn, p @ v)))
        x = x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))
        outputs.append(x)
        probs.append(p)
    return outputs, probs


def patch_centres(grid: tuple[int, int], patch: int) -> torch.Tensor:
    """[gh * gw, 2] pixel coordinates (row, column) of each patch's centre, in token order (row-major)."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    return (torch.stack([rows.flatten(), cols.flatten()], dim=1).double() + 0.5) * patch


def mean_attention_distance(probs: torch.Tensor, grid: tuple[int, int], patch: int, prefix: int) -> torch.Tensor:
    """probs [B, H, T, T] of one layer -> [H] mean attention distance in pixels, summed over the batch (divide
    by the number of images for the mean): each patch query's patch-key weights are renormalised to 1."""
    a = probs[:, :, prefix:, prefix:].double()  # [B, H, L, L]: patch queries to patch keys
    a = a / a.sum(dim=-1, keepdim=True)
    centres = patch_centres(grid, patch).to(a.device)
    dist = torch.cdist(centres, centres)  # [L, L] pixels
    return (a * dist).sum(dim=-1).mean(dim=2).sum(dim=0)  # [H]


def attention_rollout(probs: list[torch.Tensor]) -> torch.Tensor:
    """Each layer's [B, H, T, T] -> [B, T, T]: how much each token's final representation draws on each input
    token, through the attention and the residual paths of every layer."""
    eye = torch.eye(probs[0].shape[-1], dtype=torch.float64, device=probs[0].device)
    out = eye.expand(probs[0].shape[0], -1, -1)
    for p in probs:
        a = 0.5 * p.double().mean(dim=1) + 0.5 * eye  # [B, T, T]
        out = (a / a.sum(dim=-1, keepdim=True)) @ out
    return out


def cls_maps(probs_last: torch.Tensor, rollout: torch.Tensor, grid: tuple[int, int], prefix: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """(the last layer's CLS -> patch attention per head [B, H, gh, gw], the rollout's CLS row over the
    patches [B, gh, gw]), each map scaled to [0, 1] for display."""
    heads = probs_last[:, :, 0, prefix:].reshape(*probs_last.shape[:2], *grid).double()
    rolled = rollout[:, 0, prefix:].reshape(rollout.shape[0], *grid)
    return _unit(heads), _unit(rolled)


def _unit(maps: torch.Tensor) -> torch.Tensor:
    flat = maps.flatten(-2)
    lo, hi = flat.min(dim=-1, keepdim=True).values, flat.max(dim=-1, keepdim=True).values
    return ((flat - lo) / (hi - lo).clamp_min(1e-12)).reshape(maps.shape)
