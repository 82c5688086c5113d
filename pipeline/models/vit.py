"""ViT encoder on timm layers: patch embedding, CLS token, pre-LN blocks, optional layer scale.

The encoder can run on a subset of patches (``ids_keep``), which is what MAE's encoder needs; with
``ids_keep=None`` it is a plain ViT. Its parameter names and shapes follow timm's VisionTransformer
(``patch_embed.proj``, ``cls_token``, ``blocks.N.attn.qkv``, ``norm``), so timm state dicts map across.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import PatchEmbed
from timm.layers.attention import Attention
from timm.models.vision_transformer import Block
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import ViTConfig
from .pos_embed import PosEmbed, apply_rope


def attention_heads(attn: Attention, x: torch.Tensor, rope: torch.Tensor | None = None,
                    num_prefix_tokens: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [B, N, D] -> q, k, v [B, H, N, hd] of timm's Attention ``attn`` (q/k norms applied; with ``rope``, the
    patch tokens' q and k rotated). What the fused training path and the inspection's explicit one share."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)  # each [B, H, N, hd]
    q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        p = num_prefix_tokens  # prefix tokens (CLS, ...) carry no position and are not rotated
        q = torch.cat([q[:, :, :p], apply_rope(q[:, :, p:], rope)], dim=2)
        k = torch.cat([k[:, :, :p], apply_rope(k[:, :, p:], rope)], dim=2)
    return q, k, v


def attention_output(attn: Attention, heads_out: torch.Tensor) -> torch.Tensor:
    """[B, H, N, hd] per-head outputs -> [B, N, D]: heads concatenated, normed (timm's optional norm) and
    projected."""
    B, _, N, _ = heads_out.shape
    x = attn.norm(heads_out.transpose(1, 2).reshape(B, N, attn.attn_dim))
    return attn.proj_drop(attn.proj(x))


class RopeAttention(Attention):
    """timm's Attention (same parameters) with 2D rotary embedding applied to the patch tokens."""

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                rope: torch.Tensor | None = None, num_prefix_tokens: int = 1) -> torch.Tensor:
        if rope is None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        q, k, v = attention_heads(self, x, rope, num_prefix_tokens)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask,
                                             dropout_p=self.attn_drop.p if self.training else 0.0)
        return attention_output(self, out)


class ViTBlock(Block):
    """timm's pre-LN Block (same parameters and names) whose forward also takes the RoPE tables, so one call
    runs a block whatever the position embedding: what regional compilation (``compile_blocks``) and
    activation checkpointing wrap."""

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None, num_prefix_tokens: int = 1,
                attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        if rope is None:
            return super().forward(x, attn_mask=attn_mask)
        attn = self.attn(self.norm1(x), attn_mask=attn_mask, rope=rope, num_prefix_tokens=num_prefix_tokens)
        x = x + self.drop_path1(self.ls1(attn))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))


