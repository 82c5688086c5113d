"""MAE training throughput, peak memory and MFU on one GPU with DeepSpeed ZeRO-2 in bf16, with and
without activation checkpointing.

Each configuration runs in its own process (a clean CUDA context and peak-memory counter) through the
same Lightning task and DeepSpeed strategy the pretrain stage uses; only the data is synthetic and lives
on the GPU, so the figures are the model's and the strategy's, not the loader's.

    python benchmarks/mae_gpu_zero.py --size large --patch 16 --batch 128 --steps 30 --warmup 8

MFU = model FLOPs per step / step time / peak bf16 FLOP/s. Model FLOPs follow pipeline.models.flops:
encoder on the visible tokens only, decoder on all tokens, training = 3 x forward; the re-computation of
activation checkpointing is not counted (it is hardware work, not model work).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Dense bf16 tensor-core peaks (FLOP/s) of the SXM parts.
PEAK_BF16 = {"H100": 989.4e12, "H200": 989.4e12, "A100": 312e12}
CONFIGS = {"zero2": False, "zero2+act-ckpt": True}


def model_config(a: argparse.Namespace):
    from pipeline.models import DecoderConfig, MAEConfig, ViTConfig

    enc = ViTConfig(size=a.size, image_size=(a.image, a.image), patch_size=a.patch)
    return MAEConfig(encoder=enc, decoder=DecoderConfig(), mask_ratio=a.mask_ratio)


def run_one(a: argparse.Namespace, act_ckpt: bool) -> dict:
    """Train ``warmup + steps`` steps in this process; time the last ``steps``."""
    import lightning as L
    import torch

    from pipeline.distributed import ZeroConfig, build_strategy
    from pipeline.models.block_options import set_activation_checkpointing
    from pipeline.tasks import MAEPretrainTask, OptimConfig, Schedule

    class OnDeviceImages(MAEPretrainTask):
        """The pretrain task fed one fixed random batch that already lives on the GPU."""

        imgs: torch.Tensor | None = None

        def training_step(self, batch, batch_idx):
            if self.imgs is None:  # the engine's parameter dtype (bf16 under DeepSpeed bf16)
                dtype = next(self.model.parameters()).dtype
                self.imgs = torch.randn(a.batch, 3, a.image, a.image, device=self.device, dtype=dtype)
            return super().training_step({"image": self.imgs}, batch_idx)

        def on_train_batch_end(self, outputs, batch, batch_idx):
            torch.cuda.synchronize()
            self.stamps.append(time.perf_counter())

    total = a.warmup + a.steps
    task = OnDeviceImages(model_config(a), OptimConfig(warmup_steps=5),
                          Schedule(total_steps=total, warmup_steps=5, effective_batch=a.batch))
    task.stamps = []  # wall time at the end of each step, after the GPU has finished it
    set_activation_checkpointing(task.model, act_ckpt)
    trainer = L.Trainer(accelerator="gpu", devices=1, precision="bf16-mixed",
                        strategy=build_strategy("deepspeed", ZeroConfig(stage=2)), max_steps=total,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0)
    steps = torch.utils.data.DataLoader(range(total), batch_size=1)  # step indices; images come from the task
    torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=steps)
    t = task.stamps
    step_s = (t[-1] - t[a.warmup - 1]) / (len(t) - a.warmup)
    engine = trainer.strategy.deepspeed_engine
    return {"step_s": step_s, "images_per_s": a.batch / step_s,
            "peak_alloc_gib": torch.cuda.max_memory_allocated() / 2**30,
            "peak_reserved_gib": torch.cuda.max_memory_reserved() / 2**30,
            "zero_stage": engine.zero_optimization_stage(), "bf16": engine.bfloat16_enabled(),
            "last_loss": task.last_loss, "device": torch.cuda.get_device_name()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", default="large")
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--image", type=int, default=224)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--mask-ratio", type=float, default=0.75)
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak; default from the GPU's name")
    p.add_argument("--only", choices=sorted(CONFIGS), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.only:
        print("RESULT " + json.dumps(run_one(a, CONFIGS[a.only])), flush=True)
        return

    from pipeline.models.flops import mae_forward_flops, mae_train_flops_per_image

    cfg = model_config(a)
    per_image = mae_train_flops_per_image(cfg)
    parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in mae_forward_flops(cfg).items())
    print(f"MAE ViT-{a.size}/{a.patch} @ {a.image}px, mask {a.mask_ratio}, decoder 8x512, batch {a.batch}, "
          f"{a.steps} timed steps after {a.warmup}; DeepSpeed ZeRO-2, bf16")
    print(f"model FLOPs per image: forward GFLOP by part: {parts}; train step {per_image / 1e9:.1f} GFLOP")
    results = {}
    for name in CONFIGS:
        cmd = [sys.executable, __file__, *sys.argv[1:], "--only", name]
        out = subprocess.run(cmd, capture_output=True, text=True)
        line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
        if out.returncode or not line:
            print(f"{name}: failed (exit {out.returncode})\n{out.stderr[-4000:]}")
            continue
        results[name] = json.loads(line[-1][len("RESULT "):])
    if not results:
        sys.exit(1)
    device = next(iter(results.values()))["device"]
    peak = a.peak_tflops * 1e12 if a.peak_tflops else next(
        (v for k, v in PEAK_BF16.items() if k in device), None)
    print(f"device: {device}; bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else f"device: {device}; peak unknown")
    print(f"{'config':16s} {'img/s':>8s} {'s/step':>8s} {'peak alloc GiB':>15s} {'reserved GiB':>13s} "
          f"{'MFU':>6s} {'stage':>5s} {'loss':>7s}")
    for name, r in results.items():
        mfu = f"{per_image * r['images_per_s'] / peak:6.1%}" if peak else "   n/a"
        print(f"{name:16s} {r['images_per_s']:8.1f} {r['step_s']:8.4f} {r['peak_alloc_gib']:15.2f} "
              f"{r['peak_reserved_gib']:13.2f} {mfu} {r['zero_stage']:5d} {r['last_loss']:7.4f}")
    if len(results) == 2:
        plain, ckpt = results.values()
        print(f"activation checkpointing: memory x{ckpt['peak_alloc_gib'] / plain['peak_alloc_gib']:.2f}, "
              f"speed x{ckpt['images_per_s'] / plain['images_per_s']:.2f}")


if __name__ == "__main__":
    main()
