"""Per-process peak memory and seconds per optimizer step of MAE ViT-L/16 under DDP, ZeRO-2 and ZeRO-3.

Each strategy trains the built-in recipe ``mae/vit_large16`` in fp32 (``32-true``) on 2 CPU processes
started by torchrun (one intra-op thread each), through the same ``pretrain`` stage as a real run:
Fashion-MNIST shards (28x28, resized to 224 by the recipe's transform), checkpoints off, MLflow in a local
SQLite file. A callback in each process records the wall time of every optimizer step and the peak
resident set size (``ru_maxrss``: the training process, not its DataLoader workers); the table shows
both per strategy with their ratios to DDP.

    python benchmarks/zero_memory.py --steps 4 --batch-per-process 2

glibc raises its mmap threshold (up to 32 MiB) each time a large block is freed; freed per-layer buffers
then stay in the heap as fragments. ZeRO-3 gathers and frees every layer's parameters each step, so its
RSS grows with that fragmentation rather than with what it holds (ViT-L under ZeRO-3: 8.7 GiB after the
first step and still rising, against 6.9 GiB with a fixed threshold). The workers therefore run with a
fixed threshold (``--mmap-threshold``; 0 keeps glibc's behaviour).

``zero3`` runs the recipe's ZeRO settings (DeepSpeed's defaults: ``stage3_max_reuse_distance`` 1e9 keeps the
whole model gathered through the forward after the first step, ``sub_group_size`` 1e9 makes Adam step each
rank's partition as one flat group with partition-sized temporaries, 2e8-element buckets). ``zero3-lean``
sets them for memory (``LEAN`` below), which is what a model too large for DDP wants.
The first DeepSpeed run on a machine compiles a small C++ op (about 40 s, cached afterwards).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FMNIST = "/usr/share/datasets/fashion-mnist"
NPROC = 2
# name -> (trainer.strategy, zero overrides); "zero3-lean" trades speed for memory with the ZeRO-3 settings
# that bound what is gathered and how large the optimizer's temporaries get.
LEAN = {"zero.reduce_bucket_size": "50000000", "zero.allgather_bucket_size": "50000000",
        "zero.sub_group_size": "50000000", "zero.stage3_max_live_parameters": "50000000",
        "zero.stage3_max_reuse_distance": "0"}
STRATEGIES = {"ddp": ("ddp", {}), "zero2": ("deepspeed", {"zero.stage": "2"}),
              "zero3": ("deepspeed", {"zero.stage": "3"}), "zero3-lean": ("deepspeed", {"zero.stage": "3", **LEAN})}


def write_shards(out: Path, n_train: int, n_val: int = 64) -> None:
    from pipeline.data.sharding import write_split
    from pipeline.data.sources import FashionMNISTSource

    for split, n in (("train", n_train), ("val", n_val)):
        if not (out / split / "manifest.json").exists():
            source = FashionMNISTSource(FMNIST, split, limit=n)
            write_split(source, source.items(), str(out / split), split, shard_size=100, log=lambda _: None)


def worker(a: argparse.Namespace) -> None:
    """One torchrun process: train ``a.steps`` steps under ``a.strategy``, write its figures as JSON."""
    import lightning as L
    import torch

    from pipeline.recipe import load_recipe
    from pipeline.stages.train import train as pretrain

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module):
            self.stamps = [time.perf_counter()]

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.stamps.append(time.perf_counter())  # CPU ops are synchronous: the step is done here

        def on_train_end(self, trainer, pl_module):
            engine = getattr(trainer.strategy, "deepspeed_engine", None)
            out = {"rank": trainer.global_rank,
                   "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,  # KiB on Linux
                   "step_s": [b - a_ for a_, b in zip(self.stamps, self.stamps[1:])],
                   "stage": engine.zero_optimization_stage() if engine else None,
                   # a ZeRO-3 parameter is an empty placeholder; ds_numel is its full size
                   "params": sum(getattr(p, "ds_numel", p.numel()) for p in pl_module.parameters()),
                   "threads": torch.get_num_threads()}
            Path(a.workdir, f"{a.strategy}-rank{trainer.global_rank}.json").write_text(json.dumps(out))

    kind, zero = STRATEGIES[a.strategy]
    work, batch = Path(a.workdir), a.batch_per_process
    overrides = {
        "trainer.accelerator": "cpu", "trainer.devices": str(NPROC), "trainer.num_nodes": "1",
        "trainer.precision": "32-true", "trainer.strategy": kind,
        "trainer.global_batch": str(NPROC * batch), "trainer.micro_batch": str(batch),
        "trainer.max_epochs": "null", "trainer.max_steps": str(a.steps), "optim.warmup_steps": "1",
        "data.train": str(work / "shards" / "train"), "data.val": str(work / "shards" / "val"),
        "data.num_workers": "1", "data.interleave": "4",
        # a ViT-L checkpoint is GBs and its writing is not what is measured
        "checkpoint.enabled": "false", "checkpoint.dir": str(work / f"ckpt-{a.strategy}"),
        "tracking.uri": f"sqlite:///{work / 'mlflow.db'}", "tracking.experiment": "zero-memory-benchmark",
        "tracking.recon_every_n_steps": "0", "tracking.system_metrics_every_n_steps": "0",
        "register.name": "null", **zero,
    }
    pretrain(load_recipe("mae/vit_large16", overrides), resume="none", extra_callbacks=[Probe()])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(a: argparse.Namespace, strategy: str) -> list[dict]:
    """Run one strategy under torchrun; its output goes to <workdir>/<strategy>.log."""
    work = Path(a.workdir)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(NPROC),
           "--master-port", str(free_port()), __file__, "--worker", strategy, "--workdir", str(work),
           "--steps", str(a.steps), "--batch-per-process", str(a.batch_per_process)]
    env = dict(os.environ)
    if a.mmap_threshold:
        env["MALLOC_MMAP_THRESHOLD_"] = str(a.mmap_threshold)
    log = work / f"{strategy}.log"
    files = [work / f"{strategy}-rank{r}.json" for r in range(NPROC)]
    for stale in files:  # from an earlier run in the same workdir
        stale.unlink(missing_ok=True)
    with log.open("w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
    if rc or not all(p.exists() for p in files):
        tail = "\n".join(log.read_text().splitlines()[-40:])
        sys.exit(f"{strategy}: torchrun exited {rc}; last lines of {log}:\n{tail}")
    return [json.loads(p.read_text()) for p in files]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per strategy; the first is warm-up")
    p.add_argument("--batch-per-process", type=int, default=2)
    p.add_argument("--mmap-threshold", type=int, default=128 * 1024,
                   help="bytes; larger blocks are mmapped and returned when freed (0: glibc default)")
    p.add_argument("--workdir", default=None, help="shards, logs and results (default: a temp folder)")
    p.add_argument("--worker", choices=sorted(STRATEGIES), dest="strategy", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.steps < 2:
        p.error("--steps must be >= 2: the first step is warm-up and not timed")
    a.workdir = a.workdir or tempfile.mkdtemp(prefix="vitpipe-zero-")
    if a.strategy:
        return worker(a)

    work = Path(a.workdir)
    # enough images that no run crosses an epoch boundary (a loader restart would land inside a step)
    write_shards(work / "shards", max(256, NPROC * a.batch_per_process * (a.steps + 1)))
    results = {}
    for name in STRATEGIES:
        start = time.perf_counter()
        results[name] = launch(a, name)
        print(f"{name}: done in {time.perf_counter() - start:.0f} s", flush=True)

    first = results["ddp"][0]
    print(f"\nMAE ViT-L/16 ({first['params'] / 1e6:.1f}M params), fp32, {NPROC} CPU processes x batch "
          f"{a.batch_per_process}, {first['threads']} thread(s) each; s/step: median of steps 2..{a.steps}; "
          f"mmap threshold {a.mmap_threshold or 'glibc default'}")
    ranks = "  ".join(f"rank {r}" for r in range(NPROC))
    print(f"{'strategy':10s} {'stage':>5s}  peak RSS GiB: {ranks}  {'s/step':>7s}  {'peak vs DDP':>11s}  "
          f"{'s/step vs DDP':>13s}")
    summary = {}
    for name, per_rank in results.items():
        peaks = [r["peak_rss_kib"] / 2**20 for r in per_rank]
        step = statistics.median(s for r in per_rank for s in r["step_s"][1:])
        summary[name] = (max(peaks), step)
        stage = per_rank[0]["stage"] or "-"
        cols = "  ".join(f"{g:6.2f}" for g in peaks)
        peak_r, step_r = max(peaks) / summary["ddp"][0], step / summary["ddp"][1]
        print(f"{name:10s} {stage:>5}  {'':14s}{cols}  {step:7.2f}  {peak_r:10.2f}x  {step_r:12.2f}x")
    print(f"(peak vs DDP compares the larger rank of each; logs and per-rank JSON in {work})")


if __name__ == "__main__":
    main()
