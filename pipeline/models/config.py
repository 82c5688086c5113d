"""The model configs: a ViT encoder's architecture and MAE's decoder and masking. Plain dataclasses with no
torch import, so a recipe is checked in a fraction of a second, before the training stack loads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

PosEmbedKind = Literal["learned", "sincos2d", "rope2d"]


def grid_of(image_size: tuple[int, int], patch_size: int) -> tuple[int, int]:
    h, w = image_size
    if h % patch_size or w % patch_size:
        raise ValueError(f"image size {h}x{w} is not a multiple of patch size {patch_size}")
    return h // patch_size, w // patch_size


# name -> (embed_dim, depth, num_heads), as in the ViT / DeiT papers.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
    "huge": (1280, 32, 16),
}


@dataclass
class ViTConfig:
    """The encoder's architecture."""

    size: str = "base"
    """One of tiny, small, base, large, huge; sets width, depth and heads unless given below."""
    image_size: tuple[int, int] = (224, 224)
    """Input height and width in pixels; each a multiple of ``patch_size``."""
    patch_size: int = 16
    """Side of the square patches, in pixels."""
    in_chans: int = 3
    pos_embed: PosEmbedKind = "sincos2d"
    """learned (1D table incl. CLS), sincos2d (fixed, MAE), or rope2d (rotary, in attention)."""
    layer_scale: float | None = None
    """Initial value of LayerScale (DeiT III / CaiT); None disables it."""
    drop_path: float = 0.0
    """Stochastic depth rate of the last block, rising linearly from 0."""
    embed_dim: int | None = None
    """Token width; None: the size's."""
    depth: int | None = None
    """Transformer blocks; None: the size's."""
    num_heads: int | None = None
    """Attention heads per block; None: the size's."""
    mlp_ratio: float = 4.0
    """MLP hidden width as a multiple of embed_dim."""
    qkv_bias: bool = True
    distill_token: bool = False
    """A second prefix token after CLS (DeiT's distillation token), with its own position row."""

    def __post_init__(self) -> None:
        if self.size not in VIT_SIZES:
            raise ValueError(f"size {self.size!r} is not one of {sorted(VIT_SIZES)}")
        dim, depth, heads = VIT_SIZES[self.size]
        self.embed_dim = self.embed_dim or dim
        self.depth = self.depth or depth
        self.num_heads = self.num_heads or heads
        self.image_size = tuple(self.image_size)
        grid_of(self.image_size, self.patch_size)  # validates divisibility
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")

    @property
    def grid(self) -> tuple[int, int]:
        return grid_of(self.image_size, self.patch_size)


@dataclass
class DecoderConfig:
    """MAE's light decoder; the paper's default is 8 blocks of width 512."""

    depth: int = 8
    """Transformer blocks of the decoder."""
    dim: int = 512
    """Decoder width (the encoder's tokens are projected to it)."""
    num_heads: int = 16
    mlp_ratio: float = 4.0


@dataclass
class MAEConfig:
    """The MAE model: encoder, decoder, masking and reconstruction target."""

    encoder: ViTConfig = field(default_factory=ViTConfig)
    decoder: DecoderConfig = field(default_factory=DecoderConfig)
    mask_ratio: float = 0.75
    """Fraction of the patches removed before the encoder (the paper's 75 %)."""
    norm_pix_loss: bool = True
    """Regress per-patch normalised pixels (mean 0, var 1 per patch), the paper's better target."""
    encoder_mask_tokens: bool = False
    """Ablation (SimMIM/BEiT style): the encoder processes all L tokens with mask tokens in place of the
    masked patches. Slower; kept to measure MAE's speed-up claim."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
