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
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Segment:
    """Samples ``start`` (inclusive) to ``stop`` (exclusive), in tar order, of shard ``shard``."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Phase:
    """A stretch of an epoch read under one layout before a resume changed it: every rank had used
    ``consumed`` batches of ``batch_size``, read by ``num_workers`` workers with shuffle windows ``window``."""

    world_size: int
    batch_size: int
    num_workers: int
    window: int
    consumed: int


@dataclass(frozen=True)
class EpochPlan:
    shard_sizes: tuple[int, ...]
    epoch: int
    seed: int
    world_size: int
    batch_size: int
    shuffle: bool = True
    phases: tuple[Phase, ...] = ()
    """Earlier layouts of this epoch: this plan covers only what they left unread (``remaining``)."""
    _positions: list[int] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def total(self) -> int:
        return sum(self.shard_sizes)

    @property
    def available(self) -> int:
        """Positions this plan deals out: the whole epoch, or what earlier phases left of it."""
        return self.total if not self.phases else len(self.remaining())

    @property
    def batches_per_rank(self) -> int:
        return self.available // (self.world_size * self.batch_size)

    def remaining(self) -> list[int]:
        """Positions of the rotated sequence not consumed by the earlier phases, in sequence order."""
        if self._positions is None:
            left = list(range(self.total))
            for i, ph in enumerate(self.phases):
                earlier = EpochPlan(self.shard_sizes, self.epoch, self.seed, ph.world_size, ph.batch_size,
                                    self.shuffle, self.phases[:i])
                used = set(earlier.consumed_positions(ph.consumed, ph.num_workers, ph.window))
                left = [p for p in left if p not in used]
            object.__setattr__(self, "_positions", left)
        return self._positions

    def consumed_positions(self, consumed: int, num_workers: int, window: int) -> list[int]:
        """Positions delivered by the first ``consumed`` batches of every rank under this plan."""
        out = []
        k = max(num_workers, 1)
        per_worker = consumed_per_worker(consumed, k)
        for rank in range(self.world_size):
            rank_start = rank * self.batches_per_rank * self.batch_size
            for worker, (first, _) in enumerate(self.worker_batches(k)):
                order = self.worker_order(rank, worker, k, window)[: per_worker[worker] * self.batch_size]
                out.extend(self._position(rank_start + first * self.batch_size + j) for j in order)
        return out

    def _position(self, index: int) -> int:
        return self.remaining()[index] if self.phases else index

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
        """Segments covering entries [start, start + count) of what this plan deals out."""
        if self.phases:
            return self._segments_of(self.remaining()[start: start + count])
        return self._rotated_segments(start, count)

    def _segments_of(self, positions: list[int]) -> list[Segment]:
        """Runs of consecutive positions (of the rotated sequence) as shard segments, in the given order."""
        out: list[Segment] = []
        i = 0
        while i < len(positions):
            j = i + 1
            while j < len(positions) and positions[j] == positions[j - 1] + 1:
                j += 1
            out.extend(self._rotated_segments(positions[i], j - i))
            i = j
        return out

    def _rotated_segments(self, start: int, count: int) -> list[Segment]:
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
