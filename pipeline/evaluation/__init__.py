"""Evaluation protocols on precomputed frozen features: weighted kNN and MAE-style linear probing.

Pure functions of feature tensors; extracting the features from an encoder lives elsewhere.
"""
from .._lazy import lazy_exports

_WHERE = {"KNNConfig": ".config", "knn_predict": ".knn", "knn_accuracy": ".knn", "LinearProbeConfig": ".config",
          "ProbeResult": ".linear_probe", "train_linear_probe": ".linear_probe", "EvalConfig": ".config"}
__getattr__ = lazy_exports(__name__, _WHERE)
__all__ = sorted(_WHERE)
