"""Speed and memory of one timm architecture on the machine it runs on: parameters, GMACs per image, training
and inference images/s and peak memory, in timm's benchmark-CSV column names (``benchmark.py``: model,
param_count in millions, infer_* and train_* columns) plus the peak-memory columns it lacks.

Each architecture is measured in its own process (``python -m pipeline.inspection.speed ARCH ...`` prints one
JSON line), so on a CPU the growth of that process's peak resident memory over what it held before the model
was built is the model's (weights, optimizer state, activations); on a GPU the peak is
``torch.cuda.max_memory_allocated``. No weights are downloaded: the networks start from fresh weights, which
changes nothing in their speed. On a GPU: bf16 autocast, channels-last for the CNNs."""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time

import timm
import torch
from torch.utils.flop_counter import FlopCounterMode


def gmacs(model: torch.nn.Module, size: int) -> float:
    """Multiply-accumulates of one forward of one image (FLOPs / 2), in billions."""
    model.eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(torch.randn(1, 3, size, size))
    return counter.get_total_flops() / 2e9


def _timed(step, steps: int, warmup: int, sync) -> float:
    """Seconds per step over ``steps`` after ``warmup`` (device synchronised at both ends)."""
    for _ in range(warmup):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - start) / steps


def measure(arch: str, size: int, batch: int, steps: int, warmup: int) -> dict[str, float | int | str]:
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    base = 0.0 if gpu else _peak_rss_mb()  # the interpreter, torch and timm: not the model's
    cnn = not arch.startswith(("vit", "deit"))
    sized = {} if cnn else {"img_size": size}  # a ViT's position table is built for its input size
    model = timm.create_model(arch, pretrained=False, num_classes=1000, **sized)
    params, macs = sum(p.numel() for p in model.parameters()), gmacs(model, size)
    layout = torch.channels_last if gpu and cnn else torch.contiguous_format
    model = model.to(device, memory_format=layout)
    x = torch.randn(batch, 3, size, size, device=device).contiguous(memory_format=layout)
    y = torch.randint(0, 1000, (batch,), device=device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=gpu)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)

    def infer() -> None:
        with torch.no_grad(), autocast:
            model(x)

    def train() -> None:
        with autocast:
            loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.eval()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    infer_s = _timed(infer, steps, warmup, sync)
    infer_peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_rss_mb() - base
    model.train()
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    train_s = _timed(train, steps, warmup, sync)
    train_peak = torch.cuda.max_memory_allocated() / 2**20 if gpu else _peak_rss_mb() - base
    return {"model": arch, "param_count": round(params / 1e6, 2), "infer_gmacs": round(macs, 2),
            "infer_samples_per_sec": round(batch / infer_s, 2), "infer_step_time": round(1000 * infer_s, 3),
            "infer_batch_size": batch, "infer_img_size": size,
            "infer_peak_mem_mb": round(infer_peak, 1),
            "train_samples_per_sec": round(batch / train_s, 2), "train_step_time": round(1000 * train_s, 3),
            "train_batch_size": batch, "train_img_size": size, "train_peak_mem_mb": round(train_peak, 1),
            "device": torch.cuda.get_device_name() if gpu else "cpu",
            "precision": "bf16 autocast" if gpu else "fp32"}


def _peak_rss_mb() -> float:
    """This process's peak resident memory so far (the CPU's figure: inference, then training, each the peak
    up to its end)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("arch")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    a = p.parse_args()
    print(json.dumps(measure(a.arch, a.size, a.batch, a.steps, a.warmup)))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
