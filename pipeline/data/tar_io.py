"""Reading and writing WebDataset tar shards through fsspec (any URL fsspec can open)."""
from __future__ import annotations

import hashlib
import io
from typing import Any, Iterator

import fsspec
from webdataset import TarWriter
from webdataset.tariterators import group_by_keys, tar_file_iterator


def iter_raw_samples(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard as {"__key__", "__url__", ext: bytes, ...}, in tar order, undecoded."""
    with fsspec.open(url, "rb") as f:
        files = ({**entry, "__url__": url} for entry in tar_file_iterator(f))
        yield from group_by_keys(files)


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
