"""Model FLOPs of MAE, counted as the model runs them: the encoder on the visible tokens only, the
decoder on all tokens. Used for model FLOPs utilisation (MFU).

A multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax, GELU and the loss are a
few per cent and are left out, as in the PaLM / Megatron MFU convention). A training step costs three
forwards (the backward computes input and weight gradients, two products per forward product).
Activation checkpointing re-runs forwards, but MFU counts the model's FLOPs, not the re-computation.
"""
from __future__ import annotations

from .config import MAEConfig


def block_flops(tokens: int, dim: int, mlp_ratio: float) -> int:
    """Forward FLOPs of one pre-LN transformer block on ``tokens`` tokens of width ``dim``."""
    n, d, h = tokens, dim, int(dim * mlp_ratio)
    qkv = 2 * n * d * 3 * d
    scores = 2 * n * n * d  # Q K^T over all heads: [n, hd] x [hd, n] per head, heads * hd = d
    weighted = 2 * n * n * d  # softmax(QK^T) V
    proj = 2 * n * d * d
    mlp = 2 * n * d * h * 2  # fc1 and fc2
    return qkv + scores + weighted + proj + mlp


def mae_forward_flops(cfg: MAEConfig) -> dict[str, int]:
    """Forward FLOPs per image, by part, for the MAE built from ``cfg`` (visible-only encoder)."""
    enc, dec = cfg.encoder, cfg.decoder
    gh, gw = enc.grid
    L = gh * gw
    K = int(round((1.0 - cfg.mask_ratio) * L))  # as MAE.num_kept
    P = enc.patch_size ** 2 * enc.in_chans
    prefix = 1  # CLS
    n_enc = prefix + (L if cfg.encoder_mask_tokens else K)
    n_dec = prefix + L
    return {
        # The patch projection runs on every patch: masking happens after it (as in the reference MAE).
        "patch_embed": 2 * L * P * enc.embed_dim,
        "encoder_blocks": enc.depth * block_flops(n_enc, enc.embed_dim, enc.mlp_ratio),
        "decoder_embed": 2 * (prefix + K) * enc.embed_dim * dec.dim,
        "decoder_blocks": dec.depth * block_flops(n_dec, dec.dim, dec.mlp_ratio),
        "decoder_pred": 2 * n_dec * dec.dim * P,
    }


def mae_train_flops_per_image(cfg: MAEConfig) -> int:
    """Model FLOPs of one training step per image: forward + backward = 3 x forward."""
    return 3 * sum(mae_forward_flops(cfg).values())
