"""Decode on the training device vs in the loader workers: images/s of ``data.decode: gpu`` against
``data.decode: cpu`` on the same host, real JPEG photos, 224 px, batch 256, the two run alternately and the
median of the runs reported with their ratio.

On a GPU host the device path decodes with nvJPEG; on a CPU-only host the same code decodes with
device="cpu" (``--smoke`` makes that a quick check that the path runs end to end; its figures say nothing
about a GPU).

    pip install scikit-image   # the photos (as benchmarks/loader.py)
    python benchmarks/gpu_decode.py [--images 2048] [--batch 256] [--workers 4] [--runs 3] [--smoke]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from loader import make_photo_folder  # noqa: E402

from pipeline.data import ShardStream, StreamConfig, StreamLoader, TransformConfig, load_manifest  # noqa: E402
from pipeline.data.datamodule import ShardDataModule  # noqa: E402
from pipeline.data.transforms import TrainTransform  # noqa: E402
from pipeline.stages.shard import shard_image_folder  # noqa: E402


def images_per_s(manifest_url: str, decode: str, size: int, batch: int, workers: int, device: torch.device,
                 max_batches: int | None) -> float:
    """Loader workers -> host-to-device copy -> the training process's device half, timed to the last batch."""
    m = load_manifest(manifest_url)
    cfg = StreamConfig(train=manifest_url, num_workers=workers, decode=decode,
                       transform=TransformConfig(image_size=(size, size)))
    ds = ShardStream(m.shard_urls(), [s.num_samples for s in m.shards], cfg, batch, seed=0, offsets=m.offsets_urls())
    dm = ShardDataModule.__new__(ShardDataModule)
    dm.transform = TrainTransform(cfg.transform)
    n, start = 0, time.perf_counter()
    for i, b in enumerate(StreamLoader(ds, workers, epoch_fn=lambda: 0, pin_memory=device.type == "cuda")):
        b = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in b.items()}
        n += dm.on_after_batch_transfer(b, 0)["image"].shape[0]
        if max_batches is not None and i + 1 >= max_batches:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=2048)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--workdir", default=None, help="keep photos and shards here (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="64 photos, batch 16, one run: the path runs")
    a = p.parse_args()
    if a.smoke:
        a.images, a.batch, a.runs, a.workers = 64, 16, 1, 1
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitpipe-gpu-decode-"))
    if not (work / "shards" / "train" / "manifest.json").exists():
        make_photo_folder(work / "photos", a.images)
        shard_image_folder(str(work / "photos"), str(work / "shards"), shard_size=256, workers=2)
    manifest = str(work / "shards" / "train")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "CPU (the device path decodes with libjpeg)"
    rates: dict[str, list[float]] = {"cpu": [], "gpu": []}
    for _ in range(a.runs):
        for decode in ("cpu", "gpu"):  # alternating: a busy machine slows both alike
            rates[decode].append(images_per_s(manifest, decode, a.size, a.batch, a.workers, device, None))
    cpu, gpu = statistics.median(rates["cpu"]), statistics.median(rates["gpu"])
    print(f"{a.images} JPEG photos 500x375 -> {a.size} px, batch {a.batch}, {a.workers} loader workers, on {name}")
    print(f"| decode | images/s (median of {a.runs}) | ratio |")
    print("|---|---|---|")
    print(f"| cpu (workers) | {cpu:.1f} | 1.00x |")
    print(f"| gpu (device) | {gpu:.1f} | {gpu / cpu:.2f}x |")


if __name__ == "__main__":
    main()
