"""Image bytes -> 8-bit RGB: the one conversion training, evaluation and sharding use (``to_rgb``), so 16-bit,
float, CMYK, palette and transparent images look the same wherever they are read. PIL and NumPy only: the
sharding workers that re-encode images need no torch."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def open_image(data: bytes) -> Image.Image:
    """Bytes -> PIL image with only its header read; pixels are decoded by the transform."""
    return Image.open(io.BytesIO(data))


BACKGROUND = (255, 255, 255)
"""The colour transparent pixels are composited over: white, as a viewer shows a transparent image on a page."""

_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_HIGH_DEPTH = (*_SIXTEEN_BIT, "I", "F")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


def _has_alpha(img: Image.Image) -> bool:
    """An alpha band, a transparent palette entry or colour (``transparency``), or a palette with alpha."""
    palette_alpha = img.mode == "P" and img.palette is not None and img.palette.mode == "RGBA"
    return img.mode in _ALPHA or "transparency" in img.info or palette_alpha


def _grey_to_8bit(img: Image.Image) -> Image.Image:
    """A 16-bit, 32-bit integer or float greyscale image -> mode ``L``, scaled to 0..255 (Pillow's own
    conversion clips at 255 instead, turning a 16-bit image white).

    16-bit: round(v / 257), the inverse of the usual 8 -> 16-bit expansion v * 257 (65535 -> 255).
    ``I`` (32-bit): values within 0..65535 are 16-bit data in a 32-bit container (how Pillow opens some 16-bit
    files) and scale as 16-bit; any value beyond that range scales the image by the type's range 0..2^31-1,
    negatives clipping to 0. ``F`` (float): Pillow's scale, the float twin of ``L`` (``L`` -> ``F`` gives
    0..255), rounded and clipped to 0..255; a float image in 0..1 must be scaled by its maker."""
    a = np.asarray(img)  # [H, W], uint16 (either byte order), int32 or float32
    if img.mode in _SIXTEEN_BIT or (img.mode == "I" and (a.size == 0 or (a.min() >= 0 and a.max() <= 65535))):
        out = (a.astype(np.uint32) + 128) // 257
    elif img.mode == "I":
        out = np.rint(np.clip(a, 0, None) * (255 / (2**31 - 1)))
    else:
        out = np.rint(np.clip(np.nan_to_num(a), 0, 255))
    return Image.fromarray(out.astype(np.uint8))


def _over_background(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (*BACKGROUND, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image -> 8-bit RGB, the one conversion training, evaluation and sharding use.

    - RGB without transparency: returned as is (an undecoded image stays undecoded).
    - 16-bit (``I;16*``), 32-bit integer (``I``) and float (``F``) greyscale: scaled to 8 bits, not clipped
      (see ``_grey_to_8bit``); a 16-bit transparent grey level composites over ``BACKGROUND``.
    - Alpha (``RGBA``, ``LA``, ``PA``, premultiplied ``RGBa``/``La``), a palette or grey / RGB image with a
      transparent entry or colour: composited over ``BACKGROUND`` (white), not reduced to whatever colour
      the transparent pixels happen to hold.
    - ``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``, ``RGBX``: Pillow's conversion (CMYK by
      Pillow's formula, without an ICC profile).
    EXIF orientation is not applied, as in timm and torchvision: released weights and their reference
    accuracies come from pixels read that way, and the training crop is chosen from the stored size."""
    if img.mode == "RGB" and "transparency" not in img.info:
        return img
    if img.mode in _HIGH_DEPTH:
        grey = _grey_to_8bit(img)
        key = img.info.get("transparency")
        if not isinstance(key, int):
            return grey.convert("RGB")
        alpha = Image.fromarray(np.where(np.asarray(img) == key, 0, 255).astype(np.uint8))
        return _over_background(Image.merge("RGBA", (grey, grey, grey, alpha)))
    if _has_alpha(img):
        return _over_background((img.convert("LA") if img.mode == "La" else img).convert("RGBA"))
    return img.convert("RGB")


def decode_image(data: bytes) -> Image.Image:
    """Bytes -> 8-bit RGB PIL image (``to_rgb``); raises on corrupt data."""
    img = open_image(data)
    img.load()
    return to_rgb(img)
