"""Models: ViT encoder, position embeddings, MAE. Independent of Lightning, data and tracking."""
from .mae import MAE, DecoderConfig, MAEConfig
from .vit import VIT_SIZES, ViTConfig, ViTEncoder

__all__ = ["MAE", "MAEConfig", "DecoderConfig", "VIT_SIZES", "ViTConfig", "ViTEncoder"]
