"""Reading and writing WebDataset tar shards through fsspec (any URL fsspec can open)."""
from __future__ import annotations

import hashlib
import io
import logging
import tarfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import fsspec
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator

log = logging.getLogger(__name__)


def iter_raw_samples(url: str, block_size: int | None = None) -> Iterator[dict[str, Any]]:
    """Samples of one shard as {"__key__", "__url__", ext: bytes, ...}, in tar order, undecoded.
    ``block_size``: bytes per ranged read from object storage (None: the filesystem's default)."""
    fs, path = fsspec.core.url_to_fs(url)
    # block_size goes to fs.open: fsspec.open would hand it to s3fs's constructor, which refuses it
    with fs.open(path, "rb", **({"block_size": block_size} if block_size else {})) as f:
        files = ({**entry, "__url__": url} for entry in tar_file_iterator(f))
        yield from group_by_keys(files)


@dataclass
class ReadRetry:
    """How a shard read that fails as if the store were unreachable is retried."""

    retries: int = 6
    """Re-opens of a shard after a transient error (connection refused or reset, timeout, 5xx) before the
    rest of its segment is skipped and counted."""
    backoff_s: float = 1.0
    """Wait before the first retry; doubled for each next one (1 + 2 + 4 + ... s)."""
    block_size: int | None = None
    """Bytes per ranged read from object storage (None: the filesystem's default, 5 MiB for s3)."""


# Not worth a retry: the object is corrupt or truncated, missing, or the key may not read it.
PERMANENT = (tarfile.TarError, EOFError, ValueError, KeyError, FileNotFoundError, PermissionError)


def read_segment(url: str, first: int, count: int, retry: ReadRetry,
                 sleep: Callable[[float], None] = time.sleep) -> Iterator[dict[str, Any] | None]:
    """Samples ``first`` to ``first + count`` of a shard, in order; None for each one that could not be read.

    After a transient error the shard is opened again and the samples already yielded are read past, not
    yielded again: the stream continues where it was. A permanent error, or a transient one that outlasts
    the retries, ends the segment: the samples left are yielded as None (counted as skipped downstream)."""
    got, failures = 0, 0
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
        except PERMANENT as err:
            log.warning("shard %s unreadable after %d samples of its segment: %s", url, got, err)
            break
        except Exception as err:  # connection refused/reset, timeouts, 5xx: the store may come back
            failures += 1
            if failures > retry.retries:
                log.warning("shard %s still failing after %d retries, skipping its %d remaining samples: %s",
                            url, retry.retries, count - got, err)
                break
            delay = retry.backoff_s * 2 ** (failures - 1)
            log.warning("shard %s: %s; retry %d of %d in %.0f s, from sample %d", url, err, failures,
                        retry.retries, delay, first + got)
            sleep(delay)
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


def write_shard(url: str, samples) -> tuple[int, str, int]:
    """Write samples ({"__key__": ..., ext: bytes}) to ``url``; returns (count, sha256, bytes).

    Written under a temporary name and moved into place, so a reader never sees half a shard.
    """
    fs, path = fsspec.core.url_to_fs(url)
    tmp = path + ".partial"
    count = 0
    with fs.open(tmp, "wb") as raw:
        hashing = _HashingWriter(raw)
        with TarWriter(hashing) as sink:
            for sample in samples:
                sink.write(sample)
                count += 1
    fs.mv(tmp, path)
    return count, hashing.sha.hexdigest(), hashing.nbytes


def sha256_of(url: str) -> tuple[str, int]:
    sha, n = hashlib.sha256(), 0
    with fsspec.open(url, "rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            n += len(chunk)
    return sha.hexdigest(), n
