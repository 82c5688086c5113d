"""Image transforms with an explicit random generator per sample.

Each sample's augmentation is drawn from its own ``random.Random`` seeded by (seed, epoch, key), so the
same sample gets the same crop in an uninterrupted and a resumed run, whichever worker decodes it.
"""
from __future__ import annotations

import io
import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TransformConfig:
    """MAE pretraining augmentation: RandomResizedCrop + horizontal flip + normalisation."""

    image_size: tuple[int, int] = (224, 224)
    crop_scale: tuple[float, float] = (0.2, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


def crop_box(width: int, height: int, scale: tuple[float, float], ratio: tuple[float, float],
             rng: random.Random) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box (left, top, w, h): area fraction in ``scale``, log-uniform aspect ``ratio``."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    # Fallback: the largest centred crop within the ratio range.
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        w, h = int(round(height * ratio[1])), height
    else:
        w, h = width, height
    return (width - w) // 2, (height - h) // 2, w, h


def open_image(data: bytes) -> Image.Image:
    """Bytes -> PIL image with only its header read; pixels are decoded by the transform."""
    return Image.open(io.BytesIO(data))


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> RGB PIL image (grey or palette images are converted); raises on corrupt data."""
    img = open_image(data)
    img.load()
    return img.convert("RGB") if img.mode != "RGB" else img


class Normalise:
    """RGB PIL image [H, W, 3] uint8 -> float tensor [3, H, W], scaled to [0, 1] then standardised."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # [3, H, W]
        return (x.float().div_(255.0) - self.mean) / self.std


class MAETrainTransform:
    """PIL image -> normalised tensor [3, H, W] with a random resized crop and flip."""

    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg
        self.to_tensor = Normalise(cfg.mean, cfg.std)

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """``img`` may still be undecoded (``Image.open``): the crop is chosen from the header's size, and a
        JPEG is then decoded at the smallest DCT scale (1/2, 1/4, 1/8) that still covers the output."""
        cfg = self.cfg
        left, top, w, h = crop_box(img.width, img.height, cfg.crop_scale, cfg.crop_ratio, rng)
        out_h, out_w = cfg.image_size
        full_w = img.width
        if img.format == "JPEG" and w >= 2 * out_w and h >= 2 * out_h:
            img.draft("RGB", (math.ceil(img.width * out_w / w), math.ceil(img.height * out_h / h)))
            f = img.width / full_w  # the decoded scale; the box follows it
            left, top, w, h = left * f, top * f, w * f, h * f
        if img.mode != "RGB":
            img = img.convert("RGB")
        img = img.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + w, top + h))
        if cfg.hflip and rng.random() < 0.5:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return self.to_tensor(img)
