"""MAE train-step throughput: encoder on visible patches only vs an encoder that also processes mask tokens.

The MAE paper (Sec. 4, "Training cost") attributes a ~3x or larger speed-up to skipping mask tokens in the
encoder. This runs both variants of the same model side by side and prints images/s and their ratio.

    python benchmarks/mae_step.py --size base --patch 16 --image 224 --batch 8 --steps 3
"""
from __future__ import annotations

import argparse
import time

import torch

from pipeline.models import MAE, DecoderConfig, MAEConfig, ViTConfig
from pipeline.tasks.config import OptimConfig
from pipeline.tasks.optim import build_optimizer


def images_per_s(cfg: MAEConfig, batch: int, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    model = MAE(cfg)
    opt, _ = build_optimizer(model, OptimConfig(), batch, 100, 1)
    imgs = torch.randn(batch, 3, *cfg.encoder.image_size)
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss, _, _ = model(imgs)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return batch * steps / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="base")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    a = p.parse_args()
    enc = ViTConfig(size=a.size, image_size=(a.image, a.image), patch_size=a.patch)
    results = {}
    for name, mask_tokens in (("visible-only encoder (MAE)", False), ("encoder with mask tokens", True)):
        cfg = MAEConfig(encoder=enc, decoder=DecoderConfig(), mask_ratio=a.mask_ratio, encoder_mask_tokens=mask_tokens)
        results[name] = images_per_s(cfg, a.batch, a.steps, a.warmup)
    print(f"MAE ViT-{a.size}/{a.patch} @ {a.image}px, batch {a.batch}, mask {a.mask_ratio}, decoder 8x512, "
          f"{torch.get_num_threads()} CPU threads, fp32, forward+backward+AdamW")
    for name, ips in results.items():
        print(f"  {name:30s} {ips:8.2f} images/s")
    a_, b_ = results.values()
    print(f"  speed-up of the visible-only encoder: {a_ / b_:.2f}x")


if __name__ == "__main__":
    main()
