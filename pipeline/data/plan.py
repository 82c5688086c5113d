"""The epoch plan: which samples each rank and loader worker reads, in which order. Pure arithmetic.

For epoch e, the shards are shuffled (seeded by seed and e) and concatenated into one sequence of N
samples, which is rotated by a seeded offset. Rank r takes the r-th contiguous run of ``batches * B``
samples, so every rank gets the same number of batches; the < W*B samples left over are dropped for this
epoch only (the rotation makes them different ones each epoch). Within a rank, worker w takes a contiguous
run of whole batches. A DataLoader hands out batches round-robin over workers, so rank batch i comes from
worker i % K: this is what makes a resume at the same world size and worker count exact.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Segment:
    """Samples ``start`` (inclusive) to ``stop`` (exclusive), in tar order, of shard ``shard``."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochPlan:
    shard_sizes: tuple[int, ...]
    epoch: int
    seed: int
    world_size: int
    batch_size: int
    shuffle: bool = True

    @property
    def total(self) -> int:
        return sum(self.shard_sizes)

    @property
    def batches_per_rank(self) -> int:
        return self.total // (self.world_size * self.batch_size)

    def rng(self, *parts: object) -> random.Random:
        return random.Random("/".join(str(p) for p in (self.seed, self.epoch, *parts)))

    def shard_order(self) -> list[int]:
        order = list(range(len(self.shard_sizes)))
        if self.shuffle:
            self.rng("shards").shuffle(order)
        return order

    def offset(self) -> int:
        return self.rng("offset").randrange(self.total) if self.shuffle and self.total else 0

    def _global_segments(self, start: int, count: int) -> list[Segment]:
        """Segments covering positions [start, start + count) of the rotated, concatenated sequence."""
        order = self.shard_order()
        bounds, pos = [], 0
        for s in order:
            bounds.append((s, pos, pos + self.shard_sizes[s]))
            pos += self.shard_sizes[s]
        out: list[Segment] = []
        begin = (start + self.offset()) % self.total if self.total else 0
        remaining = count
        while remaining > 0:
            for s, lo, hi in bounds:
                if lo <= begin < hi:
                    take = min(hi - begin, remaining)
                    out.append(Segment(s, begin - lo, begin - lo + take))
                    remaining -= take
                    begin = (begin + take) % self.total
                    break
        return out

    def rank_segments(self, rank: int) -> list[Segment]:
        n = self.batches_per_rank * self.batch_size
        return self._global_segments(rank * n, n)

    def worker_batches(self, num_workers: int) -> list[tuple[int, int]]:
        """[first batch, end batch) of each worker within a rank; the first ``nb % K`` get one extra."""
        nb, k = self.batches_per_rank, max(num_workers, 1)
        out, start = [], 0
        for w in range(k):
            n = nb // k + (1 if w < nb % k else 0)
            out.append((start, start + n))
            start += n
        return out

    def worker_segments(self, rank: int, worker: int, num_workers: int) -> list[Segment]:
        first, end = self.worker_batches(num_workers)[worker]
        rank_start = rank * self.batches_per_rank * self.batch_size
        n = (end - first) * self.batch_size
        return self._global_segments(rank_start + first * self.batch_size, n)

    def worker_order(self, rank: int, worker: int, num_workers: int, window: int) -> list[int]:
        """Emission order of a worker's samples: positions permuted within windows of ``window`` samples."""
        first, end = self.worker_batches(num_workers)[worker]
        n = (end - first) * self.batch_size
        order: list[int] = []
        for w0 in range(0, n, max(window, 1)):
            block = list(range(w0, min(w0 + max(window, 1), n)))
            if self.shuffle:
                self.rng("window", rank, worker, w0).shuffle(block)
            order.extend(block)
        return order


def consumed_per_worker(consumed: int, num_workers: int) -> list[int]:
    """How many of each worker's batches are among the first ``consumed`` batches of a rank."""
    k = max(num_workers, 1)
    return [max(0, (consumed - w + k - 1) // k) for w in range(k)]
