"""The MLflow model registry: register exports with lineage tags, resolve ``models:/`` URIs, load encoders."""
from .._lazy import lazy_exports

_WHERE = {"ModelError": ".models", "ModelRef": ".models", "code_version": ".lineage",
          "load_model_encoder": ".models", "register_export": ".models", "resolve_model": ".models",
          "tag_version": ".models"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
