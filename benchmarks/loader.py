"""Loader throughput: vitpipe's streaming loader vs a bare PIL decode + RandomResizedCrop loop, same shards.

Builds (once) a folder of real JPEG photos from scikit-image's sample images (random crops and scales,
so every file differs), shards it with `vitpipe shard`'s code, then times:
  1. bare loop: read every sample's bytes from the tar shards, PIL decode, torchvision RandomResizedCrop +
     flip + ToTensor + Normalize, one process;
  2. vitpipe's StreamLoader with 0, 1 and 2 worker processes (decode + crop + flip + normalise + batch).

    pip install scikit-image   # the photos
    python benchmarks/loader.py --images 2000 --size 224
"""
from __future__ import annotations

import argparse
import io
import random
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from pipeline.data import StreamConfig, TransformConfig, load_manifest
from pipeline.data.stream import ShardStream, StreamLoader
from pipeline.data.tar_io import iter_raw_samples
from pipeline.stages.shard import shard_image_folder


def make_photo_folder(root: Path, n: int, seed: int = 0) -> None:
    from skimage import data as skd

    names = ["astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
             "skin", "cat", "colorwheel"]
    photos = []
    for nm in names:
        try:  # only the photos shipped inside the wheel: others would need a download
            photo = np.asarray(getattr(skd, nm)())
        except (AttributeError, ModuleNotFoundError, OSError):
            continue
        if photo.ndim == 3 and photo.shape[2] == 3:
            photos.append(photo)
    if not photos:
        raise SystemExit("no colour photos found in scikit-image's bundled data")
    rng = random.Random(seed)
    for i in range(n):
        src = Image.fromarray(photos[i % len(photos)])
        w, h = src.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        img = src.crop((x, y, x + cw, y + ch)).resize((500, 375))
        cls = root / f"class{i % len(photos)}"
        cls.mkdir(parents=True, exist_ok=True)
        img.save(cls / f"img{i:06d}.jpg", quality=90)


def bare_loop(urls: list[str], size: int) -> float:
    tf = T.Compose([T.RandomResizedCrop(size, scale=(0.2, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                    T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    n, start = 0, time.perf_counter()
    for url in urls:
        for sample in iter_raw_samples(url):
            tf(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
            n += 1
    return n / (time.perf_counter() - start)


def stream_loader(manifest_url: str, size: int, workers: int, batch: int) -> float:
    m = load_manifest(manifest_url)
    cfg = StreamConfig(train=manifest_url, shuffle_buffer=500, num_workers=workers,
                       transform=TransformConfig(image_size=(size, size)))
    ds = ShardStream(m.shard_urls(), [s.num_samples for s in m.shards], cfg, batch, seed=0)
    loader = StreamLoader(ds, workers, epoch_fn=lambda: 0)
    n, start = 0, time.perf_counter()
    for b in loader:
        n += b["image"].shape[0]
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workdir", default=None, help="keep photos and shards here (default: a temp folder)")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitpipe-bench-"))
    if not (work / "shards" / "train" / "manifest.json").exists():
        make_photo_folder(work / "photos", a.images)
        shard_image_folder(str(work / "photos"), str(work / "shards"), shard_size=250, workers=2)
    manifest = str(work / "shards" / "train")
    urls = load_manifest(manifest).shard_urls()
    torch.set_num_threads(1)  # as in a loader worker: measure decode work, not intra-op threading
    bare = bare_loop(urls, a.size)
    print(f"{a.images} JPEG photos 500x375 -> RandomResizedCrop {a.size}, in {len(urls)} shards")
    print(f"  bare PIL decode + torchvision RRC loop (1 process) {bare:8.1f} images/s")
    for workers in (0, 1, 2):
        ips = stream_loader(manifest, a.size, workers, a.batch)
        print(f"  vitpipe StreamLoader, {workers} worker(s)            {ips:8.1f} images/s  ({ips / bare:.2f}x bare)")


if __name__ == "__main__":
    main()
