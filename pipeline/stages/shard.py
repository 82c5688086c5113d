"""The shard stage: an image folder or Fashion-MNIST IDX files -> train and held-out shards + manifests."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ..console import report
from ..data.manifest import Manifest
from ..data.sharding import index_shards, write_split
from ..data.sources import FMNIST_DIR, FashionMNISTSource, ImageFolderSource, split_holdout


def shard_fashion_mnist(out: str, root: str = FMNIST_DIR, shard_size: int = 10000, workers: int = 2,
                        limit: int | None = None, log: Callable[[str], None] = report.info) -> dict[str, Manifest]:
    """Fashion-MNIST's own splits: train (60k) -> ``out/train``, test (10k) -> ``out/val``."""
    out = out.rstrip("/")
    manifests = {}
    for split in ("train", "val"):
        source = FashionMNISTSource(root, split, limit=limit)
        manifests[split] = write_split(source, source.items(), f"{out}/{split}", split, shard_size, workers, log)
    return manifests


def shard_image_folder(root: str, out: str, shard_size: int = 1000, workers: int = 2, holdout: float = 0.0,
                       seed: int = 0, log: Callable[[str], None] = report.info) -> dict[str, Manifest]:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` become two splits; a flat ``root/<class>/*`` is
    split with a deterministic held-out ``holdout`` fraction (0 keeps everything for training)."""
    base, out = Path(root), out.rstrip("/")
    manifests = {}
    if (base / "train").is_dir():
        train = ImageFolderSource(base / "train")
        manifests["train"] = write_split(train, train.items(), f"{out}/train", "train", shard_size, workers, log)
        if (base / "val").is_dir():
            val = ImageFolderSource(base / "val", classes=train.classes)
            manifests["val"] = write_split(val, val.items(), f"{out}/val", "val", shard_size, workers, log)
        return manifests
    source = ImageFolderSource(base)
    train_items, val_items = split_holdout(source.items(), holdout, seed)
    manifests["train"] = write_split(source, train_items, f"{out}/train", "train", shard_size, workers, log)
    if val_items:
        manifests["val"] = write_split(source, val_items, f"{out}/val", "val", shard_size, workers, log)
    return manifests


def shard(out: str, images: str | None = None, fashion_mnist: str | None = None, index: list[str] | None = None,
          shard_size: int | None = None, workers: int = 2, holdout: float = 0.0, split: str = "train",
          strict: bool = False) -> None:
    """``vitpipe shard``: from an image folder, Fashion-MNIST, or existing shards (``index``: a manifest only)."""
    if strict and not index:
        raise ValueError("--strict applies to --index only")
    if index:
        index_shards(index, out, split, strict=strict)
    elif images:
        shard_image_folder(images, out, shard_size or 1000, workers, holdout)
    else:
        shard_fashion_mnist(out, fashion_mnist or FMNIST_DIR, shard_size or 10000, workers)


__all__ = ["index_shards", "shard", "shard_fashion_mnist", "shard_image_folder"]
