"""Model FLOPs per image, counted as the models run them, for model FLOPs utilisation (MFU): MAE (the
encoder on the visible tokens only, the decoder on all tokens), ViT classifiers (fine-tuned, DeiT students),
and any other network measured once with ``torch.utils.flop_counter``.

A multiply-add is 2 FLOPs; only matrix products are counted (norms, softmax, GELU and the loss are a
few per cent and are left out, as in the PaLM / Megatron MFU convention). A training step costs three
forwards (the backward computes input and weight gradients, two products per forward product).
Activation checkpointing re-runs forwards, but MFU counts the model's FLOPs, not the re-computation.
"""
from __future__ import annotations

from .config import MAEConfig, ViTConfig


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


def vit_forward_flops(cfg: ViTConfig, num_classes: int = 0, heads: int = 1) -> dict[str, int]:
    """Forward FLOPs per image of a ViT classifier on all its tokens: the encoder (CLS, and the distillation
    token when ``cfg.distill_token``) and ``heads`` linear heads of ``num_classes`` on pooled features
    (a fine-tuned classifier has one, a DeiT student two)."""
    gh, gw = cfg.grid
    L = gh * gw
    P = cfg.patch_size ** 2 * cfg.in_chans
    n = (2 if cfg.distill_token else 1) + L
    return {"patch_embed": 2 * L * P * cfg.embed_dim,
            "encoder_blocks": cfg.depth * block_flops(n, cfg.embed_dim, cfg.mlp_ratio),
            "heads": heads * 2 * cfg.embed_dim * num_classes}


def measured_train_flops_per_image(model, input_shape: tuple[int, ...]) -> int:
    """3 x the matrix-product FLOPs ``torch.utils.flop_counter`` counts in one forward of one input of
    ``input_shape`` (C, H, W): for networks without a formula here (timm CNNs). Runs in eval mode, no grad."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    param = next(model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, *input_shape, device=param.device, dtype=param.dtype))
    model.train(was_training)
    return 3 * int(counter.get_total_flops())
