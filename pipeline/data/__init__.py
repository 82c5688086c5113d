"""Shards, manifests and the resumable streaming loader. Knows nothing of models."""
from .manifest import Manifest, ManifestError, load_manifest
from .stream import ShardStream, StreamConfig, StreamLoader
from .transforms import TransformConfig

__all__ = ["Manifest", "ManifestError", "load_manifest", "ShardStream", "StreamConfig", "StreamLoader",
           "TransformConfig"]
