"""Where images come from before sharding: an ImageNet-style folder, or Fashion-MNIST IDX files.

A source lists lightweight *items* (cheap to send to a worker process) and loads one item into a sample
{"__key__", "<ext>": image bytes, "cls": class index bytes}. ``load`` returns None for an unreadable image.
"""
from __future__ import annotations

import gzip
import io
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .decode import to_rgb

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                  "Ankle boot"]
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"


def _safe_key(text: str) -> str:
    # WebDataset splits file names at the first dot: keys must not contain one.
    return re.sub(r"[^A-Za-z0-9_/-]", "_", text)


@dataclass
class FolderItem:
    path: str
    label: int
    key: str


class ImageFolderSource:
    """``root/<class>/<image>`` (ImageNet layout). Class indices follow the sorted class names."""

    def __init__(self, root: str | os.PathLike, classes: list[str] | None = None):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"{self.root}: image folder not found")
        found = sorted(d.name for d in self.root.iterdir() if d.is_dir())
        if not found:
            raise ValueError(f"{self.root}: no class sub-folders (expected root/<class>/<image>)")
        self.classes = classes or found
        self.image_ext = "jpg"

    def items(self) -> list[FolderItem]:
        index = {c: i for i, c in enumerate(self.classes)}
        out, taken = [], set()
        for cls in sorted(d.name for d in self.root.iterdir() if d.is_dir()):
            if cls not in index:
                raise ValueError(f"{self.root / cls}: class {cls!r} is not among the training classes")
            for p in sorted((self.root / cls).rglob("*")):
                if p.suffix.lower() in IMAGE_EXTS and p.is_file():
                    key = base = _safe_key(str(p.relative_to(self.root).with_suffix("")))
                    n = 1
                    while key in taken:  # a.jpg beside a.png, or x.1.png beside x_1.png
                        n += 1
                        key = f"{base}-{n}"
                    taken.add(key)
                    out.append(FolderItem(str(p), index[cls], key))
        if not out:
            raise ValueError(f"{self.root}: no images found")
        return out

    @staticmethod
    def load(item: FolderItem) -> dict[str, Any] | None:
        data = Path(item.path).read_bytes()
        try:
            with Image.open(io.BytesIO(data)) as im:
                fmt = (im.format or "").lower()
                im.load()  # full decode: catches truncated files, not only bad headers
                if fmt in ("jpeg", "png", "webp"):
                    ext, payload = ("jpg" if fmt == "jpeg" else fmt), data  # keep the original bytes
                else:  # re-encode exotic formats once, as 8-bit RGB PNG (to_rgb: what training would do)
                    buf = io.BytesIO()
                    to_rgb(im).save(buf, format="PNG")
                    ext, payload = "png", buf.getvalue()
        except Exception:
            return None
        return {"__key__": item.key, ext: payload, "cls": str(item.label).encode()}


def split_holdout(items: list, fraction: float, seed: int = 0) -> tuple[list, list]:
    """Deterministic held-out split of a folder that has no train/val sub-folders."""
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * fraction))
    val = sorted(order[:n_val])
    train = sorted(order[n_val:])
    return [items[i] for i in train], [items[i] for i in val]


def _read_idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    ndim = magic & 0xFF
    dims = [int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


class FashionMNISTSource:
    """Fashion-MNIST from its IDX files; ``split`` "train" (60k) or "val" (the official 10k test set)."""

    FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "val": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}

    def __init__(self, root: str | os.PathLike = FMNIST_DIR, split: str = "train", limit: int | None = None):
        root = Path(root)
        images, labels = self.FILES[split]
        paths = [next((p for p in (root / (n + ".gz"), root / n) if p.exists()), None) for n in (images, labels)]
        if None in paths:
            raise FileNotFoundError(f"{root}: Fashion-MNIST IDX files for split {split!r} not found "
                                    f"(Debian package dataset-fashion-mnist)")
        self.images, self.labels = _read_idx(paths[0]), _read_idx(paths[1])
        if limit is not None:
            self.images, self.labels = self.images[:limit], self.labels[:limit]
        self.split, self.classes, self.image_ext = split, list(FMNIST_CLASSES), "png"

    def items(self) -> list[int]:
        return list(range(len(self.labels)))

    def load(self, i: int) -> dict[str, Any]:
        buf = io.BytesIO()
        Image.fromarray(self.images[i], mode="L").save(buf, format="PNG")
        return {"__key__": f"fmnist-{self.split}-{i:06d}", "png": buf.getvalue(),
                "cls": str(int(self.labels[i])).encode()}
