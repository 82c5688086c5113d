"""JPEG decode on the training device (``data.decode: gpu``): loader workers read a sample's header and draw its
augmentation (``TrainTransform.draws``, seeded per sample as on the CPU path), then ship the encoded bytes with
the crop box and flip; the training process decodes the batch where the batch is (nvJPEG on a GPU,
libjpeg on the CPU, through ``torchvision.io.decode_jpeg``), crops, resizes (bicubic, antialiased), flips,
and hands the uint8 batch to ``DeviceNormalise``.

What the device decoder cannot take falls back to a CPU decode of that sample: images that are not JPEG, or
not RGB / grey (CMYK, ...), are decoded in the worker as on the CPU path; a JPEG the device decoder refuses
(e.g. a progressive one where unsupported) is decoded in the training process with PIL, from the same draws.
"""
from __future__ import annotations

import io
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image

from .transforms import Draws, TrainTransform


def device_decodable(img: Image.Image) -> bool:
    """Whether the device decoder takes this (header-only) image: a JPEG in RGB or grey."""
    return img.format == "JPEG" and img.mode in ("RGB", "L")


def crop_resize(img: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int], flip: bool
                ) -> torch.Tensor:
    """img uint8 [3, H, W] -> the box (left, top, w, h), resized to ``size`` (H, W), flipped -> uint8 [3, h, w]."""
    left, top, w, h = box
    crop = img[:, top:top + h, left:left + w].unsqueeze(0).float()  # [1, 3, h, w]
    out = F.interpolate(crop, size=tuple(size), mode="bicubic", align_corners=False, antialias=True)
    out = out.round_().clamp_(0, 255).to(torch.uint8)[0]
    return out.flip(-1) if flip else out


def decode_batch(batch: dict[str, Any], transform: TrainTransform) -> tuple[torch.Tensor, dict[int, str]]:
    """(the batch's uint8 images [b, 3, H, W] on their device with the encoded samples decoded into their places,
    {index: reason} of the samples whose bytes decode nowhere)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    images = batch["image"]
    todo = [i for i, data in enumerate(batch["encoded"]) if data is not None]
    failed: dict[int, str] = {}
    if not todo:
        return images, failed
    boxes, flips = batch["box"], batch["flip"]  # host lists (the collate's): no read of the device
    size = tuple(transform.cfg.image_size)
    device = images.device
    if tuple(images.shape[-2:]) != size:  # all travelled encoded, without pixels: each row is filled below
        images = torch.empty(images.shape[0], 3, *size, dtype=torch.uint8, device=device)
    data = [torch.frombuffer(bytearray(batch["encoded"][i]), dtype=torch.uint8) for i in todo]
    try:  # one call for the batch: nvJPEG decodes it as a batch
        decoded: list[torch.Tensor | None] = list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:  # one of them is not for this decoder: take them one by one
        decoded = []
        for d in data:
            try:
                decoded.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
            except RuntimeError:
                decoded.append(None)
    for i, img in zip(todo, decoded):
        if img is None:  # the CPU path, from the same draws (the draft is off: the box is in full pixels)
            try:
                pil = Image.open(io.BytesIO(batch["encoded"][i]))
                d = Draws(tuple(boxes[i]), bool(flips[i]), None, (0, 0, 0, 0, 0))
                images[i] = transform.apply(pil, d, draft=False).to(device)
            except Exception as err:  # corrupt bytes behind a valid header: skipped and counted, as on the CPU
                failed[i] = f"corrupt image: {err}"
        else:
            images[i] = crop_resize(img, tuple(boxes[i]), size, bool(flips[i]))
    return images, failed
