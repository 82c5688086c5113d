"""The streaming loader: WebDataset shards over fsspec -> the epoch's sample order (``order.EpochOrder``) ->
this rank's batches -> decode -> augment -> batch, with a position that a checkpoint can store and restore
exactly, on the same layout or any other.

The position is one number per epoch, kept in the main process: the epoch's positions consumed by the
training loop (prefetched-but-unused batches never count). A loader worker computes its own batches from
it; each batch reads, from each shard it touches, one contiguous run of samples with one ranged request
(the manifest's offsets), so bytes read are the bytes of the samples delivered. A shard without recorded
offsets is read from its start instead, skipping what is not this worker's.
"""
from __future__ import annotations

import logging
import posixpath
import random
import signal
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .bad_samples import label_if_any, parse_label
from .config import ReadRetry, StreamConfig
from .decode import open_image
from .device_decode import device_decodable
from .order import EpochOrder, Layout
from .tar_io import read_offsets, read_run, read_segment
from .transforms import TrainTransform
from .worker_start import loader_options

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


@dataclass
class Decoded:
    """A good sample as a worker ships it: its uint8 image [3, H, W] (None: ``encoded`` is decoded on the
    device, cropped to ``box`` and flipped as drawn), random-erasing box and label."""

    image: torch.Tensor | None
    erase: tuple[int, int, int, int, int]
    label: int
    encoded: bytes | None = None
    box: tuple[int, int, int, int] = (0, 0, 0, 0)
    flip: bool = False


class RunReader:
    """One loader worker's reads: runs of a shard's samples by ranged request when the shard's offsets are
    known, else forward through the shard from a cursor kept open (at most ``keep`` shards at a time)."""

    def __init__(self, urls: list[str], offsets: list[str | None], retry: ReadRetry, keep: int,
                 concurrent: int = 4):
        self.urls, self.offsets_urls, self.retry, self.keep = urls, offsets, retry, max(keep, 1)
        self.concurrent = max(concurrent, 1)
        self._offsets: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cursors: OrderedDict[int, tuple[int, Iterator]] = OrderedDict()
        self.bytes = [0]  # bytes fetched by ranged reads (runs and offset files)
        self.warned = False

    def read_all(self, runs: list[tuple[int, int, int]]) -> list[list[dict[str, Any] | None]]:
        """The samples of each (shard, first, stop); runs with offsets are requested together, ``concurrent`` at
        a time (an object store serves several ranged GETs at once as fast as one), the others in order."""
        ranged = [i for i, (shard, _, _) in enumerate(runs) if self.offsets_urls[shard] is not None]
        forward = [i for i in range(len(runs)) if self.offsets_urls[runs[i][0]] is None]
        out: list[list[dict[str, Any] | None]] = [[] for _ in runs]
        if ranged:
            offsets = {runs[i][0]: self._shard_offsets(runs[i][0]) for i in ranged}  # this thread: the cache
            counters = [[0] for _ in ranged]

            def fetch(n: int) -> list[dict[str, Any] | None]:
                shard, first, stop = runs[ranged[n]]
                return list(read_run(self.urls[shard], offsets[shard], first, stop, self.retry, counter=counters[n]))

            with ThreadPoolExecutor(max_workers=min(self.concurrent, len(ranged))) as pool:
                for n, samples in enumerate(pool.map(fetch, range(len(ranged)))):
                    out[ranged[n]] = samples
            self.bytes[0] += sum(c[0] for c in counters)
        for i in forward:
            out[i] = list(self._forward(*runs[i]))
        return out

    def _forward(self, shard: int, first: int, stop: int) -> Iterator[dict[str, Any] | None]:
        """Samples ``first`` to ``stop`` of a shard without offsets, in order (None for an unreadable one), read
        on from where this worker's cursor in the shard stopped."""
        if not self.warned:
            log.warning("%s has no recorded sample offsets: this worker reads its shards from their start, "
                        "skipping the samples of other workers (`vitpipe shard --index` records them)",
                        self.urls[shard])
            self.warned = True
        at, cursor = self._cursors.pop(shard, (0, None))
        if cursor is None or at > first:
            at, cursor = 0, read_segment(self.urls[shard], 0, 1 << 62, self.retry)
        for _ in range(first - at):
            next(cursor, None)
        for _ in range(stop - first):
            yield next(cursor, None)
        self._cursors[shard] = (stop, cursor)
        while len(self._cursors) > self.keep:
            self._cursors.popitem(last=False)[1][1].close()

    def _shard_offsets(self, shard: int) -> np.ndarray:
        if shard not in self._offsets:
            self._offsets[shard] = read_offsets(self.offsets_urls[shard])
            self.bytes[0] += 8 * len(self._offsets[shard])
            while len(self._offsets) > 4 * self.keep:
                self._offsets.popitem(last=False)
        self._offsets.move_to_end(shard)
        return self._offsets[shard]


