"""``data.decode: gpu``: workers ship a JPEG's bytes with the crop and flip they drew, the training process
decodes on its device. On this CPU machine the same code decodes with device="cpu": the crops must be the
CPU path's boxes and the pixels within 3 (of 255) of the CPU path's (its reduced-size JPEG draft off)."""
from __future__ import annotations

import io
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from pipeline.data import ShardStream, StreamConfig, StreamLoader, TransformConfig, load_manifest
from pipeline.data.datamodule import ShardDataModule
from pipeline.data.sharding import index_shards
from pipeline.data.transforms import TrainTransform


def photo(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Smooth colour fields with edges and a little noise: JPEG-like content, not white noise."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([np.sin(x / (7 + 5 * c) + rng.uniform(0, 6)) * np.cos(y / (9 + 3 * c)) for c in range(3)], -1)
    img = (base * 90 + 128 + rng.normal(0, 6, (h, w, 3))).clip(0, 255).astype(np.uint8)
    img[h // 3: h // 2, w // 4: w // 2] = rng.integers(0, 255, 3)  # a flat patch with sharp edges
    return Image.fromarray(img)


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> tuple[Path, dict[str, bytes]]:
    """24 JPEG photos of assorted sizes, one PNG, one CMYK JPEG and one JPEG with a valid header but cut bytes."""
    folder = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    samples: dict[str, bytes] = {}
    for i in range(24):
        samples[f"p{i:03d}.jpg"] = encoded(photo(rng, int(rng.integers(60, 160)), int(rng.integers(60, 160))),
                                           "JPEG", quality=90)
    samples["png000.png"] = encoded(photo(rng, 64, 48), "PNG")
    samples["cmyk000.jpg"] = encoded(photo(rng, 80, 64).convert("CMYK"), "JPEG")
    good = encoded(photo(rng, 96, 96), "JPEG", quality=90)
    samples["cut000.jpg"] = good[:400] + bytes(len(good) - 400)  # header intact, the scan zeroed
    with wds.TarWriter(str(folder / "photos-000000.tar")) as sink:
        for name, data in samples.items():
            key, ext = name.rsplit(".", 1)
            sink.write({"__key__": key, ext: data, "cls": b"1"})
    index_shards([str(folder / "photos-000000.tar")], str(folder), "train", log=lambda _: None)
    return folder, samples


def loader(folder: Path, decode: str, batch: int = 27) -> tuple[ShardStream, StreamLoader]:
    m = load_manifest(str(folder))
    cfg = StreamConfig(shuffle=True, num_workers=0, decode=decode, transform=TransformConfig(
        image_size=(32, 32), crop_scale=(0.3, 1.0), random_erase=0.5))
    ds = ShardStream(m.shard_urls(), [s.num_samples for s in m.shards], cfg, batch, seed=1,
                     offsets=m.offsets_urls())
    return ds, StreamLoader(ds, num_workers=0, epoch_fn=lambda: 0)


def on_device(batch: dict, ds: ShardStream) -> dict:
    """What the training process does after the host-to-device copy (here the device is the CPU)."""
    dm = ShardDataModule.__new__(ShardDataModule)
    dm.transform = TrainTransform(ds.cfg.transform)
    return dm.on_after_batch_transfer(dict(batch), 0)


def test_device_decode_matches_the_cpu_path(jpeg_shards):
    folder, samples = jpeg_shards
    ds, ld = loader(folder, "gpu")
    (batch,) = list(ld)
    # the 24 photos and the cut JPEG travel encoded (its header is fine); the PNG and the CMYK JPEG are decoded
    # in the worker
    travelled = {k.split("/")[1] for k, d in zip(batch["key"], batch["encoded"]) if d is not None}
    assert travelled == {f"p{i:03d}" for i in range(24)} | {"cut000"}
    out = on_device(batch, ds)
    assert "photos-000000/cut000" not in out["key"] and out["skipped"] == 1
    assert out["bad"][0][0] == "photos-000000/cut000" and out["bad"][0][1].startswith("corrupt image")
    assert out["image"].dtype == torch.float32 and out["image"].shape == (26, 3, 32, 32)

    host = TrainTransform(ds.cfg.transform)
    diffs = []
    for key, x, box, flip in zip(batch["key"], batch["image"], batch["box"], batch["flip"]):
        if key.endswith("cut000"):
            continue
        name = key.split("/")[1]
        data = samples[next(n for n in samples if n.startswith(name + "."))]
        img, rng = Image.open(io.BytesIO(data)), random.Random(f"1/0/{key}")
        d = host.draws(img.width, img.height, rng)
        ours = out["image"][out["key"].index(key)]
        if name[1:].isdigit():  # p000 ... p023: the photos
            assert (tuple(d.box), d.flip) == (tuple(box), flip), key  # the CPU path's crop and flip
            cpu = host.finish(host.apply(img, d, draft=False)[None], [d.erase])[0]
            # in pixels of 0..255: undo the standardisation of both
            std = torch.tensor(ds.cfg.transform.std).view(3, 1, 1) * 255
            diffs.append(float(((ours - cpu) * std).abs().mean()))
        else:  # decoded in the worker exactly as on the CPU path
            assert torch.equal(ours, host(Image.open(io.BytesIO(data)), random.Random(f"1/0/{key}"))), key
    print(f"mean absolute pixel difference, device decode vs CPU path: max {max(diffs):.2f}, "
          f"mean {np.mean(diffs):.2f} (of 255)")
    assert max(diffs) <= 3.0


def test_a_batch_that_travels_encoded_carries_no_pixels_and_decodes_alike(jpeg_shards):
    """Batches of photos only ship their bytes and no image tensor; on the device they come out as the samples
    do in a batch that mixes them with host-decoded ones (each sample's draws are its own)."""
    folder = jpeg_shards[0]
    ds, ld = loader(folder, "gpu")
    whole = on_device(next(iter(ld)), ds)
    reference = dict(zip(whole["key"], whole["image"]))
    ds, ld = loader(folder, "gpu", batch=4)
    encoded_only = 0
    for batch in ld:
        if all(d is not None for d in batch["encoded"]):
            encoded_only += 1
            assert batch["image"].shape == (len(batch["key"]), 3, 0, 0)  # nothing to pin and copy
        else:
            assert batch["image"].shape[-2:] == (32, 32)
        out = on_device(batch, ds)
        assert out["image"].shape == (len(out["key"]), 3, 32, 32)
        for key, image in zip(out["key"], out["image"]):
            assert torch.equal(image, reference[key]), key
    assert encoded_only >= 2


def test_device_decode_refuses_rand_augment():
    with pytest.raises(ValueError, match="decode: gpu cannot apply transform.rand_augment"):
        StreamConfig(decode="gpu", transform=TransformConfig(rand_augment="rand-m9-mstd0.5-inc1"))
