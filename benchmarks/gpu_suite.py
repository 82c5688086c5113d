"""The GPU efficiency suite: vitpipe's real training path (recipe -> plan -> objective -> Lightning fit, with
its Throughput, data-wait and MLflow tracking to a local SQLite store) on synthetic JPEG shards it writes first,
one table row per configuration: images/s, MFU, peak memory, data-wait fraction; then the top operators of a
profiled step of the fastest MAE configuration.

Rows: MAE ViT-L/16 model only (batches decoded once, then replayed from memory: what the model and the
training loop reach without the loader) at each ``--batches`` size, and through the loader at the fastest of
them (GPU decode where a GPU is; the epoch spans the row, so no loader restarts inside it), again without the
guard and, last, under the recipe's ZeRO-2 (on one device: what DeepSpeed's step costs); DeiT-B/16 model only
(no teacher). All in bf16-mixed. Throughput leaves out the first logging window (compilation, allocator
warm-up), as a run's summary does. Each row starts from a collected heap and an emptied CUDA cache, and compiles
static shapes (each batch its own kernels, not a dynamic-shape graph left by the row before). Each row's figures
are printed as it ends, the table and the profiles of the fastest model-only MAE row and of the ZeRO-2 row (its
GPU busy share, its host waits) at the end.

``--cpu-smoke`` runs the same steps with tiny models on the CPU (bf16 there too), in seconds: the suite's own
test.

    benchmarks/gpu_suite.sh [--wheels DIR] [--cpu-smoke]      # the script that installs what is missing first
    python benchmarks/gpu_suite.py [--batches 256,384] [--steps 40] [--window 10] [--no-compile] [--cpu-smoke]
"""
from __future__ import annotations

import argparse
import gc
import math
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.datamodule import ShardDataModule
from pipeline.objectives.registry import objective_of
from pipeline.recipe import RunRecipe, load_recipe
from pipeline.stages.shard import shard_image_folder
from pipeline.stages.train import fit, plan_run, train
from pipeline.tracking.callbacks import DataWait
from pipeline.tracking.step_profile import StepProfile
from pipeline.tracking.throughput import Throughput

TINY_VIT = {"model.encoder.size": "tiny", "model.encoder.depth": "2", "model.encoder.embed_dim": "64",
            "model.encoder.num_heads": "4", "model.encoder.image_size": "[32, 32]", "model.encoder.patch_size": "8"}
TINY_MAE = {**TINY_VIT, "model.decoder.depth": "1", "model.decoder.dim": "32", "model.decoder.num_heads": "4"}


def write_synthetic_jpegs(root: Path, n: int, size: int, classes: int = 10, workers: int = 1) -> None:
    """``n`` JPEG photos-like images (smooth colour fields plus noise, so they compress like photos) in
    ``classes`` class folders, a little larger than the crop as real photos are; image ``i`` is the same for
    any number of ``workers`` (processes: about 13 ms an image on one core)."""
    for c in range(classes):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    jobs = [(root, i, size, classes) for i in range(n)]
    if workers <= 1:
        for job in jobs:
            _write_jpeg(*job)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(_write_jpeg, *zip(*jobs), chunksize=64))


