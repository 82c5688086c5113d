"""What planning a loader worker's share costs at internet scale: 1B samples in 100k shards, 1,024 ranks x 8
workers, then resumed 40 % into the epoch on 768 ranks, then again on 1,536.

A worker's plan is the epoch order's layout (the shard permutation and span bounds: O(shards)) and the
positions of its next batch (one span's merge: O(interleave x shard size)); nothing grows with the number of
samples. Each row is one worker of a random rank, timed and its allocations traced (tracemalloc peak,
numpy's included). Then, on a random subset of ranks, the batches of whole steps are checked: disjoint
across ranks and steps, valid (shard, sample) pairs, and each step's ranks together tile the step's stretch
of the order (coverage). Goal: every plan < 1 s and < 200 MB.

    python benchmarks/plan_scale.py [--shards 100000] [--per-shard 10000] [--batch 32]
"""
from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from pipeline.data.config import StreamConfig  # noqa: E402
from pipeline.data.order import EpochOrder, Layout, _merge  # noqa: E402


def plan_worker(sizes: tuple[int, ...], layout: Layout, consumed: int, rank: int, worker: int, workers: int
                ) -> tuple[float, float, np.ndarray]:
    """(seconds, peak MB, the (shard, sample) pairs of the worker's first batch) of planning from scratch."""
    _merge.cache_clear()  # from scratch, as a fresh worker process
    tracemalloc.start()
    t0 = time.perf_counter()
    order = EpochOrder(sizes, seed=0, epoch=0, interleave=StreamConfig().interleave)
    first = layout.batch_start(consumed, worker % workers, rank)  # its first step after the resume point
    shards, pos = order.positions(first, layout.batch_size)
    seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20
    tracemalloc.stop()
    return seconds, peak, np.stack([shards, pos], 1)


def check_steps(order: EpochOrder, layout: Layout, consumed: int, ranks: np.ndarray, steps: list[int]) -> None:
    """Disjointness and coverage of whole steps on a subset of ranks (all ranks' stretches by arithmetic)."""
    seen: set[tuple[int, int]] = set()
    for step in steps:
        starts = [layout.batch_start(consumed, step, r) for r in range(layout.world_size)]
        lo = consumed + step * layout.step_size
        assert starts[0] == lo and all(b - a == layout.batch_size for a, b in zip(starts, starts[1:]))
        assert starts[-1] + layout.batch_size == lo + layout.step_size  # the ranks tile the step's stretch
        for r in ranks:
            shards, pos = order.positions(starts[r], layout.batch_size)
            assert ((pos >= 0) & (pos < np.asarray(order.shard_sizes)[shards])).all()
            pairs = set(zip(shards.tolist(), pos.tolist()))
            assert len(pairs) == layout.batch_size and not pairs & seen, f"rank {r} step {step}: a repeat"
            seen |= pairs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shards", type=int, default=100_000)
    ap.add_argument("--per-shard", type=int, default=10_000)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--samples", type=int, default=6, help="workers timed per layout")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    # shard sizes around --per-shard (uneven on purpose), 1B samples at the defaults
    sizes = tuple(int(v) for v in rng.integers(args.per_shard * 9 // 10, args.per_shard * 11 // 10 + 1,
                                               args.shards))
    total = sum(sizes)
    order = EpochOrder(sizes, seed=0, epoch=0, interleave=StreamConfig().interleave)
    phases = [("start", 1024, 0.0), ("resume at 40 %", 768, 0.4), ("resume at 55 %", 1536, 0.55)]
    print(f"{total:,} samples in {len(sizes):,} shards, batch {args.batch} per rank, {args.workers} workers "
          f"per rank, interleave {order.interleave}\n")
    print("| layout | consumed | steps left | plan time (s), max of workers | tracemalloc peak (MB), max |")
    print("|---|---|---|---|---|")
    worst_s = worst_mb = 0.0
    for name, world, frac in phases:
        layout = Layout(world, args.batch)
        consumed = int(total * frac) // layout.step_size * layout.step_size if frac else 0
        times, peaks = [], []
        for _ in range(args.samples):
            rank, worker = int(rng.integers(world)), int(rng.integers(args.workers))
            seconds, peak, _ = plan_worker(sizes, layout, consumed, rank, worker, args.workers)
            times.append(seconds)
            peaks.append(peak)
        ranks = rng.choice(world, size=min(16, world), replace=False)
        steps = sorted(rng.choice(layout.steps(total, consumed), size=3, replace=False).tolist())
        check_steps(order, layout, consumed, ranks, steps)
        worst_s, worst_mb = max(worst_s, *times), max(worst_mb, *peaks)
        print(f"| {world} ranks, {name} | {consumed:,} | {layout.steps(total, consumed):,} | {max(times):.3f} | "
              f"{max(peaks):.1f} |")
    print(f"\ndisjoint and covering on {min(16, 1024)} random ranks x 3 random steps per layout: ok")
    print(f"worst plan: {worst_s:.3f} s, {worst_mb:.1f} MB (goal < 1 s and < 200 MB): "
          f"{'met' if worst_s < 1 and worst_mb < 200 else 'NOT met'}")


if __name__ == "__main__":
    main()