class ShardStream(IterableDataset):
    """Yields whole batches {"image" uint8 [b,3,H,W] ([b,3,0,0] when all travel encoded), "erase" b x 5 ints,
    "label" [b], "key" list[str], "skipped" int, "bad" list of (key, reason)} (see ``_collate``): b is the batch
    size less the bad samples, which are named in "bad" and counted in "skipped".

    ``labelled``: the task learns from labels, so a sample without a usable one (``.cls`` missing, not an
    integer, or outside [0, ``num_classes``) when that is given) is bad. Otherwise labels are passed along
    when they parse (else -1) and never make a sample bad. ``offsets``: each shard's offsets file (None:
    none recorded)."""

    def __init__(self, urls: list[str], sizes: list[int], cfg: StreamConfig, batch_size: int, seed: int,
                 labelled: bool = False, num_classes: int | None = None, offsets: list[str | None] | None = None):
        super().__init__()
        self.urls, self.sizes, self.cfg = urls, sizes, cfg
        self.offsets = offsets or [None] * len(urls)
        self.batch_size, self.seed = batch_size, seed
        self.labelled, self.num_classes = labelled, num_classes
        self.transform = TrainTransform(cfg.transform)
        # Set by StreamLoader before each pass: the epoch, this rank and the epoch's positions consumed before
        # the pass (a resume starts a pass there, so a pass always begins at its first batch).
        self.epoch, self.rank, self.world_size, self.start = 0, 0, 1, 0
        self.bytes_read = 0  # in a process reading itself (no loader workers)

    def order(self, epoch: int | None = None) -> EpochOrder:
        # The order deals out copies: sample j of a shard is positions j*k .. j*k + k-1 of it (k = repeats).
        copies = tuple(n * self.cfg.repeats for n in self.sizes)
        return EpochOrder(copies, self.seed, self.epoch if epoch is None else epoch, self.cfg.shuffle,
                          self.cfg.interleave)

    @property
    def layout(self) -> Layout:
        return Layout(self.world_size, self.batch_size)

    def steps(self, epoch: int | None = None, start: int | None = None) -> int:
        """Batches of this rank left in the epoch after ``start`` positions (this pass's by default)."""
        return self.layout.steps(self.order(epoch).total, self.start if start is None else start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        k, j = (info.num_workers, info.id) if info else (1, 0)
        order, layout = self.order(), self.layout
        reader = RunReader(self.urls, self.offsets, self.cfg.read, self.cfg.interleave)
        # DataLoader takes batch i of the pass from worker i % k
        steps = range(j, layout.steps(order.total, self.start), k)

        def fetch(i: int) -> Future | None:
            """Read-ahead: the next batch's runs are fetched on a thread while this one decodes (one batch of
            encoded bytes in memory at most)."""
            if i >= len(steps):
                return None
            return ahead.submit(self._read, order, layout.batch_start(self.start, steps[i], self.rank), reader)

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="read-ahead") as ahead:
            pending = fetch(0)
            for i in range(len(steps)):
                items, pending = pending.result(), fetch(i + 1)
                batch = [self._decode(item, order.epoch) for item in items]
                self.bytes_read = reader.bytes[0]
                yield self._collate(batch)

    def _read(self, order: EpochOrder, first: int, reader: RunReader
              ) -> list[tuple[dict[str, Any] | None, int, str]]:
        """(raw sample, copy index, where) of the batch's positions, in order; the sample is None when unreadable,
        ``where`` names it then ("<shard>/#<index in the shard>"). Each run is read once for all its copies."""
        k = self.cfg.repeats
        shards, positions = order.positions(first, self.batch_size)
        wanted = [(run.shard, run.start // k, (run.stop - 1) // k + 1) for run in order.runs(first, self.batch_size)]
        got = {(shard, j): sample for (shard, lo, _), samples in zip(wanted, reader.read_all(wanted))
               for j, sample in enumerate(samples, start=lo)}
        out = []
        for shard, p in zip(shards.tolist(), positions.tolist()):
            name = posixpath.basename(self.urls[shard]).rsplit(".tar", 1)[0]
            out.append((got[shard, p // k], p % k, f"{name}/#{p // k}"))
        return out

    def _decode(self, item: tuple[dict[str, Any] | None, int, str], epoch: int) -> tuple[str, Decoded | str]:
        """(key, the decoded sample, or the encoded one to decode on the device), or (key, reason) for a bad
        sample."""
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
            data = image_bytes(sample)
            img, rng = open_image(data), random.Random(seed)
            if self.cfg.decode == "gpu" and device_decodable(img):  # the header tells the crop; bytes travel
                d = self.transform.draws(img.width, img.height, rng)
                return key, Decoded(None, d.erase, label, data, d.box, d.flip)
            x, erase = self.transform.sample(img, rng)
        except StopIteration:
            log.warning("skipping sample %s: no image (none of %s)", key, ", ".join(IMAGE_KEYS))
            return key, f"no image (none of {', '.join(IMAGE_KEYS)})"
        except Exception as err:
            log.warning("skipping corrupt sample %s: %s", key, err)
            return key, f"corrupt image: {err}"
        return key, Decoded(x, erase, label)

    def _collate(self, batch: list[tuple[str, Decoded | str]]) -> dict[str, Any]:
        """{"image": uint8 [b, 3, H, W], "erase": b random-erasing boxes (5 ints each), "label" [b], ...}: the
        training process standardises on its device (``ShardDataModule.on_after_batch_transfer``). With device
        decode, also "encoded" (a JPEG's bytes, or None where the image is already decoded), "box" (b crop boxes
        of 4 ints), "flip" (b bools); "image" is then [b, 3, 0, 0] when every sample travels encoded. The
        per-sample parameters are lists: they stay on the host when the batch moves to the device, where reading
        them would stop the host every step."""
        good = [(key, item) for key, item in batch if not isinstance(item, str)]
        bad = [(key, item) for key, item in batch if isinstance(item, str)]
        h, w = self.cfg.transform.image_size
        if good and all(d.image is None for _, d in good):
            # every sample travels encoded: no pixels cross the queues, pinning and the copy (a batch of 384 at
            # 224 px would be 58 MB of zeros); the device makes the images [b, 3, H, W] (``decode_batch``)
            h = w = 0
        images = torch.zeros(len(good), 3, h, w, dtype=torch.uint8)  # encoded ones are filled on the device
        for i, (_, d) in enumerate(good):
            if d.image is not None:
                images[i] = d.image
        out = {"image": images, "erase": [tuple(d.erase) for _, d in good],
               "label": torch.tensor([d.label for _, d in good], dtype=torch.long),
               "key": [key for key, _ in good], "skipped": len(bad), "bad": bad}
        if self.cfg.decode == "gpu":
            out |= {"encoded": [d.encoded for _, d in good],
                    "box": [tuple(d.box) for _, d in good], "flip": [bool(d.flip) for _, d in good]}
        return out


ORDER_VERSION = 2  # the sample order of ``order.EpochOrder``; checkpoints without it used the earlier one


class StreamLoader:
    """Iterable over one epoch of batches for this rank; remembers how far the training loop got.

    Its state is the epoch, the epoch's positions consumed (a prefix of the order, whatever the layout) and the
    batches the training loop counted. A resume on any layout (world size, batch, worker count) continues from
    that position; the epoch's length, as the training loop counts it, is the batches already counted plus
    those the new layout has left."""

    _STREAM = ("shards", "seed", "shuffle", "interleave", "repeats")  # what the order depends on

    def __init__(self, dataset: ShardStream, num_workers: int, epoch_fn: Callable[[], int],
                 pin_memory: bool = False):
        self.dataset, self.num_workers, self.epoch_fn, self.pin_memory = dataset, num_workers, epoch_fn, pin_memory
        # this pass: its epoch, the positions consumed before it, the batches counted before it, its batches
        self.epoch, self.start, self.before, self.consumed, self.skipped = 0, 0, 0, 0, 0
        self._resume: dict[str, int] | None = None
        self.wait_s = 0.0  # seconds the training loop waited for batches, over the life of the loader

    def _position(self, epoch: int) -> tuple[int, int]:
        """(positions consumed, batches counted) of ``epoch`` before the next pass."""
        if self._resume is not None:
            r = self._resume
            return (r["samples"], r["batches"]) if r["epoch"] == epoch else (0, 0)
        return (self.start, self.before) if epoch == self.epoch else (0, 0)

    def __len__(self) -> int:
        epoch = self.epoch_fn()
        start, before = self._position(epoch)
        return before + self.dataset.steps(epoch, start)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        epoch = self.epoch_fn()
        (self.start, self.before), self._resume = self._position(epoch), None
        self.epoch, self.consumed = epoch, 0
        ds = self.dataset
        ds.epoch, ds.start = epoch, self.start
        loader = DataLoader(ds, batch_size=None, num_workers=self.num_workers, pin_memory=self.pin_memory,
                            prefetch_factor=4 if self.num_workers else None,
                            **loader_options(self.num_workers, _one_thread))
        batches = iter(loader)
        while True:
            t0 = time.perf_counter()
            batch = next(batches, None)
            self.wait_s += time.perf_counter() - t0  # the training loop's wait for this batch
            if batch is None:
                return
            self.consumed += 1
            self.skipped += batch["skipped"]
            yield batch

    @property
    def batches(self) -> int:
        """Batches the training loop counted this epoch (across a resume)."""
        return self.before + self.consumed

    def fingerprint(self) -> dict[str, Any]:
        ds = self.dataset
        return {"shards": list(ds.sizes), "seed": ds.seed, "shuffle": ds.cfg.shuffle,
                "interleave": ds.cfg.interleave, "repeats": ds.cfg.repeats}

    def layout(self) -> dict[str, int]:
        ds = self.dataset
        return {"world_size": ds.world_size, "batch_size": ds.batch_size, "num_workers": self.num_workers}

    def state_dict(self) -> dict[str, Any]:
        ds = self.dataset
        epoch, samples = self.epoch, self.start + self.consumed * ds.layout.step_size
        batches = self.batches
        if ds.steps(epoch, samples) == 0:
            epoch, samples, batches = epoch + 1, 0, 0  # a finished epoch resumes at the next one's start
        return {"order": ORDER_VERSION, "epoch": epoch, "samples": samples, "batches": batches,
                "skipped": self.skipped, "stream": self.fingerprint(), "layout": self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped = state.get("skipped", 0)
        epoch = state["epoch"]
        if state.get("order") != ORDER_VERSION:
            # A checkpoint of the earlier order: its position names batches of a layout-dependent plan, which
            # have no place in this order. The epoch is read again from its start, said so.
            batches = state.get("consumed", 0) + sum(p["consumed"] for p in state.get("phases", []))
            if batches:
                log.warning("the checkpoint's data position (%d batches into epoch %d) was written by the "
                            "earlier sample order, which this version replaced: epoch %d is read again from its "
                            "first sample, so the samples of those %d batches are seen twice this epoch",
                            batches, epoch, epoch, batches)
            self._resume = {"epoch": epoch, "samples": 0, "batches": batches}
            return
        saved, now = state["stream"], self.fingerprint()
        changed = sorted(k for k in self._STREAM if saved.get(k) != now[k])
        if changed:
            if state["samples"]:
                log.warning("data stream changed since the checkpoint (%s): epoch %d is read again from its first "
                            "sample, so the %d samples already seen this epoch are seen twice",
                            ", ".join(changed), epoch, state["samples"])
            self._resume = {"epoch": epoch, "samples": 0, "batches": state["batches"]}
            return
        moved = sorted(k for k, v in self.layout().items() if state.get("layout", {}).get(k) != v)
        if moved and state["samples"]:
            log.info("data layout changed since the checkpoint (%s): epoch %d continues after its first %d samples",
                     ", ".join(moved), epoch, state["samples"])
        self._resume = {"epoch": epoch, "samples": state["samples"], "batches": state["batches"]}
