"""One conversion to 8-bit RGB (``to_rgb``) behind training, evaluation and ``vitpipe shard --images``:
16-bit and 32-bit greyscale scaled (not clipped to white), alpha and transparent palette entries composited
over white, CMYK / bilevel / palette converted. Real PNG, TIFF and JPEG bytes through real Pillow."""
from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.data.config import TransformConfig
from pipeline.data.decode import BACKGROUND, decode_image, open_image, to_rgb
from pipeline.data.manifest import load_manifest
from pipeline.data.sources import ImageFolderSource
from pipeline.data.stream import ShardStream, StreamConfig, StreamLoader
from pipeline.data.transforms import TrainTransform
from pipeline.evaluation.features import EvalTransform, LabelledSplit
from pipeline.stages.shard import shard_image_folder

IDENTITY = {"mean": (0.0, 0.0, 0.0), "std": (1.0, 1.0, 1.0)}  # tensors stay in [0, 1]: x * 255 = pixel


def gradient16(h: int = 64, w: int = 64) -> np.ndarray:
    """[h, w] uint16 spread evenly over 0..65535: mean 32767.5, i.e. 127.5 in 8 bits."""
    return (np.arange(h * w, dtype=np.uint64) * 65535 // (h * w - 1)).astype(np.uint16).reshape(h, w)


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def pixels(img: Image.Image) -> np.ndarray:
    assert img.mode == "RGB"
    return np.asarray(img).astype(np.int64)  # [H, W, 3]


def whole_image_transform(size=(16, 16)) -> TrainTransform:
    """Training transform whose crop is the whole (square) image, without flips: only decoding and resizing
    act on the pixel values."""
    return TrainTransform(TransformConfig(image_size=size, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                          hflip=False, **IDENTITY))


# ------------------------------------------------------------------------------------------------ 16-bit


def test_16bit_png_decodes_to_mid_grey_in_training_and_evaluation():
    data = encode(Image.fromarray(gradient16()), "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"  # the precondition: a real 16-bit greyscale PNG

    rgb = pixels(decode_image(data))  # evaluation's decode (pipeline.evaluation.features)
    assert rgb.mean() == pytest.approx(127.5, abs=0.5)  # clipping gave 254.5
    assert (rgb == 255).mean() < 0.01  # clipping turned 99.6 % white
    assert (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()

    x = whole_image_transform()(open_image(data), random.Random(0))  # training: an undecoded image
    assert float(x.mean()) * 255 == pytest.approx(127.5, abs=1.5)


def test_16bit_values_map_as_the_inverse_of_8_to_16_bit_expansion():
    v = np.array([[0, 128, 129, 257, 32767, 32768, 65278, 65535]], dtype=np.uint16)
    want = [0, 0, 1, 1, 127, 128, 254, 255]  # round(v / 257): every v * 257 comes back exactly
    for img in (Image.fromarray(v),  # I;16, native little-endian
                Image.frombytes("I;16B", (v.shape[1], 1), v.astype(">u2").tobytes())):
        assert pixels(to_rgb(img))[0, :, 0].tolist() == want, img.mode
    k = np.arange(256, dtype=np.uint16)[None]
    assert pixels(to_rgb(Image.fromarray(k * 257)))[0, :, 0].tolist() == list(range(256))


def test_32bit_integer_and_float_images():
    # "I" within 0..65535: 16-bit data in a 32-bit container, scaled as 16-bit
    i16 = Image.fromarray(np.array([[0, 257, 32768, 65535]], dtype=np.int32))
    assert i16.mode == "I" and pixels(to_rgb(i16))[0, :, 0].tolist() == [0, 1, 128, 255]
    # "I" beyond 65535: scaled by the type's range 0..2^31-1, negatives clipped
    i32 = Image.fromarray(np.array([[-7, 0, 2**30, 2**31 - 1]], dtype=np.int32))
    assert pixels(to_rgb(i32))[0, :, 0].tolist() == [0, 0, 128, 255]
    # "F": Pillow's scale, the float twin of "L" (0..255), rounded and clipped
    f = Image.fromarray(np.array([[-5.0, 0.4, 0.6, 100.2, 300.0]], dtype=np.float32))
    assert f.mode == "F" and pixels(to_rgb(f))[0, :, 0].tolist() == [0, 0, 1, 100, 255]
    grey = Image.fromarray(np.arange(0, 256, 15, dtype=np.uint8)[None])
    assert (pixels(to_rgb(grey.convert("F")))[..., 0] == np.asarray(grey)).all()  # L -> F -> RGB round-trips


def test_16bit_images_sharded_from_a_folder_train_and_evaluate_as_mid_grey(tmp_path):
    """The three decode sites on real files: `vitpipe shard --images` (a 16-bit TIFF is re-encoded there, a
    16-bit PNG kept as it is), then the training stream and evaluation's labelled split over those shards."""
    d = tmp_path / "images" / "grey"
    d.mkdir(parents=True)
    (d / "tiff16.tif").write_bytes(encode(Image.fromarray(gradient16()), "TIFF"))
    (d / "png16.png").write_bytes(encode(Image.fromarray(gradient16()), "PNG"))
    assert Image.open(d / "tiff16.tif").mode == "I;16"

    source = ImageFolderSource(tmp_path / "images")
    loaded = {item.key: ImageFolderSource.load(item) for item in source.items()}
    assert set(loaded["grey/tiff16"]) == {"__key__", "png", "cls"}  # re-encoded, as 8-bit RGB
    assert Image.open(io.BytesIO(loaded["grey/tiff16"]["png"])).mode == "RGB"
    assert pixels(decode_image(loaded["grey/tiff16"]["png"])).mean() == pytest.approx(127.5, abs=0.5)
    assert loaded["grey/png16"]["png"] == (d / "png16.png").read_bytes()  # kept: decoded when read

    out = tmp_path / "shards"
    shard_image_folder(str(tmp_path / "images"), str(out), shard_size=10, workers=1, log=lambda _: None)
    manifest = load_manifest(str(out / "train"))

    split = LabelledSplit(str(out / "train"), EvalTransform((16, 16), crop_pct=1.0, **IDENTITY), batch_size=8)
    (batch,) = list(split)
    assert batch["image"].shape == (2, 3, 16, 16) and batch["skipped"] == 0
    for x in batch["image"]:
        assert float(x.mean()) * 255 == pytest.approx(127.5, abs=1.5)

    cfg = StreamConfig(shuffle=False, num_workers=0, transform=whole_image_transform().cfg)
    ds = ShardStream(manifest.shard_urls(), [s.num_samples for s in manifest.shards], cfg, batch_size=2, seed=0)
    (batch,) = list(StreamLoader(ds, num_workers=0, epoch_fn=lambda: 0))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["skipped"] == 0
    for x in ds.transform.finish(batch["image"]):  # (uint8 from the loader, standardised on the device)
        assert float(x.mean()) * 255 == pytest.approx(127.5, abs=1.5)


# ------------------------------------------------------------------------------- alpha, palette, CMYK


def test_rgba_composites_over_white_instead_of_dropping_alpha():
    a = np.zeros((2, 3, 4), dtype=np.uint8)
    a[0, 0] = (255, 0, 0, 0)  # fully transparent red: the colour under it must not show
    a[0, 1] = (0, 0, 0, 128)  # half-transparent black over white: about 127
    a[0, 2] = (10, 200, 30, 255)  # opaque: unchanged
    a[1] = (0, 0, 255, 0)
    data = encode(Image.fromarray(a, "RGBA"), "PNG")
    rgb = pixels(decode_image(data))
    assert BACKGROUND == (255, 255, 255)
    assert rgb[0, 0].tolist() == [255, 255, 255]
    assert rgb[0, 1].tolist() == [127, 127, 127]
    assert rgb[0, 2].tolist() == [10, 200, 30]
    assert (rgb[1] == 255).all()

    # the training transform composites the same way (a fully transparent image trains as white)
    blank = encode(Image.new("RGBA", (8, 8), (0, 0, 0, 0)), "PNG")
    assert torch.allclose(whole_image_transform((4, 4))(open_image(blank), random.Random(0)), torch.ones(3, 4, 4))


def test_grey_with_alpha_and_bilevel_and_plain_grey():
    la = Image.fromarray(np.array([[[0, 0], [0, 255], [90, 255]]], dtype=np.uint8), "LA")
    assert pixels(decode_image(encode(la, "PNG")))[0, :, 0].tolist() == [255, 0, 90]
    bilevel = Image.fromarray(np.array([[0, 255, 0]], dtype=np.uint8)).convert("1")
    assert pixels(decode_image(encode(bilevel, "PNG")))[0].tolist() == [[0] * 3, [255] * 3, [0] * 3]
    grey = Image.fromarray(np.array([[3, 130, 250]], dtype=np.uint8))
    assert pixels(decode_image(encode(grey, "PNG")))[0, :, 1].tolist() == [3, 130, 250]


def test_palette_with_a_transparent_entry_composites_over_white():
    p = Image.new("P", (4, 1))
    p.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0: red (transparent), 1: blue
    p.putpixel((1, 0), 1)
    p.putpixel((3, 0), 1)
    data = encode(p, "PNG", transparency=0)
    opened = Image.open(io.BytesIO(data))
    assert opened.mode == "P" and opened.info["transparency"] == 0
    rgb = pixels(decode_image(data))
    assert rgb[0].tolist() == [[255, 255, 255], [0, 0, 255], [255, 255, 255], [0, 0, 255]]
    # without transparency the palette colour is the colour
    assert pixels(decode_image(encode(p, "PNG")))[0, 0].tolist() == [255, 0, 0]
    # a palette whose entries carry alpha (GIF/PNG "PA"-like): composited too
    pa = Image.new("P", (2, 1))
    pa.putpalette([0, 255, 0, 0, 0, 0, 0, 255], "RGBA")  # 0: transparent green, 1: opaque black
    pa.putpixel((1, 0), 1)
    assert pixels(to_rgb(pa))[0].tolist() == [[255, 255, 255], [0, 0, 0]]


def test_16bit_grey_with_a_transparent_level():
    a = np.array([[0, 1000, 30000]], dtype=np.uint16)
    data = encode(Image.fromarray(a), "PNG", transparency=1000)
    assert Image.open(io.BytesIO(data)).info["transparency"] == 1000
    assert pixels(decode_image(data))[0, :, 0].tolist() == [0, 255, 117]  # 1000 is transparent: white


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_cmyk_is_converted(fmt):
    img = Image.new("CMYK", (32, 32), (0, 0, 0, 0))  # no ink: white
    img.paste((255, 0, 0, 0), (0, 0, 16, 32))  # cyan on the left
    img.paste((0, 0, 0, 255), (16, 0, 32, 16))  # black top right
    data = encode(img, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    rgb = pixels(decode_image(data))
    tol = 0 if fmt == "TIFF" else 12  # JPEG is lossy
    assert np.abs(rgb[8, 4] - [0, 255, 255]).max() <= tol
    assert np.abs(rgb[4, 28] - [0, 0, 0]).max() <= tol
    assert np.abs(rgb[28, 28] - [255, 255, 255]).max() <= tol
    x = TrainTransform(TransformConfig(image_size=(8, 8), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                       hflip=False, **IDENTITY))(open_image(data), random.Random(0))
    assert x.shape == (3, 8, 8) and float(x[0, :, :2].mean()) < 0.1 and float(x[1, :, :2].mean()) > 0.9


def test_large_cmyk_jpeg_keeps_the_draft_fast_path():
    """A JPEG much larger than the output is decoded at a reduced DCT scale (draft), CMYK included."""
    img = Image.new("CMYK", (256, 256), (255, 0, 0, 0))
    opened = open_image(encode(img, "JPEG", quality=95))
    x = TrainTransform(TransformConfig(image_size=(16, 16), crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0),
                                       hflip=False, **IDENTITY))(opened, random.Random(0))
    assert opened.size[0] < 256  # decoded at a reduced scale
    assert np.allclose(x.mean(dim=(1, 2)).numpy(), [0.0, 1.0, 1.0], atol=0.05)


def test_rgb_without_transparency_is_returned_undecoded():
    """The training fast path: an RGB JPEG comes back as the same, still undecoded, image."""
    img = open_image(encode(Image.new("RGB", (64, 48), (1, 2, 3)), "JPEG"))
    assert to_rgb(img) is img


def test_exif_orientation_is_not_applied():
    """As in timm and torchvision: the stored pixels are used, the orientation tag is ignored."""
    img = Image.new("RGB", (40, 20), (200, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    data = encode(img, "JPEG", exif=exif.tobytes())
    assert Image.open(io.BytesIO(data)).getexif().get(0x0112) == 6
    assert decode_image(data).size == (40, 20)
