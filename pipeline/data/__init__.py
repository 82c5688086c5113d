"""Shards, manifests and the resumable streaming loader. Knows nothing of models. Its configs live in
``data.config``, which imports no torch."""
from .._lazy import lazy_exports

_WHERE = {"Manifest": ".manifest", "ManifestError": ".manifest", "load_manifest": ".manifest",
          "ShardStream": ".stream", "StreamConfig": ".config", "StreamLoader": ".stream",
          "TransformConfig": ".config"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
