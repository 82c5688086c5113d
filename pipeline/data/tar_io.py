"""Reading and writing WebDataset tar shards through fsspec (any URL fsspec can open).

Shards are read with Python's ``tarfile``, grouped into samples by key as WebDataset does (key up to the first
dot of the file name). Unlike WebDataset's iterator, the reader notices a shard that stops early: ``tarfile``
silently ends at a missing end-of-archive marker, a half-written header or a garbled one, and the last sample
of such a shard may lack members (``.png`` read, ``.cls`` cut off). See ``TruncatedShard``.
"""
from __future__ import annotations

import hashlib
import io
import logging
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import fsspec
import numpy as np
from webdataset import TarWriter
from webdataset.tariterators import base_plus_ext

from ..retry import Attempts
from .config import ReadRetry

log = logging.getLogger(__name__)

_META = re.compile(r"__[^/]*__($|/)")  # WebDataset's metadata members, skipped
END_OF_ARCHIVE = bytes(2 * tarfile.BLOCKSIZE)
"""What a whole tar ends with: two zero blocks (record padding may follow)."""


class TruncatedShard(tarfile.ReadError):
    """A shard is readable only up to some point: cut inside a member, or ending without its end-of-archive
    marker (two zero blocks), inside a header, or at bytes that are no header. ``samples``: the complete
    samples before that point, all of which the reader yields; ``reason``: where and how the shard ends."""

    def __init__(self, url: str, samples: int, reason: str):
        super().__init__(f"{url}: truncated after {samples} complete samples: {reason}")
        self.url, self.samples, self.reason = url, samples, reason