def _write_jpeg(root: Path, i: int, size: int, classes: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(i)
    h, w = int(size * 1.25), int(size * 1.5)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    f = rng.uniform(1, 6, size=(3, 2))
    img = np.stack([np.sin(f[c, 0] * xx * 6.28 + f[c, 1] * yy * 6.28) for c in range(3)], -1) * 90 + 128
    img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(root / f"class{i % classes}" / f"{i:06d}.jpg", quality=90)


class InMemoryBatches(ShardDataModule):
    """The shard datamodule whose training loader replays its first ``keep`` batches: the model-only rows
    run the same transfer, normalisation and training step without waiting for decode."""

    keep = 4

    def train_dataloader(self) -> Any:
        batches = []
        for batch in super().train_dataloader():
            batches.append(batch)
            if len(batches) == self.keep:
                break
        return Replay(batches, self.trainer.max_steps * self.trainer.accumulate_grad_batches)

    def state_dict(self) -> dict[str, Any]:
        return {}


@dataclass
class Replay:
    batches: list[dict[str, Any]]
    length: int

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            yield self.batches[i % len(self.batches)]


class Collect(L.Callback):
    """The run's figures, steady state, after its ``measured`` steps (the two after them are the profiled one
    and one more, so that the profiled step is not the run's last): the Throughput windows after the first,
    data wait, peak memory."""

    def __init__(self, measured: int) -> None:
        self.measured = measured
        self.row: dict[str, Any] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int):
        if trainer.global_step == self.measured and not self.row:
            self._collect(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not self.row:
            self._collect(trainer)

    def _collect(self, trainer: L.Trainer) -> None:
        throughput = next(c for c in trainer.callbacks if isinstance(c, Throughput))
        wait = next(c for c in trainer.callbacks if isinstance(c, DataWait)).fraction()
        self.row = throughput.steady_figures(trainer.world_size) or {}
        self.row["data_wait"] = wait[0] / wait[1] if wait and wait[1] else None
        self.row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def overrides(args: argparse.Namespace, work: Path, batch: int, mae: bool, model_only: bool) -> dict[str, Any]:
    gpu = torch.cuda.is_available()
    out = {"data.train": str(work / "shards" / "train"), "data.val": str(work / "shards" / "train"),
           "data.num_workers": args.workers, "data.decode": "gpu" if not model_only else "cpu",
           "trainer.accelerator": "gpu" if gpu else "cpu", "trainer.devices": 1, "trainer.num_nodes": 1,
           "trainer.strategy": args.strategy, "trainer.precision": "bf16-mixed",  # also in the CPU smoke
           "trainer.global_batch": batch, "trainer.micro_batch": None, "trainer.max_steps": args.steps + 2,
           "trainer.log_every_n_steps": args.window, "trainer.compile": not args.no_compile,
           "checkpoint.enabled": False, "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
           "tracking.experiment": "vitpipe-gpu-suite", "register.name": None}
    if args.peak_tflops:
        out["trainer.peak_tflops"] = args.peak_tflops
    if mae:
        out["tracking.recon_every_n_steps"] = 0
    else:
        out.update({"model.num_classes": 10, "model.distill.kind": "none", "model.eval_limit": 64})
    if args.cpu_smoke:
        out.update(TINY_MAE if mae else TINY_VIT)
    return out


def run_row(recipe: RunRecipe, model_only: bool, profile: StepProfile | None) -> dict[str, Any]:
    """One row's figures. The row before leaves nothing behind: its model and optimizer are collected (peak
    memory is this row's; DeepSpeed's engine outlives its run, so its row comes last), and the process
    environment a launcher wrote (RANK, MASTER_ADDR...) is restored, so the next row's launcher is not taken
    for a cluster's."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    environ = dict(os.environ)
    collect = Collect(recipe.trainer.max_steps - 2)
    extra = [collect] + ([profile] if profile else [])
    start = time.perf_counter()
    try:
        if model_only:
            plan = plan_run(recipe, "none")
            dm = plan.datamodule
            plan.datamodule = InMemoryBatches(dm.cfg, dm.batch_size, dm.seed, dm.labelled, dm.num_classes)
            fit(recipe, plan, objective_of(recipe).build(recipe, plan), extra)
        else:
            train(recipe, resume="none", extra_callbacks=extra)
    finally:
        os.environ.clear()
        os.environ.update(environ)
    collect.row["wall_s"] = time.perf_counter() - start
    return collect.row


def row_line(name: str, batch: int, r: dict[str, Any]) -> str:
    return (f"| {name} | {batch} | {fmt(r.get('perf/images_per_s'), '.0f')} | "
            f"{fmt(r.get('perf/tflops_per_device'), '.1f')} | {fmt(r.get('perf/mfu'), '.1f', 100, ' %')} | "
            f"{fmt(r.get('peak_gib'), '.1f', unit=' GiB')} | {fmt(r.get('data_wait'), '.1f', 100, ' %')} | "
            f"{r['wall_s']:.0f} s |")


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for name in ("torch", "lightning", "timm", "deepspeed", "webdataset", "mlflow", "torchvision"):
        try:
            found.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            found.append(f"{name} missing")
    return f"Python {platform.python_version()}, " + ", ".join(found)


def fmt(value: Any, spec: str, scale: float = 1.0, unit: str = "") -> str:
    return "n/a" if value is None else format(value * scale, spec) + unit


def print_waits(profile: StepProfile, shown: int = 5) -> None:
    """The profiled step does not log: where it made the host wait for the device (on a GPU, every CUDA
    synchronisation; on a CPU, the reads of a value), with the Python frames of the first few."""
    waits = profile.device_waits() if torch.cuda.is_available() else profile.host_syncs()
    print(f"host waits for the device in that step (it does not log): {len(waits)}")
    for chain, _ in waits[:shown]:
        print("  " + " <- ".join(name for name in chain if "(" in name or name.startswith("aten::"))[:600])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batches", default="256,384", help="MAE ViT-L/16 per-GPU batches to try (model only)")
    p.add_argument("--deit-batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--window", type=int, default=10, help="logging window (throughput is measured over it)")
    p.add_argument("--images", type=int, default=4096, help="synthetic JPEGs to write")
    p.add_argument("--workers", type=int, default=12)
    p.add_argument("--strategy", default="auto", help="auto (one device), ddp or deepspeed")
    p.add_argument("--peak-tflops", type=float, default=None, help="default: from the GPU's name")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--workdir", default=None)
    p.add_argument("--cpu-smoke", action="store_true", help="tiny models on the CPU: checks the suite runs")
    args = p.parse_args()
    # Static shapes: a second batch size gets kernels of its own rather than turning the blocks' graph into a
    # dynamic-shape one that the later rows would run; the rows' models, shapes and dtypes need a few more
    # cache entries for the blocks' one forward than the default limit of 8.
    torch._dynamo.config.automatic_dynamic_shapes = False
    torch._dynamo.config.recompile_limit = 64
    if args.cpu_smoke:
        args.batches, args.deit_batch, args.steps, args.window, args.images, args.workers = "8", 8, 6, 2, 64, 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitpipe-gpu-suite-"))
    size = 32 if args.cpu_smoke else 224
    if not (work / "shards" / "train" / "manifest.json").exists():
        write_synthetic_jpegs(work / "photos", args.images, size, workers=max(1, args.workers))
        shard_image_folder(str(work / "photos"), str(work / "shards"), shard_size=512 if not args.cpu_smoke else 32,
                           workers=min(8, args.workers) or 1)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (smoke: tiny models)"
    title = (f"vitpipe GPU suite on {device}: bf16-mixed, strategy {args.strategy}, compile {not args.no_compile}, "
             f"{args.steps} steps per row, figures over the logging windows after the first ({args.window} steps "
             f"each)")
    print(f"{title}\n{versions()}", flush=True)
    mae_recipe, deit_recipe = "mae/vit_large16", "deit/deit_base16"
    rows: list[tuple[str, int, dict[str, Any]]] = []
    # each profiles the step after the last measured window, which does not log, and is not the run's last
    profiles: dict[str, StepProfile] = {}

    def row(name: str, batch: int, recipe: RunRecipe, model_only: bool, profiled: bool = False) -> str:
        """Runs and records the row; its profile's name ("<row>, batch <b>")."""
        key = f"{name}, batch {batch}"
        profile = StepProfile(first=args.steps) if profiled else None
        if profile:
            profiles[key] = profile
        rows.append((name, batch, run_row(recipe, model_only, profile)))
        print(f"gpu_suite: row done: {row_line(*rows[-1])}", flush=True)  # kept should a later row not end
        return key

    mae_rows = {batch: row("MAE ViT-L/16, model only", batch,
                           load_recipe(mae_recipe, overrides(args, work, batch, mae=True, model_only=True)), True,
                           profiled=True)
                for batch in (int(b) for b in args.batches.split(","))}
    best = max(rows, key=lambda r: r[2].get("perf/images_per_s", 0))[1]
    waits_shown = [mae_rows[best]]  # the profiles whose host waits are printed
    # the guard's cost (one gradient norm, shared with clipping; its flag on the device): the same row without it
    row("MAE ViT-L/16, model only, guard off", best,
        load_recipe(mae_recipe, {**overrides(args, work, best, mae=True, model_only=True),
                                 "trainer.guard.enabled": False}), True)
    # repeats: an epoch longer than the row, so the loader's workers start once, as in a long run
    repeats = math.ceil((args.steps + 2) * best / args.images) + 1
    row("MAE ViT-L/16, through the loader", best,
        load_recipe(mae_recipe, {**overrides(args, work, best, mae=True, model_only=False), "data.repeats": repeats}),
        False)
    row("DeiT-B/16, model only", args.deit_batch,
        load_recipe(deit_recipe, overrides(args, work, args.deit_batch, mae=False, model_only=True)), True)
    if args.strategy != "deepspeed":  # the recipe's own strategy, on one device: what DeepSpeed's step costs
        # last: DeepSpeed keeps its engine (fp32 masters, Adam moments) alive after the run, past any collection
        waits_shown.append(row("MAE ViT-L/16, model only, ZeRO-2", best,
                               load_recipe(mae_recipe, {**overrides(args, work, best, mae=True, model_only=True),
                                                        "trainer.strategy": "deepspeed", "zero.stage": 2}),
                               True, profiled=True))

    print(f"\n{title}")
    print("| row | batch | images/s | TFLOP/s | MFU | peak memory | data wait | wall |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch, r in rows:
        print(row_line(name, batch, r))
    for name, profile in profiles.items():  # below ~95 % with no host wait: the GPU waits on the host's work
        print(f"{name}: the GPU was busy for {fmt(profile.device_busy(), '.1f', 100, ' %')} of the profiled "
              f"step's host span")
    print(f"\ntop operators of one step (after the measured ones), {mae_rows[best]}:")
    print(profiles[mae_rows[best]].table(10))
    for name in waits_shown:
        print(f"\n{name}: ", end="")
        print_waits(profiles[name])


if __name__ == "__main__":
    main()
