"""Masked autoencoder (He et al., 2021): the encoder sees only visible patches, a light decoder
reconstructs the pixels of the masked ones, and the loss is taken on masked patches only.

Methods follow the paper's steps: ``random_masking`` -> ``forward_encoder`` -> ``forward_decoder`` ->
``forward_loss``. Shapes: B batch, L patches per image, K = round((1 - mask_ratio) * L) kept patches,
D encoder width, Dd decoder width, P = patch_size**2 * C pixel values per patch.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import MAEConfig
from .pos_embed import PosEmbed
from .vit import ViTEncoder, init_weights_mae, make_blocks, run_blocks


class MAE(nn.Module):
    def __init__(self, cfg: MAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ViTEncoder(cfg.encoder)
        enc, dec = cfg.encoder, cfg.decoder
        self.patch_size, self.in_chans = enc.patch_size, enc.in_chans
        # Decoder: project encoder width to decoder width; mask tokens fill the masked positions.
        self.decoder_embed = nn.Linear(enc.embed_dim, dec.dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec.dim))
        self.decoder_pos_embed = PosEmbed("sincos2d", dec.dim, enc.grid, 1, dec.num_heads)
        self.decoder_blocks = make_blocks(dec.dim, dec.depth, dec.num_heads, dec.mlp_ratio, qkv_bias=True)
        self.decoder_norm = nn.LayerNorm(dec.dim, eps=1e-6)
        self.decoder_pred = nn.Linear(dec.dim, enc.patch_size ** 2 * enc.in_chans)
        if cfg.encoder_mask_tokens:
            self.encoder_mask_token = nn.Parameter(torch.zeros(1, 1, enc.embed_dim))
            nn.init.normal_(self.encoder_mask_token, std=0.02)
        for module in (self.decoder_embed, self.decoder_blocks, self.decoder_norm, self.decoder_pred):
            init_weights_mae(module)
        nn.init.normal_(self.mask_token, std=0.02)

    # -- pixels <-> patches -------------------------------------------------------------------------
    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs [B, C, H, W] -> patches [B, L, p*p*C] (row-major patches, pixels in (p, p, C) order)."""
        p, (gh, gw) = self.patch_size, self.encoder.cfg.grid
        B, C = imgs.shape[:2]
        x = imgs.reshape(B, C, gh, p, gw, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(B, gh * gw, p * p * C)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """patches [B, L, p*p*C] -> imgs [B, C, H, W]."""
        p, (gh, gw), C = self.patch_size, self.encoder.cfg.grid, self.in_chans
        B = x.shape[0]
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(B, gh, gw, p, p, C))
        return x.reshape(B, C, gh * p, gw * p)

    # -- the method ----------------------------------------------------------------------------------
    def num_kept(self, L: int) -> int:
        return int(round((1.0 - self.cfg.mask_ratio) * L))

    def random_masking(self, x: torch.Tensor, noise: torch.Tensor):
        """Per-sample random masking by sorting noise.

        x: [B, L, D], noise: [B, L] uniform. Returns x_kept [B, K, D], mask [B, L] (1 = masked, 0 = kept,
        in the original patch order), ids_restore [B, L] (undoes the shuffle) and ids_keep [B, K].
        """
        B, L, D = x.shape
        K = self.num_kept(L)
        ids_shuffle = torch.argsort(noise, dim=1)  # ascending: the K smallest noises are kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :K]
        x_kept = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :K] = 0
        mask = torch.gather(mask, 1, ids_restore)
        return x_kept, mask, ids_restore, ids_keep

    def forward_encoder(self, imgs: torch.Tensor, noise: torch.Tensor):
        """imgs [B, C, H, W] -> latent [B, 1 + K, D] (or [B, 1 + L, D] with encoder mask tokens)."""
        x = self.encoder.embed_patches(imgs)  # [B, L, D], positions already added
        x_kept, mask, ids_restore, ids_keep = self.random_masking(x, noise)
        if not self.cfg.encoder_mask_tokens:
            return self.encoder.forward_tokens(x_kept, ids_keep), mask, ids_restore
        # Ablation: every position goes through the encoder; masked ones as a learned token (+ position).
        tokens = self.encoder.pos_embed.add_to_patches(self.encoder_mask_token.expand_as(x).to(x.dtype))
        x_full = torch.where(mask.unsqueeze(-1).bool(), tokens, x)
        latent = self.encoder.forward_tokens(x_full)
        # Hand the decoder only the kept tokens, so both variants decode the same way.
        kept = torch.gather(latent[:, 1:], 1, ids_keep.unsqueeze(-1).expand(-1, -1, latent.shape[-1]))
        return torch.cat([latent[:, :1], kept], dim=1), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent [B, 1 + K, D] -> predicted pixels of every patch [B, L, P]."""
        x = self.decoder_embed(latent)  # [B, 1 + K, Dd]
        B, n, Dd = x.shape
        L = ids_restore.shape[1]
        mask_tokens = self.mask_token.expand(B, L + 1 - n, -1).to(x.dtype)
        x_ = torch.cat([x[:, 1:], mask_tokens], dim=1)  # [B, L, Dd] in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, Dd))  # back to patch order
        x = torch.cat([x[:, :1], x_], dim=1)
        x = x + self.decoder_pos_embed.table.to(x.dtype)
        x = run_blocks(self.decoder_blocks, x, None, 1, self.encoder.grad_checkpointing)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:]  # drop CLS

    def target(self, imgs: torch.Tensor) -> torch.Tensor:
        """Reconstruction target [B, L, P]: pixels, normalised per patch when ``norm_pix_loss``."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        return target

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean squared error per patch, averaged over the masked patches only."""
        # [B, L], in fp32 also when the weights (and so pred and imgs) are bf16
        loss = ((pred.float() - self.target(imgs.float())) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(self, imgs: torch.Tensor, noise: torch.Tensor | None = None):
        """imgs [B, C, H, W] -> (loss, pred [B, L, P], mask [B, L]). ``noise`` [B, L] fixes the masking."""
        if noise is None:
            noise = torch.rand(imgs.shape[0], self.encoder.num_patches, device=imgs.device)
        latent, mask, ids_restore = self.forward_encoder(imgs, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask

    def reconstruct(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(masked input, reconstruction with visible patches pasted in), both [B, C, H, W], in input space."""
        target = self.patchify(imgs)
        if self.cfg.norm_pix_loss:  # undo the per-patch normalisation with the true patch statistics
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1.0e-6) ** 0.5 + mean
        m = mask.unsqueeze(-1)
        masked = self.unpatchify(target * (1 - m))
        recon = self.unpatchify(pred * m + target * (1 - m))
        return masked, recon