def member_name(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member as WebDataset groups it; None for a member
    WebDataset skips (``__meta__`` names, names without an extension)."""
    if _META.match(name):
        return None
    key, ext = base_plus_ext(name)
    return None if key is None else (key, ext.lower())


def _end_problem(tar: tarfile.TarFile, last: str) -> str | None:
    """None when the archive goes on with its end-of-archive marker where ``tarfile`` stopped reading
    members, else what is there instead (``tarfile`` stops silently in all these cases)."""
    f = tar.fileobj
    f.seek(tar.offset)
    tail = f.read(len(END_OF_ARCHIVE))
    after = f"after member {last}" if last else "before any member"
    if tail == END_OF_ARCHIVE:
        return None
    if not tail:
        return f"ends at byte {tar.offset} {after}, without the end-of-archive marker (two zero blocks)"
    if not tail.strip(b"\0") and len(tail) < len(END_OF_ARCHIVE):
        return f"ends at byte {tar.offset + len(tail)} {after}, inside the end-of-archive marker"
    if len(tail) < tarfile.BLOCKSIZE:
        return f"ends at byte {tar.offset + len(tail)} {after}, inside the next member's header"
    return f"byte {tar.offset} {after} is neither a member header nor the end-of-archive marker"


def _complete(sample: dict[str, Any], previous: frozenset[str] | None) -> bool:
    """Whether the last sample before an early end has all its members: it must hold at least the
    extensions of the sample before it (without one to compare with, it is not counted)."""
    return previous is not None and previous <= set(sample)


def tar_samples(f, url: str, read_data: bool = True, offsets: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """Samples {"__key__", "__url__", ext: bytes, ...} of the tar stream ``f``, in tar order, undecoded
    (``read_data`` False: ext -> None, members' data skipped, for counting). ``offsets``, when given, receives
    the byte offset of each sample's first header and, for a whole archive, the end of its last member.

    A sample is yielded as soon as the next member's header shows another key, before that member's data is
    read: a cut in one sample never costs the sample before it. A shard readable only in part yields its
    complete samples, then raises ``TruncatedShard``; the last sample before an early end is yielded only
    when it has at least the members of the sample before it."""
    try:
        tar = tarfile.open(fileobj=f, mode="r:*")
    except (tarfile.ReadError, EOFError) as err:
        lines = str(err).splitlines()  # "r:*" lists each method tried: the plain tar one says the most
        detail = next((ln.split(":", 1)[1].strip() for ln in lines if "method tar:" in ln), " ".join(lines))
        raise TruncatedShard(url, 0, f"not a readable tar archive ({detail})") from None
    count, current, previous, last = 0, None, None, ""
    try:
        while (info := tar.next()) is not None:
            tar.members = []  # nothing looks members up again: keep memory flat over a large shard
            last = info.name
            name = member_name(info.name) if info.isreg() else None
            if name is None:
                continue
            key, ext = name
            if current is not None and key != current["__key__"]:
                yield current
                count, previous, current = count + 1, frozenset(current), None
            if current is None:
                current = {"__key__": key, "__url__": url}
                if offsets is not None:
                    offsets.append(info.offset)
            if ext in current:
                raise TruncatedShard(url, count, f"member {info.name} repeats extension .{ext} of sample {key}")
            current[ext] = tar.extractfile(info).read() if read_data else None
    except (tarfile.ReadError, EOFError) as err:
        if isinstance(err, TruncatedShard):
            raise
        lost = f"; sample {current['__key__']} not counted" if current else ""
        raise TruncatedShard(url, count, f"cut inside member {last} or its padding ({err}){lost}") from None
    end = tar.offset  # after the last member's padded data
    problem = _end_problem(tar, last)
    if problem is None:
        if current is not None:
            yield current
        if offsets is not None:
            offsets.append(end)
        return
    if current is not None:
        if _complete(current, previous):
            yield current
            count += 1
        else:
            members = ", ".join(sorted(k for k in current if not k.startswith("__")))
            problem += f"; its last sample {current['__key__']} ({members}) may lack members and is not counted"
    raise TruncatedShard(url, count, problem)


def iter_raw_samples(url: str, block_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard as {"__key__", "__url__", ext: bytes, ...}, in tar order, undecoded; raises
    ``TruncatedShard`` after the complete samples of a shard that ends early (see ``tar_samples``).
    ``block_size``: bytes per ranged read from object storage (None: the filesystem's default)."""
    fs, path = fsspec.core.url_to_fs(url)
    # block_size goes to fs.open: fsspec.open would hand it to s3fs's constructor, which refuses it
    with fs.open(path, "rb", **({"block_size": block_size} if block_size else {})) as f:
        yield from tar_samples(f, url)


@dataclass
class ShardScan:
    """What indexing found in a shard."""

    num_samples: int
    """Complete samples, all readable: what the loader will read from it."""
    extensions: set[str] = field(default_factory=set)
    truncated: str | None = None
    """Why the shard is readable only up to ``num_samples`` (None: the archive is whole)."""
    offsets: list[int] = field(default_factory=list)
    """Byte offset of each sample and the end of the last one (whole archives only; empty otherwise)."""


def scan_shard(url: str) -> ShardScan:
    """Count a shard's complete samples from the tar headers alone, and check that the archive is whole."""
    fs, path = fsspec.core.url_to_fs(url)
    scan, offsets = ShardScan(0), []
    with fs.open(path, "rb") as f:
        try:
            for sample in tar_samples(f, url, read_data=False, offsets=offsets):
                scan.num_samples += 1
                scan.extensions.update(k for k in sample if not k.startswith("__"))
            scan.offsets = offsets
        except TruncatedShard as err:
            scan.truncated = err.reason
    return scan


# Not worth a retry: the object is corrupt or truncated, missing, or the key may not read it.
PERMANENT = (tarfile.TarError, EOFError, ValueError, KeyError, FileNotFoundError, PermissionError)


def read_segment(url: str, first: int, count: int, retry: ReadRetry,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any] | None]:
    """Samples ``first`` to ``first + count`` of a shard, in order; None for each one that could not be read.

    After a transient error the shard is opened again and the samples already yielded are read past, not
    yielded again: the stream continues where it was. A permanent error, or a transient one that outlasts
    the retries, ends the segment: the samples left are yielded as None (counted as skipped downstream)."""
    got = 0
    attempts = Attempts(retry, f"shard {url}", final=PERMANENT, sleep=sleep)
    while got < count:
        try:
            for i, sample in enumerate(iter_raw_samples(url, retry.block_size)):
                if i < first + got:
                    continue
                got += 1
                yield sample
                if got == count:
                    break
            break
        except Exception as err:  # connection refused/reset, timeouts, 5xx: the store may come back
            if not attempts.retry(err, f", from sample {first + got}"):
                if attempts.exhausted:
                    log.warning("shard %s still failing after %d retries, skipping its %d remaining samples: %s",
                                url, retry.retries, count - got, err)
                else:
                    log.warning("shard %s unreadable after %d samples of its segment: %s", url, got, err)
                break
    for _ in range(count - got):
        yield None


class _HashingWriter(io.RawIOBase):
    """File-like wrapper that hashes and counts what passes through to ``inner``."""

    def __init__(self, inner):
        self.inner, self.sha, self.nbytes = inner, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.sha.update(b)
        self.nbytes += len(b)
        return self.inner.write(b)


@dataclass
class WrittenShard:
    count: int
    sha256: str
    bytes: int
    offsets: list[int]
    """Byte offset of each sample's first header, then the end of the last sample (see ``read_run``)."""


def write_shard(url: str, samples) -> WrittenShard:
    """Write samples ({"__key__": ..., ext: bytes}) to ``url``.

    Written under a temporary name and moved into place, so a reader never sees half a shard.
    """
    fs, path = fsspec.core.url_to_fs(url)
    tmp = path + ".partial"
    offsets: list[int] = []
    with fs.open(tmp, "wb") as raw:
        hashing = _HashingWriter(raw)
        with TarWriter(hashing) as sink:
            for sample in samples:
                offsets.append(sink.tarstream.offset)  # the archive's position, whatever its stream buffers
                sink.write(sample)
            offsets.append(sink.tarstream.offset)
    fs.mv(tmp, path)
    return WrittenShard(len(offsets) - 1, hashing.sha.hexdigest(), hashing.nbytes, offsets)


def write_offsets(url: str, offsets: list[int]) -> None:
    """A shard's sample offsets as little-endian uint64 (n + 1 of them), for ranged reads of any run."""
    with fsspec.open(url, "wb") as f:
        f.write(np.asarray(offsets, dtype="<u8").tobytes())


def read_offsets(url: str) -> np.ndarray:
    with fsspec.open(url, "rb") as f:
        return np.frombuffer(f.read(), dtype="<u8").astype(np.int64)


def read_run(url: str, offsets: np.ndarray, first: int, stop: int, retry: ReadRetry,
             sleep: Callable[[float], None] = time.sleep, counter: list[int] | None = None,
             ) -> Iterator[dict[str, Any] | None]:
    """Samples ``first`` to ``stop`` of a shard, in order, read with one ranged request of exactly their bytes
    (``offsets``: the shard's sample offsets); None for each one that could not be read. A transient error is
    retried under ``retry`` from the first sample not yet yielded; a permanent one (the bytes are not the
    samples the offsets promise) ends the run. ``counter[0]`` adds up the bytes fetched."""
    got = 0
    attempts = Attempts(retry, f"shard {url}", final=PERMANENT, sleep=sleep)
    fs, path = fsspec.core.url_to_fs(url)
    while got < stop - first:
        lo, hi = int(offsets[first + got]), int(offsets[stop])
        try:
            data = fs.cat_file(path, start=lo, end=hi)
            if counter is not None:
                counter[0] += len(data)
            samples = list(tar_samples(io.BytesIO(data + END_OF_ARCHIVE), url))
            if len(samples) != stop - first - got:
                raise ValueError(f"bytes {lo}-{hi} hold {len(samples)} samples, not the {stop - first - got} its "
                                 "offsets promise (was the shard rewritten?)")
            for sample in samples:
                got += 1
                yield sample
        except Exception as err:  # connection refused/reset, timeouts, 5xx: the store may come back
            if not attempts.retry(err, f", from sample {first + got}"):
                log.warning("shard %s: samples %d-%d unreadable: %s", url, first + got, stop - 1, err)
                break
    for _ in range(stop - first - got):
        yield None


def sha256_of(url: str) -> tuple[str, int]:
    sha, n = hashlib.sha256(), 0
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            n += len(chunk)
    return sha.hexdigest(), n
