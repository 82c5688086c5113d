"""Image transforms with an explicit random generator per sample.

Each sample's augmentation is drawn from its own ``random.Random`` seeded by (seed, epoch, key), so the
same sample gets the same crop in an uninterrupted and a resumed run, whichever worker decodes it.

Training splits the work where it is cheapest: loader workers decode, crop, flip and RandAugment to uint8
(``TrainTransform.sample``: a quarter of float32's bytes cross the process boundary and the host-to-device
copy), and the training process standardises and paints random erasing on the device
(``DeviceNormalise``), in fp32, with the boxes and noise seeds the workers drew.
"""
from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .config import TransformConfig
from .decode import to_rgb


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


def to_uint8(img: Image.Image) -> torch.Tensor:
    """RGB PIL image [H, W, 3] -> uint8 tensor [3, H, W]."""
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


class Normalise:
    """RGB PIL image [H, W, 3] uint8 -> float tensor [3, H, W], scaled to [0, 1] then standardised (on the host:
    evaluation's transform; training standardises on the device with the same ``DeviceNormalise``)."""

    def __init__(self, mean, std):
        self.standardise = DeviceNormalise(mean, std)

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.standardise(to_uint8(img)[None])[0]


def rand_augment(spec: str, mean: tuple[float, float, float]):
    """timm's RandAugment from its spec string; fill colour of geometric ops = the dataset mean."""
    from timm.data.auto_augment import rand_augment_transform

    try:
        return rand_augment_transform(spec, {"translate_const": 100, "img_mean": tuple(round(255 * m) for m in mean)})
    except (AssertionError, ValueError, KeyError, IndexError) as err:
        raise ValueError(f"rand_augment {spec!r} is not a timm RandAugment spec (e.g. rand-m9-mstd0.5-inc1): "
                         f"{err}") from None


NO_ERASE = (0, 0, 0, 0, 0)  # an erase row of a sample without random erasing


def erase_box(h: int, w: int, rng: random.Random, scale: tuple[float, float] = (0.02, 1 / 3),
              ratio: tuple[float, float] = (0.3, 3.3)) -> tuple[int, int, int, int, int]:
    """timm's RandomErasing box (mode "pixel", one box) for an [*, h, w] image: (top, left, height, width,
    noise seed), drawn from ``rng``; ``NO_ERASE`` when ten tries find no box that fits."""
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = h * w * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        eh, ew = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            top, left = rng.randint(0, h - eh), rng.randint(0, w - ew)
            return top, left, eh, ew, rng.getrandbits(63)
    return NO_ERASE


def paint_erase(x: torch.Tensor, box: tuple[int, int, int, int, int]) -> torch.Tensor:
    """Fill ``box`` of x [C, H, W] (standardised) with N(0, 1) noise from the box's seed, in place; the noise
    is drawn on x's device (on the CPU the numbers are those of timm's CPU path)."""
    top, left, eh, ew, seed = box
    if eh:
        gen = torch.Generator(device=x.device).manual_seed(seed)
        x[:, top:top + eh, left:left + ew] = torch.randn(x.shape[0], eh, ew, generator=gen, device=x.device)
    return x


class DeviceNormalise:
    """Where the batch is (the training device): uint8 images [b, 3, H, W] -> fp32 standardised (as
    ``Normalise``), with each sample's random erasing (rows of ``erase``, b rows of 5 ints on the host, see
    ``erase_box``) painted.

    Nothing here reads the device or copies to it with a wait: the erase rows stay on the host (a row read
    back from a GPU would stop the host every step) and mean and std move to a device once (a blocking copy to a
    GPU waits for the work queued before it)."""

    def __init__(self, mean, std):
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, images: torch.Tensor, erase: Sequence[Sequence[int]] | None = None) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images from the loader, got {images.dtype}")
        if images.device not in self._on:
            self._on[images.device] = (self.mean.to(images.device), self.std.to(images.device))
        mean, std = self._on[images.device]
        x = (images.float().div_(255.0) - mean) / std
        if erase is not None:
            for i, row in enumerate(erase):  # [5] ints; a few boxes per batch at most draw noise
                paint_erase(x[i], tuple(row))
        return x


@dataclass(frozen=True)
class Draws:
    """Every random choice of one sample's augmentation, drawn from its rng in a fixed order: crop box (left,
    top, width, height, in the full image's pixels), flip, RandAugment's seeds, random-erasing box."""

    box: tuple[int, int, int, int]
    flip: bool
    ra_seeds: tuple[int, int] | None
    erase: tuple[int, int, int, int, int]


class TrainTransform:
    """PIL image -> normalised tensor [3, H, W]: random resized crop and flip, then RandAugment and random
    erasing when configured. Every draw comes from the sample's ``rng``."""

    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg
        self.finish = DeviceNormalise(cfg.mean, cfg.std)
        self.rand_augment = rand_augment(cfg.rand_augment, cfg.mean) if cfg.rand_augment else None

    def __call__(self, img: Image.Image, rng: random.Random) -> torch.Tensor:
        """The whole transform on the host: standardised float [3, H, W] (what ``sample`` and
        ``DeviceNormalise`` give together)."""
        x, erase = self.sample(img, rng)
        return self.finish(x[None], [erase])[0]

    def draws(self, width: int, height: int, rng: random.Random) -> Draws:
        """The sample's random choices for an image of ``width`` x ``height`` (its header is enough)."""
        cfg = self.cfg
        box = crop_box(width, height, cfg.crop_scale, cfg.crop_ratio, rng)
        flip = bool(cfg.hflip and rng.random() < 0.5)
        ra_seeds = (rng.getrandbits(64), rng.getrandbits(32)) if self.rand_augment is not None else None
        erase = NO_ERASE
        if cfg.random_erase and rng.random() < cfg.random_erase:
            erase = erase_box(*cfg.image_size, rng)
        return Draws(box, flip, ra_seeds, erase)

    def sample(self, img: Image.Image, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int, int, int, int]]:
        """The loader worker's part: (uint8 [3, H, W], random-erasing box or ``NO_ERASE``)."""
        d = self.draws(img.width, img.height, rng)
        return self.apply(img, d), d.erase

    def apply(self, img: Image.Image, d: Draws, draft: bool = True) -> torch.Tensor:
        """Crop, resize, flip and RandAugment ``img`` as ``d`` says -> uint8 [3, H, W]. ``img`` may still be
        undecoded (``Image.open``): with ``draft`` a JPEG is then decoded at the smallest DCT scale (1/2, 1/4,
        1/8) that still covers the output."""
        cfg = self.cfg
        left, top, w, h = d.box
        out_h, out_w = cfg.image_size
        full_w = img.width
        if draft and img.format == "JPEG" and w >= 2 * out_w and h >= 2 * out_h:
            img.draft("RGB", (math.ceil(img.width * out_w / w), math.ceil(img.height * out_h / h)))
            f = img.width / full_w  # the decoded scale; the box follows it
            left, top, w, h = left * f, top * f, w * f, h * f
        img = to_rgb(img)
        img = img.resize((out_w, out_h), Image.BICUBIC, box=(left, top, left + w, top + h))
        if d.flip:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        if d.ra_seeds is not None:
            # timm's ops draw from the global `random` and numpy generators: seed them from this sample's draws
            # (each loader worker is its own process, so nothing else shares them meanwhile)
            random.seed(d.ra_seeds[0])
            np.random.seed(d.ra_seeds[1])
            img = self.rand_augment(img)
        return to_uint8(img)  # [3, H, W]
