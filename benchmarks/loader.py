"""Loader throughput: vitpipe's streaming loader vs a bare PIL decode + RandomResizedCrop loop, same shards.

Builds (once) a folder of real JPEG photos from scikit-image's sample images (random crops and scales,
so every file differs), shards it with `vitpipe shard`'s code, then times:
  1. bare loop: read every sample's bytes from the tar shards, PIL decode, torchvision RandomResizedCrop +
     flip + ToTensor + Normalize, one process;
  2. vitpipe's StreamLoader with 0, 1 and 2 worker processes (decode + crop + flip + batch in the workers,
     uint8; standardising in this process, as training does on its device).
With --s3, the same shards are also copied into a local SeaweedFS S3 server (tests/s3_server.py, started
here) and the StreamLoader with 1 and 2 workers, and a raw read of every shard's bytes, are timed from
s3:// beside local disk; the server's CPU time is reported, since it shares the machine's cores.

    pip install scikit-image   # the photos
    python benchmarks/loader.py --images 2000 --size 224 [--s3]
"""
from __future__ import annotations

import argparse
import io
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import fsspec
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
    cfg = StreamConfig(train=manifest_url, num_workers=workers,
                       transform=TransformConfig(image_size=(size, size)))
    ds = ShardStream(m.shard_urls(), [s.num_samples for s in m.shards], cfg, batch, seed=0,
                     offsets=m.offsets_urls())
    loader = StreamLoader(ds, workers, epoch_fn=lambda: 0)
    n, start = 0, time.perf_counter()
    for b in loader:
        ds.transform.finish(b["image"], b["erase"])  # standardising, which training does on the device
        n += b["image"].shape[0]
    return n / (time.perf_counter() - start)


def raw_bytes_per_s(urls: list[str]) -> float:
    n, start = 0, time.perf_counter()
    for url in urls:
        with fsspec.open(url, "rb") as f:
            while chunk := f.read(1 << 20):
                n += len(chunk)
    return n / (time.perf_counter() - start)


def compare_s3(work: Path, local_manifest: str, size: int, batch: int) -> None:
    """Local disk vs a SeaweedFS S3 server on this machine: loader images/s and raw bytes/s, side by side."""
    import psutil

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from s3_server import SeaweedS3

    server = SeaweedS3(Path(tempfile.mkdtemp(prefix="vitpipe-s3-", dir=work)))
    server.start()
    try:
        os.environ.update(server.env("admin"))
        fs = fsspec.filesystem("s3")
        fs.mkdir("bench")
        fs.put(str(work / "shards" / "train"), "bench/shards/", recursive=True)
        remote = "s3://bench/shards/train"
        weed = psutil.Process(server.proc.pid)

        def cpu() -> float:
            return sum(sum(p.cpu_times()[:2]) for p in [weed, *weed.children(recursive=True)])

        print(f"\n  local disk vs s3:// (SeaweedFS on the same {os.cpu_count()} cores)")
        print(f"  {'':28s} {'local':>10s} {'s3':>10s} {'s3/local':>9s} {'server CPU s':>13s}")
        for label, run in [(f"StreamLoader, {w} worker(s) img/s", lambda m, w=w: stream_loader(m, size, w, batch))
                           for w in (1, 2)] + [("raw read MB/s", lambda m: raw_bytes_per_s(
                               load_manifest(m).shard_urls()) / 1e6)]:
            local = run(local_manifest)
            c0 = cpu()
            remote_rate = run(remote)
            print(f"  {label:28s} {local:10.1f} {remote_rate:10.1f} {remote_rate / local:8.2f}x {cpu() - c0:13.1f}")
    finally:
        server.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workdir", default=None, help="keep photos and shards here (default: a temp folder)")
    p.add_argument("--s3", action="store_true", help="also stream from a local SeaweedFS S3 server")
    p.add_argument("--runs", type=int, default=3, help="alternating runs of each variant; the median is shown")
    a = p.parse_args()
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitpipe-bench-"))
    if not (work / "shards" / "train" / "manifest.json").exists():
        make_photo_folder(work / "photos", a.images)
        shard_image_folder(str(work / "photos"), str(work / "shards"), shard_size=250, workers=2)
    manifest = str(work / "shards" / "train")
    urls = load_manifest(manifest).shard_urls()
    torch.set_num_threads(1)  # as in a loader worker: measure decode work, not intra-op threading
    runs: dict[str, list[float]] = {"bare": [], **{f"w{w}": [] for w in (0, 1, 2)}}
    for _ in range(a.runs):  # alternating: a busy machine slows every variant alike
        runs["bare"].append(bare_loop(urls, a.size))
        for workers in (0, 1, 2):
            runs[f"w{workers}"].append(stream_loader(manifest, a.size, workers, a.batch))
    bare = statistics.median(runs["bare"])
    print(f"{a.images} JPEG photos 500x375 -> RandomResizedCrop {a.size}, in {len(urls)} shards; median of {a.runs}")
    print(f"  bare PIL decode + torchvision RRC loop (1 process) {bare:8.1f} images/s: the decode limit of a core")
    for workers in (0, 1, 2):
        ips = statistics.median(runs[f"w{workers}"])
        per = ips / max(workers, 1)  # 0 workers: the training process decodes
        print(f"  vitpipe StreamLoader, {workers} worker(s)            {ips:8.1f} images/s  ({ips / bare:.2f}x bare; "
              f"{per:.1f} per decoding process, {per / bare:.2f}x the limit)")
    if a.s3:
        compare_s3(work, manifest, a.size, a.batch)


if __name__ == "__main__":
    main()