def make_blocks(dim: int, depth: int, heads: int, mlp_ratio: float, qkv_bias: bool,
                layer_scale: float | None = None, drop_path: float = 0.0, rope: bool = False) -> nn.ModuleList:
    """A stack of timm pre-LN transformer blocks with a linear stochastic-depth ramp."""
    rates = [drop_path * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(
        ViTBlock(dim, heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=layer_scale, drop_path=r,
                 attn_layer=RopeAttention if rope else Attention)
        for r in rates
    )


def run_blocks(blocks: nn.ModuleList, x: torch.Tensor, rope: torch.Tensor | None, num_prefix_tokens: int,
               checkpoint_every: int = 0) -> torch.Tensor:
    """Run a block stack. With ``checkpoint_every`` k > 0, blocks 0, k, 2k, ... keep only their input for the
    backward and recompute their activations there (k = 1: every block, activation memory about one block's
    for one extra forward; larger k: selective, trading memory back for less recomputation)."""
    k = int(checkpoint_every)
    for i, block in enumerate(blocks):
        if k and i % k == 0 and torch.is_grad_enabled():
            x = checkpoint(block, x, rope, num_prefix_tokens, use_reentrant=False)
        else:
            x = block(x, rope, num_prefix_tokens)
    return x


def init_weights_mae(module: nn.Module) -> None:
    """MAE initialisation: xavier-uniform Linear (and patch projection), zero bias, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, PatchEmbed):
            # Treat the conv as a Linear on flattened patches: xavier over [D, C*p*p].
            w = m.proj.weight.data
            nn.init.xavier_uniform_(w.view(w.shape[0], -1))


def layer_id(name: str, depth: int) -> int:
    """Depth index of a parameter of a model holding the encoder as ``encoder``, for layer-wise lr decay: 0 for
    the embeddings and prefix tokens, i + 1 for block i, depth + 1 for the rest (final norm, heads)."""
    if name.startswith(("encoder.patch_embed", "encoder.cls_token", "encoder.dist_token", "encoder.pos_embed")):
        return 0
    if name.startswith("encoder.blocks."):
        return int(name.split(".")[2]) + 1
    return depth + 1


class ViTEncoder(nn.Module):
    """Patch embed -> (+pos) -> [CLS | DIST? | patches] -> pre-LN blocks -> LayerNorm. Tokens: [B, P + N, D]
    with P = num_prefix_tokens (1, or 2 with DeiT's distillation token)."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.embed_dim
        self.num_prefix_tokens = 2 if cfg.distill_token else 1
        self.patch_embed = PatchEmbed(img_size=cfg.image_size, patch_size=cfg.patch_size, in_chans=cfg.in_chans,
                                      embed_dim=D)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, D))
        # timm's name for it (VisionTransformerDistilled), so DeiT weights map across
        self.dist_token = nn.Parameter(torch.zeros(1, 1, D)) if cfg.distill_token else None
        self.pos_embed = PosEmbed(cfg.pos_embed, D, cfg.grid, self.num_prefix_tokens, cfg.num_heads)
        self.blocks = make_blocks(D, cfg.depth, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias, cfg.layer_scale,
                                  cfg.drop_path, rope=cfg.pos_embed == "rope2d")
        self.norm = nn.LayerNorm(D, eps=1e-6)
        init_weights_mae(self)
        nn.init.normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.normal_(self.dist_token, std=0.02)
        self.grad_checkpointing: int = 0
        # Recompute every k-th block's activations in the backward (run_blocks): a training option, not saved.

    @property
    def num_patches(self) -> int:
        return self.patch_embed.num_patches

    def embed_patches(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> patch tokens with absolute position added [B, L, D]."""
        return self.pos_embed.add_to_patches(self.patch_embed(imgs))

    def with_prefix(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: [B, N, D] patch tokens (the kept ones, in ``ids_keep`` order) -> (the first block's input
        [B, P + N, D], the RoPE tables or None)."""
        B = x.shape[0]
        prefix = self.cls_token if self.dist_token is None else torch.cat([self.cls_token, self.dist_token], 1)
        prefix_pos = self.pos_embed.prefix()  # [1, P, D]: one row per prefix token (None for RoPE)
        if prefix_pos is not None:
            prefix = prefix + prefix_pos.to(prefix.dtype)
        return torch.cat([prefix.expand(B, -1, -1), x], dim=1), self.pos_embed.rope(ids_keep, B, x.device)

    def forward_tokens(self, x: torch.Tensor, ids_keep: torch.Tensor | None = None) -> torch.Tensor:
        """x: [B, N, D] patch tokens (the kept ones, in ``ids_keep`` order) -> [B, P + N, D] features."""
        x, rope = self.with_prefix(x, ids_keep)
        x = run_blocks(self.blocks, x, rope, self.num_prefix_tokens, self.grad_checkpointing)
        return self.norm(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> features of all tokens [B, P + L, D]."""
        return self.forward_tokens(self.embed_patches(imgs))

    def meta(self) -> dict[str, Any]:
        """What a loader needs to rebuild this encoder and place its positions."""
        return {"arch": "vit", "size": self.cfg.size, "embed_dim": self.cfg.embed_dim, "depth": self.cfg.depth,
                "num_heads": self.cfg.num_heads, "patch_size": self.cfg.patch_size,
                "image_size": list(self.cfg.image_size), "in_chans": self.cfg.in_chans,
                "pos_embed": self.pos_embed.meta(), "layer_scale": self.cfg.layer_scale,
                "mlp_ratio": self.cfg.mlp_ratio, "qkv_bias": self.cfg.qkv_bias,
                "distill_token": self.cfg.distill_token,
                # False when a global-pool head took the final norm's place (MAE fine-tuning)
                "final_norm": not isinstance(self.norm, nn.Identity)}
