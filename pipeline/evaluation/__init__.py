"""Evaluation protocols on precomputed frozen features: weighted kNN and MAE-style linear probing.

Pure functions of feature tensors; extracting the features from an encoder lives elsewhere.
"""
from .knn import KNNConfig, knn_accuracy, knn_predict
from .linear_probe import LinearProbeConfig, ProbeResult, train_linear_probe

__all__ = [
    "KNNConfig", "knn_predict", "knn_accuracy",
    "LinearProbeConfig", "ProbeResult", "train_linear_probe",
]
