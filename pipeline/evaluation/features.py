"""Labelled images of a split, read deterministically, and frozen features of them.

Evaluation reads the first ``limit`` samples of a split in manifest order (no shuffling, no augmentation),
so two encoders evaluated on the same split see exactly the same images. Worker processes take whole
shards round-robin; features keep their labels, so their order does not matter.
"""
from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from ..console import Progress
from ..data.config import ReadRetry
from ..data.decode import decode_image
from ..data.manifest import load_manifest
from ..data.stream import image_bytes
from ..data.tar_io import read_segment
from ..data.transforms import Normalise
from ..data.worker_start import loader_options

log = logging.getLogger(__name__)


class EvalTransform:
    """Resize the shorter side to ``size / crop_pct`` and centre-crop ``size`` (crop_pct 1: resize only)."""

    def __init__(self, image_size: tuple[int, int], mean, std, crop_pct: float = 0.875):
        if not 0.0 < crop_pct <= 1.0:
            raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
        self.size, self.crop_pct = tuple(image_size), crop_pct
        self.to_tensor = Normalise(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        h, w = self.size
        scale = max(h / img.height, w / img.width) / self.crop_pct  # shorter side covers size / crop_pct
        rh, rw = max(h, round(img.height * scale)), max(w, round(img.width * scale))
        img = img.resize((rw, rh), Image.BICUBIC)
        top, left = (rh - h) // 2, (rw - w) // 2
        return self.to_tensor(img.crop((left, top, left + w, top + h)))  # [3, H, W]


@dataclass
class Segment:
    url: str
    take: int  # the first ``take`` samples of this shard


class LabelledSplit(IterableDataset):
    """Batches {"image" [b, 3, H, W], "label" [b]} of the first ``limit`` samples of a split."""

    def __init__(self, split: str, transform: Callable[[Image.Image], torch.Tensor], batch_size: int,
                 limit: int | None = None, retry: ReadRetry | None = None):
        manifest = load_manifest(split)
        self.retry = retry or ReadRetry()  # transient store errors are retried as in training
        self.location, self.classes = manifest.location, manifest.classes
        self.transform, self.batch_size = transform, batch_size
        left = manifest.num_samples if limit is None else min(limit, manifest.num_samples)
        self.num_samples = left
        self.segments: list[Segment] = []
        for url, info in zip(manifest.shard_urls(), manifest.shards):
            if left <= 0:
                break
            self.segments.append(Segment(url, min(left, info.num_samples)))
            left -= self.segments[-1].take

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        mine = self.segments[info.id::info.num_workers] if info else self.segments
        images, labels, skipped = [], [], 0
        for seg in mine:
            for sample in read_segment(seg.url, 0, seg.take, self.retry):
                if sample is None:  # unreadable after the retries (read_segment logged it)
                    skipped += 1
                    continue
                try:
                    label = int(sample["cls"])
                    images.append(self.transform(decode_image(image_bytes(sample))))
                    labels.append(label)
                except Exception as err:  # unlabelled or corrupt: skip it, count it, go on
                    skipped += 1
                    log.warning("evaluation skips %s/%s: %s", seg.url, sample.get("__key__"), err)
                if len(images) == self.batch_size:
                    yield {"image": torch.stack(images), "label": torch.tensor(labels), "skipped": skipped}
                    images, labels, skipped = [], [], 0
        if images or skipped:
            yield {"image": torch.stack(images) if images else torch.empty(0), "label": torch.tensor(labels),
                   "skipped": skipped}


@dataclass
class Features:
    feats: torch.Tensor  # [N, D] float32
    labels: torch.Tensor  # [N] long
    skipped: int

    @property
    def num_classes(self) -> int:
        return int(self.labels.max()) + 1 if len(self.labels) else 0


@torch.no_grad()
def extract(embed: Callable[[torch.Tensor], torch.Tensor], split: LabelledSplit, num_workers: int = 0) -> Features:
    """Run ``embed`` ([b, 3, H, W] -> [b, D]) over the split; returns features and labels in read order."""
    workers = min(num_workers, len(split.segments))
    loader = DataLoader(split, batch_size=None, num_workers=workers, **loader_options(workers))
    feats, labels, skipped = [], [], 0
    progress = Progress(f"features of {split.location}", split.num_samples, "images")
    for batch in loader:
        skipped += batch["skipped"]
        progress.update(len(batch["label"]) + batch["skipped"])
        if len(batch["label"]):
            feats.append(embed(batch["image"]).float())
            labels.append(batch["label"])
    if not feats:
        raise ValueError(f"{split.location}: no labelled samples could be read")
    return Features(torch.cat(feats), torch.cat(labels).long(), skipped)


def encoder_embedding(encoder: torch.nn.Module, pool: str = "cls") -> Callable[[torch.Tensor], torch.Tensor]:
    """Frozen-encoder features: the CLS token (the MAE paper's linear-probe feature) or the patch mean."""
    encoder.eval()

    def embed(imgs: torch.Tensor) -> torch.Tensor:
        tokens = encoder(imgs)  # [b, prefix + L, D]
        p = encoder.num_prefix_tokens
        return tokens[:, 0] if pool == "cls" else tokens[:, p:].mean(dim=1)

    return embed


def pixel_embedding(imgs: torch.Tensor) -> torch.Tensor:
    """The raw-pixel baseline: the normalised image flattened, [b, 3 * H * W]."""
    return imgs.flatten(1)
