"""The evaluation configs: weighted kNN, the linear probe, and which splits an evaluation reads. Plain
dataclasses with no torch import (the CLI builds them before anything heavy loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class KNNConfig:
    """The weighted kNN classifier; DINO's defaults (k = 20, T = 0.07)."""

    k: int = 20
    """Neighbours per test feature; clipped to the number of training features."""
    temperature: float = 0.07
    """T in the vote weight exp(sim / T); smaller T lets the nearest neighbours dominate."""
    chunk_rows: int | None = None
    """Test rows per similarity block; None sizes blocks to ``CHUNK_ELEMS`` to bound memory."""

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.chunk_rows is not None and self.chunk_rows < 1:
            raise ValueError(f"chunk_rows must be >= 1 or None, got {self.chunk_rows}")


@dataclass
class LinearProbeConfig:
    """Optimisation of the linear head; defaults train to convergence on ~1e4 cached features in seconds."""

    epochs: int = 100
    """Passes over the cached training features (MAE: 90 on ImageNet; cheap here, so a few more)."""
    batch_size: int = 256
    """Features per step; the incomplete last batch of an epoch is dropped, as in MAE's loader."""
    base_lr: float = 0.1
    """MAE's linear-probe base lr; the actual lr is ``base_lr * batch / 256`` (linear scaling rule)."""
    momentum: float = 0.9
    weight_decay: float = 0.0
    """MAE uses none: a linear head on a fixed representation has little capacity to overfit."""
    warmup_epochs: int = 5
    """Linear warm-up from 0, then a half-cycle cosine to 0, updated every step."""

    def __post_init__(self) -> None:
        if self.epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {self.epochs}")
        if self.batch_size < 2:  # BatchNorm in train mode needs two rows to estimate a variance
            raise ValueError(f"batch_size must be >= 2, got {self.batch_size}")
        for name in ("base_lr", "momentum", "weight_decay", "warmup_epochs"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


Protocol = Literal["knn", "linear"]


@dataclass
class EvalConfig:
    """Which labelled splits, how much of them, and the protocols' settings."""

    train: str = ""
    """Labelled split the kNN memory bank and the linear probe are fit on (manifest URL or folder)."""
    val: str = ""
    """Held-out labelled split the accuracy is measured on."""
    protocols: list[Protocol] = field(default_factory=lambda: ["knn", "linear"])
    """kNN, linear probe, or both, on the same features."""
    max_train: int | None = None
    """Use the first this-many samples of ``train`` (None: all); the report says how many were used."""
    max_val: int | None = None
    """Use the first this-many samples of ``val`` (None: all)."""
    pool: Literal["cls", "mean"] = "cls"
    """Feature of an image: the CLS token (the MAE paper's linear-probe feature) or the mean of the patch tokens."""
    image_size: tuple[int, int] | None = None
    """Input size to evaluate at (positions resampled to its patch grid); None: the model's own."""
    crop_pct: float = 0.875
    """Resize the shorter side to image_size / crop_pct, then centre-crop (1.0: resize only)."""
    batch_size: int = 256
    """Images per forward pass of the encoder."""
    num_workers: int = 1
    """Loader processes reading the splits (each takes whole shards)."""
    knn: KNNConfig = field(default_factory=KNNConfig)
    linear: LinearProbeConfig = field(default_factory=LinearProbeConfig)
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.train or not self.val:
            raise ValueError("evaluation needs a labelled train split and a held-out val split")


@dataclass
class MonitorConfig:
    """kNN top-1 and RankMe of the encoder being trained, every N steps (``monitor/*`` in MLflow): whether
    pretraining is working, before the run ends. Off unless ``every_n_steps`` is set."""

    every_n_steps: int = 0
    """0: off. Each look costs a forward pass over ``max_train`` + ``max_val`` images on every rank."""
    train: str = ""
    """Labelled split of the kNN memory bank (default: the run's data.val split)."""
    val: str = ""
    """Labelled split the kNN top-1 is measured on (default: data.val as well, its later samples)."""
    max_train: int = 1000
    max_val: int = 500
    knn: KNNConfig = field(default_factory=KNNConfig)

    def __post_init__(self) -> None:
        if self.every_n_steps < 0 or self.max_train < 1 or self.max_val < 1:
            raise ValueError("monitor: every_n_steps must be >= 0, max_train and max_val >= 1")
