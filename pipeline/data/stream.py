"""The streaming loader: WebDataset shards over fsspec -> split by rank -> split by worker -> windowed
shuffle -> decode -> augment -> batch, with a position that a checkpoint can store and restore exactly.

State is kept in the main process as (epoch, batches consumed by the training loop this epoch), not in the
workers, so prefetched-but-unused batches never count. On resume each worker recomputes its plan
(``plan.EpochPlan``) and skips what was consumed: shards before its position are not opened at all, and
within the current shuffle window samples are re-read as bytes but not decoded.
"""
from __future__ import annotations

import logging
import posixpath
import random
import signal
from dataclasses import asdict
from typing import Any, Callable, Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .bad_samples import label_if_any, parse_label
from .config import StreamConfig
from .decode import open_image
from .plan import EpochPlan, Phase, Segment, consumed_per_worker
from .tar_io import read_segment
from .transforms import TrainTransform

log = logging.getLogger(__name__)
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp")


def image_bytes(sample: dict[str, Any]) -> bytes:
    """The encoded image of a raw WebDataset sample (its first image extension); StopIteration if none."""
    return next(sample[k] for k in IMAGE_KEYS if k in sample)


def _one_thread(_: int) -> None:
    # Decoding parallelism comes from worker processes; torch's intra-op threads in each worker only contend.
    torch.set_num_threads(1)
    # Slurm signals every process of a job step, torchrun the process group of each rank: the trainer
    # checkpoints on SIGUSR1 / SIGTERM, and its loader workers must not die of them meanwhile (a dead worker
    # interrupts the trainer). They still end with the trainer: the DataLoader stops them, or they notice
    # that their parent is gone.
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class ShardStream(IterableDataset):
    """Yields whole batches {"image" [b,3,H,W], "label" [b], "key" list[str], "skipped" int, "bad" list of
    (key, reason)}: b is the batch size less the bad samples, which are named in "bad" and counted in
    "skipped".

    ``labelled``: the task learns from labels, so a sample without a usable one (``.cls`` missing, not an
    integer, or outside [0, ``num_classes``) when that is given) is bad. Otherwise labels are passed along
    when they parse (else -1) and never make a sample bad."""

    def __init__(self, urls: list[str], sizes: list[int], cfg: StreamConfig, batch_size: int, seed: int,
                 labelled: bool = False, num_classes: int | None = None):
        super().__init__()
        self.urls, self.sizes, self.cfg = urls, sizes, cfg
        self.batch_size, self.seed = batch_size, seed
        self.labelled, self.num_classes = labelled, num_classes
        self.transform = TrainTransform(cfg.transform)
        # Set by StreamLoader before each pass.
        self.epoch, self.rank, self.world_size, self.consumed = 0, 0, 1, 0
        self.phases: tuple[Phase, ...] = ()

    def plan(self, epoch: int | None = None, phases: tuple[Phase, ...] | None = None) -> EpochPlan:
        # The plan deals out copies: sample j of a shard is positions j*k .. j*k + k-1 of it (k = repeats).
        copies = tuple(n * self.cfg.repeats for n in self.sizes)
        return EpochPlan(copies, self.epoch if epoch is None else epoch, self.seed, self.world_size,
                         self.batch_size, self.cfg.shuffle, self.phases if phases is None else phases)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k = info.num_workers if info else 1
        # After a resume the next batch belongs to worker (consumed % k); DataLoader starts at physical
        # worker 0, so physical worker j plays the role of worker (j + consumed) % k.
        worker = ((info.id if info else 0) + self.consumed) % k
        plan = self.plan()
        segments = plan.worker_segments(self.rank, worker, k)
        window = max(self.cfg.shuffle_buffer, 1)
        order = plan.worker_order(self.rank, worker, k, window)
        start = consumed_per_worker(self.consumed, k)[worker] * self.batch_size
        raw = self._read(segments, skip=(start // window) * window)
        batch: list[tuple[str, Any]] = []
        for w0 in range((start // window) * window, len(order), window):
            block = [next(raw) for _ in range(min(window, len(order) - w0))]
            for i in range(max(w0, start), w0 + len(block)):  # i: emission index, order[i]: position
                batch.append(self._decode(block[order[i] - w0], plan.epoch))
                if len(batch) == self.batch_size:
                    yield self._collate(batch)
                    batch = []

    def _read(self, segments: list[Segment], skip: int) -> Iterator[tuple[dict[str, Any] | None, int, str]]:
        """(raw sample, copy index, where) for each position of the segments, from position ``skip`` on; the
        sample is None when unreadable, ``where`` names it then ("<shard>/#<index in the shard>"). A sample is
        read once for all its copies in a segment."""
        k = self.cfg.repeats
        for seg in segments:
            if skip >= len(seg):
                skip -= len(seg)
                continue
            first, stop = seg.start + skip, seg.stop  # positions (copies) within the shard
            raw_first, raw_stop = first // k, (stop - 1) // k + 1
            samples = read_segment(self.urls[seg.shard], raw_first, raw_stop - raw_first, self.cfg.read)
            shard = posixpath.basename(self.urls[seg.shard]).rsplit(".tar", 1)[0]
            for j, sample in enumerate(samples, start=raw_first):
                for copy in range(max(first - j * k, 0), min(stop - j * k, k)):
                    yield sample, copy, f"{shard}/#{j}"
            skip = 0

    def _decode(self, item: tuple[dict[str, Any] | None, int, str], epoch: int
                ) -> tuple[str, tuple[torch.Tensor, int] | str]:
        """(key, (image [3, H, W], label)), or (key, reason) for a bad sample."""
        sample, copy, where = item
        if sample is None:  # read_segment has warned about the shard
            return where, "unreadable: its shard failed or ended before it"
        shard = posixpath.basename(sample["__url__"]).rsplit(".tar", 1)[0]
        key = f"{shard}/{sample['__key__']}"
        seed = f"{self.seed}/{epoch}/{key}" + (f"/{copy}" if copy else "")  # each copy its own augmentation
        try:  # the label first: an unlabelled sample of a labelled task is not worth decoding
            label = parse_label(sample, self.num_classes) if self.labelled else label_if_any(sample)
        except ValueError as err:
            log.warning("skipping sample %s: %s", key, err)
            return key, str(err)
        try:
            img = open_image(image_bytes(sample))
            x = self.transform(img, random.Random(seed))
        except StopIteration:
            log.warning("skipping sample %s: no image (none of %s)", key, ", ".join(IMAGE_KEYS))
            return key, f"no image (none of {', '.join(IMAGE_KEYS)})"
        except Exception as err:
            log.warning("skipping corrupt sample %s: %s", key, err)
            return key, f"corrupt image: {err}"
        return key, (x, label)

    def _collate(self, batch: list[tuple[str, tuple[torch.Tensor, int] | str]]) -> dict[str, Any]:
        good = [(key, item) for key, item in batch if not isinstance(item, str)]
        bad = [(key, item) for key, item in batch if isinstance(item, str)]
        h, w = self.cfg.transform.image_size
        images = torch.stack([x for _, (x, _) in good]) if good else torch.empty(0, 3, h, w)
        return {"image": images, "label": torch.tensor([y for _, (_, y) in good], dtype=torch.long),
                "key": [key for key, _ in good], "skipped": len(bad), "bad": bad}


class StreamLoader:
    """Iterable over one epoch of batches for this rank; remembers how far the training loop got.

    A resume on another layout (world size, batch, worker count or shuffle window) within an epoch records the
    old layout and its progress as a ``Phase``: the rest of the epoch is then dealt out over the new layout
    from what the earlier phases left, so no sample repeats within the epoch. The epoch's length, as the
    training loop counts it, is the batches already counted plus those left for this layout."""

    _LAYOUT = ("world_size", "batch_size", "num_workers", "shuffle_buffer")

    def __init__(self, dataset: ShardStream, num_workers: int, epoch_fn: Callable[[], int],
                 pin_memory: bool = False):
        self.dataset, self.num_workers, self.epoch_fn, self.pin_memory = dataset, num_workers, epoch_fn, pin_memory
        self.epoch, self.consumed, self.skipped = 0, 0, 0
        self.phases: tuple[Phase, ...] = ()
        self._resume: dict[str, Any] | None = None

    def _phases_for(self, epoch: int) -> tuple[Phase, ...]:
        if self._resume is not None:
            return tuple(self._resume["phases"]) if self._resume["epoch"] == epoch else ()
        return self.phases if epoch == self.epoch else ()

    def _length(self, epoch: int, phases: tuple[Phase, ...]) -> int:
        return sum(p.consumed for p in phases) + self.dataset.plan(epoch, phases).batches_per_rank

    def __len__(self) -> int:
        epoch = self.epoch_fn()
        return self._length(epoch, self._phases_for(epoch))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch_fn()
        phases, start = self._phases_for(epoch), 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = self._resume["consumed"]
        self._resume = None
        self.epoch, self.consumed, self.phases = epoch, start, phases
        ds = self.dataset
        ds.epoch, ds.consumed, ds.phases = epoch, start, phases
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, worker_init_fn=_one_thread,
                            pin_memory=self.pin_memory, prefetch_factor=4 if self.num_workers else None)
        for batch in loader:
            self.consumed += 1
            self.skipped += batch["skipped"]
            yield batch

    def fingerprint(self) -> dict[str, Any]:
        ds = self.dataset
        return {"shards": list(ds.sizes), "seed": ds.seed, "world_size": ds.world_size,
                "batch_size": ds.batch_size, "num_workers": self.num_workers, "shuffle": ds.cfg.shuffle,
                "shuffle_buffer": ds.cfg.shuffle_buffer, "repeats": ds.cfg.repeats}

    def state_dict(self) -> dict[str, Any]:
        epoch, consumed, phases = self.epoch, self.consumed, self.phases
        if sum(p.consumed for p in phases) + consumed >= self._length(epoch, phases):
            epoch, consumed, phases = epoch + 1, 0, ()  # a finished epoch resumes at the next one's start
        return {"epoch": epoch, "consumed": consumed, "phases": [asdict(p) for p in phases],
                "skipped": self.skipped, "plan": self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state.get("skipped", 0)
        saved, now = {"repeats": 1, **state["plan"]}, self.fingerprint()  # checkpoints from before repeats
        phases = tuple(Phase(**p) for p in state.get("phases", []))
        changed = sorted(k for k, v in now.items() if saved.get(k) != v)
        if not changed:
            self._resume = {"epoch": state["epoch"], "consumed": state["consumed"], "phases": phases}
        elif set(changed) <= set(self._LAYOUT):
            done = Phase(saved["world_size"], saved["batch_size"], saved["num_workers"],
                         max(saved["shuffle_buffer"], 1), state["consumed"])
            log.warning("data layout changed since the checkpoint (%s): the rest of epoch %d is dealt out anew "
                        "from the samples not yet seen", ", ".join(changed), state["epoch"])
            self._resume = {"epoch": state["epoch"], "consumed": 0, "phases": (*phases, done)}
        else:
            log.warning("data stream changed since the checkpoint (%s): epoch %d restarts from its first batch, "
                        "so samples already seen this epoch may repeat", ", ".join(changed), state["epoch"])
            self._resume = {"epoch": state["epoch"], "consumed": 0, "phases": ()}
