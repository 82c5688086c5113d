"""The MLflow model registry: register exports with lineage tags, resolve ``models:/`` URIs, load encoders."""
from .lineage import code_version
from .models import ModelError, ModelRef, load_model_encoder, register_export, resolve_model, tag_version

__all__ = ["ModelError", "ModelRef", "code_version", "load_model_encoder", "register_export", "resolve_model",
           "tag_version"]
