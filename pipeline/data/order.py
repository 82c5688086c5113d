"""The sample order of an epoch: a function of (seed, epoch, shard sizes, interleave) alone, never of the
world size, worker count or batch size. Pure arithmetic over numpy arrays; nothing grows with the number of
samples except the one span being read.

The order. The shards are permuted (seeded by seed and epoch) and cut into *spans* of ``interleave``
consecutive shards. Within a span the samples of its shards are merged: sample k of a shard of n samples
gets the key (k + u) / n with u uniform in [0, 1), and the span's samples are taken in key order. Each shard
is thus spread evenly over its whole span (every stretch of the span mixes all of its shards, so batches mix
even when each shard holds one class), while a shard's own samples keep their tar order, so any stretch of
the span reads each shard as one contiguous run. The epoch is the spans one after the other.

Consumption. Global step t of a layout with W ranks and B samples per rank takes the W * B positions after
the ``consumed`` ones; rank r takes B of them, the r-th run. The samples consumed at any step boundary are
therefore a prefix of the order, and a resume on any layout (any world size, batch or worker count, no
divisibility required) continues from one number: the positions consumed this epoch. Fewer than W * B
positions are left at an epoch's end and skipped for that epoch (the permutation makes them others the next).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

_SHARDS, _SPAN = 0x5348, 0x5350  # stream tags of the generators: the shard permutation, one span's merge


@dataclass(frozen=True)
class Run:
    """Positions ``start`` (inclusive) to ``stop`` (exclusive), in tar order, of shard ``shard``."""

    shard: int
    start: int
    stop: int

    def __len__(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class EpochOrder:
    """The order of one epoch over shards of ``shard_sizes`` positions (samples x repeats)."""

    shard_sizes: tuple[int, ...]
    seed: int
    epoch: int
    shuffle: bool = True
    interleave: int = 32
    """Shards merged per span (1, or ``shuffle`` off: each shard read whole, one after the other)."""
    _spans: tuple[np.ndarray, np.ndarray] | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def total(self) -> int:
        return int(sum(self.shard_sizes))

    def _layout(self) -> tuple[np.ndarray, np.ndarray]:
        """(shards in epoch order [S], first position of each span [spans + 1]): O(number of shards)."""
        if self._spans is None:
            n = len(self.shard_sizes)
            order = (np.random.default_rng([self.seed, self.epoch, _SHARDS]).permutation(n) if self.shuffle
                     else np.arange(n))
            width = self.width
            sizes = np.asarray(self.shard_sizes, dtype=np.int64)[order]
            per_span = np.add.reduceat(sizes, np.arange(0, n, width)) if n else np.zeros(0, dtype=np.int64)
            starts = np.concatenate([[0], np.cumsum(per_span)]).astype(np.int64)
            object.__setattr__(self, "_spans", (order, starts))
        return self._spans

    @property
    def width(self) -> int:
        return max(self.interleave, 1) if self.shuffle else 1

    def span_shards(self, span: int) -> np.ndarray:
        order, _ = self._layout()
        return order[span * self.width: (span + 1) * self.width]

    def span(self, span: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard [L], position within the shard [L]) of each of the span's L positions, in epoch order."""
        shards = tuple(int(s) for s in self.span_shards(span))
        return _merge(shards, tuple(self.shard_sizes[s] for s in shards), self.seed, self.epoch, span, self.shuffle)

    def positions(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard, position in shard) of the epoch's positions [start, start + count), in order."""
        _, starts = self._layout()
        if not 0 <= start <= start + count <= self.total:
            raise IndexError(f"positions [{start}, {start + count}) outside the epoch's {self.total}")
        shards, offsets = [], []
        span = int(np.searchsorted(starts, start, side="right")) - 1
        while count > 0:
            sh, off = self.span(span)
            lo = start - int(starts[span])
            take = min(count, len(sh) - lo)
            shards.append(sh[lo: lo + take])
            offsets.append(off[lo: lo + take])
            start, count, span = start + take, count - take, span + 1
        if not shards:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(shards), np.concatenate(offsets)

    def runs(self, start: int, count: int) -> list[Run]:
        """What positions [start, start + count) read: one run per shard and span (a shard's positions in any
        stretch of its span are contiguous), in the order of their first position."""
        shards, offsets = self.positions(start, count)
        out: dict[int, list[int]] = {}
        for s, k in zip(shards.tolist(), offsets.tolist()):
            lo_hi = out.setdefault(s, [k, k + 1])
            lo_hi[1] = k + 1
        return [Run(s, lo, hi) for s, (lo, hi) in out.items()]


@lru_cache(maxsize=4)
def _merge(shards: tuple[int, ...], sizes: tuple[int, ...], seed: int, epoch: int, span: int, shuffle: bool,
           ) -> tuple[np.ndarray, np.ndarray]:
    """The span's stratified merge (see the module doc); kept for the next few lookups, which usually fall
    in the same span."""
    shard = np.repeat(np.asarray(shards, dtype=np.int64), sizes)  # [L]
    offset = np.concatenate([np.arange(n, dtype=np.int64) for n in sizes]) if sizes else np.zeros(0, np.int64)
    if not shuffle or len(shards) == 1:
        return shard, offset
    u = np.random.default_rng([seed, epoch, _SPAN, span]).random(len(shard))
    key = (offset + u) / np.repeat(np.asarray(sizes, dtype=np.float64), sizes)
    idx = np.argsort(key, kind="stable")
    return shard[idx], offset[idx]


@dataclass(frozen=True)
class Layout:
    """How a stretch of an epoch is consumed: ``world_size`` ranks, ``batch_size`` positions per rank and step."""

    world_size: int
    batch_size: int

    @property
    def step_size(self) -> int:
        return self.world_size * self.batch_size

    def steps(self, total: int, consumed: int) -> int:
        """Whole steps left in an epoch of ``total`` positions after ``consumed``."""
        return max(total - consumed, 0) // self.step_size

    def batch_start(self, consumed: int, step: int, rank: int) -> int:
        """First epoch position of ``rank``'s batch at ``step`` steps after ``consumed``."""
        return consumed + step * self.step_size + rank * self.batch_size

