"""MAE train-step throughput on CPU: vitpipe's MAE eager and compiled (``trainer.compile``: each block
compiled on its own), a straightforward MAE on timm ``Block``s as the reference (``reference_mae.py``), and
vitpipe's encoder processing mask tokens too (the paper's Sec. 4 "Training cost" ablation, ~3x slower).

Every variant takes the same batch and AdamW settings (betas 0.9 / 0.95, weight decay 0.05 off norms, biases and
tokens). Variants run in turn, round after round, and each figure is the median over the rounds, so a noisy
machine slows all of them alike; ratios are against the reference.

    python benchmarks/mae_step.py --size base --patch 16 --image 224 --batch 8 --steps 3 --rounds 5
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from reference_mae import ReferenceMAE

from pipeline.models import MAE, DecoderConfig, MAEConfig, ViTConfig
from pipeline.models.block_options import compile_blocks
from pipeline.tasks.config import OptimConfig
from pipeline.tasks.optim import build_optimizer

Step = Callable[[], None]


def vitpipe_step(cfg: MAEConfig, imgs: torch.Tensor, compiled: bool, autocast: torch.dtype | None = None) -> Step:
    """One step of vitpipe's MAE with its fused AdamW; ``autocast``: the forward pass under autocast to it."""
    torch.manual_seed(0)
    model = MAE(cfg)
    if compiled:
        compile_blocks(model)
    opt, _ = build_optimizer(model, OptimConfig(), imgs.shape[0], 100, 1)

    def step() -> None:
        with torch.autocast(imgs.device.type, autocast, enabled=autocast is not None):
            loss, _, _ = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def reference_step(enc: ViTConfig, dec: DecoderConfig, mask_ratio: float, imgs: torch.Tensor) -> Step:
    torch.manual_seed(0)
    model = ReferenceMAE(enc.image_size[0], enc.patch_size, enc.embed_dim, enc.depth, enc.num_heads,
                         dec.dim, dec.depth, dec.num_heads, mask_ratio)
    o = OptimConfig()
    opt = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.base_lr * imgs.shape[0] / 256, betas=o.betas)

    def step() -> None:
        model(imgs).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def timed(step: Step, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant first (compiles)")
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--no-compile", action="store_true", help="leave out the compiled variant")
    a = p.parse_args()
    enc = ViTConfig(size=a.size, image_size=(a.image, a.image), patch_size=a.patch)
    dec = DecoderConfig()
    imgs = torch.randn(a.batch, 3, a.image, a.image)
    cfg = MAEConfig(encoder=enc, decoder=dec, mask_ratio=a.mask_ratio)
    variants: dict[str, Step] = {
        "reference MAE (timm Blocks)": reference_step(enc, dec, a.mask_ratio, imgs),
        "vitpipe MAE, eager": vitpipe_step(cfg, imgs, compiled=False),
    }
    if not a.no_compile:
        variants["vitpipe MAE, compiled blocks"] = vitpipe_step(cfg, imgs, compiled=True)
    variants["vitpipe, encoder with mask tokens"] = vitpipe_step(
        MAEConfig(encoder=enc, decoder=dec, mask_ratio=a.mask_ratio, encoder_mask_tokens=True), imgs, False)
    for name, step in variants.items():
        start = time.perf_counter()
        for _ in range(a.warmup):
            step()
        print(f"  warm-up of {name}: {time.perf_counter() - start:.1f} s", flush=True)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(a.rounds):
        for name, step in variants.items():
            seconds[name].append(timed(step, a.steps))
    rate = {name: a.batch * a.steps / statistics.median(s) for name, s in seconds.items()}
    ref = rate["reference MAE (timm Blocks)"]
    print(f"MAE ViT-{a.size}/{a.patch} @ {a.image}px, batch {a.batch}, mask {a.mask_ratio}, decoder "
          f"{dec.depth}x{dec.dim}, {torch.get_num_threads()} CPU threads, fp32, forward+backward+AdamW; median of "
          f"{a.rounds} alternating rounds of {a.steps} steps")
    print(f"  {'variant':36s} {'images/s':>9s} {'vs reference':>13s}")
    for name, ips in rate.items():
        print(f"  {name:36s} {ips:9.2f} {ips / ref:12.2f}x")
    print(f"  speed-up of the visible-only encoder over mask tokens: "
          f"{rate['vitpipe MAE, eager'] / rate['vitpipe, encoder with mask tokens']:.2f}x")


if __name__ == "__main__":
    main()
