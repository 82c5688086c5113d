"""Models: ViT encoder, position embeddings, MAE. Independent of Lightning, data and tracking."""
from .._lazy import lazy_exports

_WHERE = {"MAE": ".mae", "MAEConfig": ".config", "DecoderConfig": ".config", "VIT_SIZES": ".config",
          "ViTConfig": ".config", "ViTEncoder": ".vit"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
