"""The host's time per optimizer step of MAE ViT-L/16: the floor under a GPU's step time.

On a GPU the host queues a step's kernels while the device runs the ones before; a step that makes no host
synchronisation takes max(host time, device time). The device's share shrinks with the per-GPU batch (4096
images over 64 GPUs is 64 each; over 1,024 GPUs, 4), the host's does not: Python, the dispatcher, autograd,
Lightning, our callbacks and the strategy cost the same per step at any batch. Past the batch where the two
are equal, MFU falls in proportion.

The model is MAE ViT-L/16's operator graph (24 encoder blocks of 16 heads, an 8-block decoder, the same
operators in the same order) at width 64 (decoder 32), on 32 px images (four patches, one visible), batch 2: the
CPU's share of each operator is then negligible and what is timed is the host's work, on one thread (a GPU's
host computes none of it). Rows:

- bare loop: the model, bf16 autocast and fused AdamW, no framework: the floor of the model itself;
- vitpipe: the real training path (``fit``: Lightning, our callbacks, MLflow tracking to a local SQLite,
  batches replayed from memory), on one device ("auto"), under DDP and under ZeRO-2 (one process each);
- each eager and with ``trainer.compile`` (blocks compiled on their own).

Variants run in turn, round after round; each figure is the median over rounds of a steady-state window.
The last column is the per-GPU batch whose H100 compute, at 45 % MFU (the GPU suite's goal), takes as long as
this host's step: a smaller batch leaves the GPU waiting on the host. It scales with the host CPU's speed.

    python benchmarks/host_overhead.py [--rounds 3] [--steps 40] [--no-compile]
    python benchmarks/host_overhead.py --zero   # ZeRO-2's per-parameter loops: DeepSpeed's against zero_host's
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import overrides as suite_overrides
from gpu_suite import run_row, write_synthetic_jpegs
from mae_step import timed, vitpipe_step

from pipeline.console import quiet_third_party
from pipeline.models import MAE, MAEConfig
from pipeline.models.flops import mae_train_flops_per_image
from pipeline.recipe import load_recipe
from pipeline.stages.shard import shard_image_folder

RECIPE = "mae/vit_large16"
# ViT-L/16's depth, heads and decoder depth, every width shrunk: the operator graph of the recipe's model
NARROW = {"model.encoder.embed_dim": "64", "model.decoder.dim": "32", "model.encoder.image_size": "[32, 32]"}
BATCH = 2
H100_BF16, GOAL_MFU = 989e12, 0.45
STRATEGIES = {"auto": {"trainer.strategy": "auto"}, "DDP": {"trainer.strategy": "ddp"},
              # DeepSpeed's default: each gradient copied into a bucket buffer as autograd makes it
              "ZeRO-2, contiguous_gradients on": {"trainer.strategy": "deepspeed", "zero.stage": 2,
                                                  "zero.contiguous_gradients": True},
              # the recipe's: gradients reduced from where autograd left them
              "ZeRO-2 (recipe: contiguous_gradients off)": {"trainer.strategy": "deepspeed", "zero.stage": 2}}


def bare_loop(cfg: MAEConfig, compiled: bool, steps: int) -> Callable[[], float]:
    """Seconds per step of the model alone: bf16 autocast forward, backward, fused AdamW (``mae_step``'s step)."""
    step = vitpipe_step(cfg, torch.randn(BATCH, 3, *cfg.encoder.image_size), compiled, autocast=torch.bfloat16)

    def run() -> float:
        for _ in range(3):  # warm-up (compiles)
            step()
        return timed(step, steps) / steps
    return run


def vitpipe_fit(work: Path, strategy: dict[str, object], compiled: bool, steps: int) -> Callable[[], float]:
    """Seconds per step of the real training path, over the steady logging windows (the first left out)."""
    def run() -> float:
        args = argparse.Namespace(workers=0, strategy="auto", steps=steps, window=10, no_compile=not compiled,
                                  peak_tflops=None, cpu_smoke=False)
        o = {**suite_overrides(args, work, BATCH, mae=True, model_only=True), **NARROW, **strategy}
        row = run_row(load_recipe(RECIPE, o), True, None)
        return BATCH / row["perf/images_per_s"]
    return run


def zero_rows(cfg: MAEConfig, rounds: int, calls: int = 20) -> None:
    """Host time of ZeRO-2's per-parameter loops of a step, DeepSpeed's against ``zero_host``'s, alternating, in
    one process: after a backward pass of the model, the gradient norm and the re-pointing of the weights at the
    flat buffer; inside a backward, the count of the parameters it reaches (its gradient hooks' first)."""
    import os

    import deepspeed
    from deepspeed.runtime.utils import count_used_parameters_in_backward

    from pipeline.distributed import zero_host

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ.get("MASTER_PORT", "29533"), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = MAE(cfg)
    config = {"train_micro_batch_size_per_gpu": BATCH, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
              "zero_optimization": {"stage": 2, "contiguous_gradients": False}, "zero_allow_untested_optimizer": True}
    engine, zero, _, _ = deepspeed.initialize(model=model, config=config,
                                              optimizer=torch.optim.AdamW(model.parameters(), fused=True))
    images = torch.randn(BATCH, 3, *cfg.encoder.image_size, dtype=torch.bfloat16)
    engine.backward(engine(images)[0])
    loops = {"gradient norm": zero.scaled_global_norm,
             "weights re-pointed": lambda: [zero._update_model_bit16_weights(i) for i in range(len(zero.bit16_groups))]}
    times: dict[tuple[str, str], list[float]] = {}
    norms = {}
    for _ in range(rounds):
        for whose in ("DeepSpeed", "zero_host"):
            for attr in ("get_grad_norm_direct", "_update_model_bit16_weights"):
                zero.__dict__.pop(attr, None)  # the class's methods
            if whose == "zero_host":
                zero_host.install(zero)
            for loop, call in loops.items():
                start = time.perf_counter()
                for _ in range(calls):
                    out = call()
                times.setdefault((loop, whose), []).append((time.perf_counter() - start) / calls)
                if loop == "gradient norm":
                    norms[whose] = float(out)
    engine.step()

    params = [p for group in zero.bit16_groups for p in group if p.requires_grad]
    counters = {"DeepSpeed": lambda: count_used_parameters_in_backward(params),
                "zero_host": zero_host.UsedParameterCount(params)}
    counts = {}

    def in_backward(grad: torch.Tensor) -> None:  # a hook on the images: it runs inside the backward pass
        for whose, count in counters.items():
            start = time.perf_counter()
            for _ in range(calls):
                counts[whose] = count()
            times.setdefault(("used-parameter count", whose), []).append((time.perf_counter() - start) / calls)

    for _ in range(rounds):  # a forward and backward of the model per round, as in training
        x = images.clone().requires_grad_()
        x.register_hook(in_backward)
        engine.backward(engine(x)[0])
        engine.step()
    n = len(params)
    print(f"\nZeRO-2's per-parameter loops over {n} parameters, host ms per step, median of {rounds} alternating "
          f"rounds (gradient norm: DeepSpeed's {norms['DeepSpeed']:.6f}, zero_host's {norms['zero_host']:.6f}; "
          f"parameters counted: DeepSpeed {counts['DeepSpeed']}, zero_host {counts['zero_host']})")
    print("| loop | DeepSpeed | zero_host |\n|---|---|---|")
    for loop in (*loops, "used-parameter count"):
        ms = [statistics.median(times[loop, whose]) * 1e3 for whose in ("DeepSpeed", "zero_host")]
        print(f"| {loop} | {ms[0]:.2f} | {ms[1]:.2f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40, help="steps per run (vitpipe: four logging windows of 10)")
    p.add_argument("--no-compile", action="store_true", help="eager rows only")
    p.add_argument("--workdir", default=None)
    p.add_argument("--zero", action="store_true", help="only ZeRO-2's per-parameter loops, DeepSpeed's and ours")
    a = p.parse_args()
    torch.set_num_threads(1)
    quiet_third_party()
    if a.zero:
        zero_rows(load_recipe(RECIPE, NARROW).model, max(a.rounds, 7))
        return
    work = Path(a.workdir or tempfile.mkdtemp(prefix="vitpipe-host-overhead-"))
    if not (work / "shards" / "train" / "manifest.json").exists():
        write_synthetic_jpegs(work / "photos", 16 * BATCH, 32)
        shard_image_folder(str(work / "photos"), str(work / "shards"), shard_size=16, workers=1)
    recipe = load_recipe(RECIPE, NARROW)
    narrow: MAEConfig = recipe.model
    flops = mae_train_flops_per_image(load_recipe(RECIPE).model)  # the real ViT-L/16's, for the last column

    modes = [False] if a.no_compile else [False, True]
    rows: dict[str, Callable[[], float]] = {}
    for compiled in modes:
        tag = ", compiled blocks" if compiled else ""
        rows[f"bare loop{tag}"] = bare_loop(narrow, compiled, a.steps)
        for name, strategy in STRATEGIES.items():
            rows[f"vitpipe, {name}{tag}"] = vitpipe_fit(work, strategy, compiled, a.steps)
    times: dict[str, list[float]] = {name: [] for name in rows}
    for r in range(a.rounds):
        for name, run in rows.items():
            times[name].append(run())
            print(f"round {r + 1}: {name}: {times[name][-1] * 1e3:.1f} ms", flush=True)

    base = statistics.median(times["bare loop"])
    print(f"\nhost time per optimizer step, MAE ViT-L/16's operators at width 64, batch {BATCH}, bf16 autocast, "
          f"one thread; median of {a.rounds} alternating rounds")
    print("| path | ms per step | vs bare eager loop | H100 batch at 45 % MFU that takes as long |")
    print("|---|---|---|---|")
    for name, ts in times.items():
        s = statistics.median(ts)
        batch = s * GOAL_MFU * H100_BF16 / flops
        print(f"| {name} | {s * 1e3:.1f} | {s / base:.2f}x | {batch:.0f} |")


if __name__ == "__main__":
    main()
