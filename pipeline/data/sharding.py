"""Turn a source into WebDataset tar shards plus a manifest, in parallel; index shards made elsewhere."""
from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from typing import Any

import fsspec

from ..console import Progress
from .manifest import Manifest, ManifestError, ShardInfo
from .storage import probe_write
from .tar_io import scan_shard, sha256_of, write_offsets, write_shard

_SOURCE: Any = None  # set in each worker process by _init_worker


def offsets_url(shard_url: str) -> str:
    """Where a shard written here keeps its sample offsets: beside it."""
    return shard_url.rsplit(".tar", 1)[0] + ".offsets"


def _init_worker(source: Any) -> None:
    global _SOURCE
    _SOURCE = source


def _write_one(args: tuple[str, Sequence[Any]]) -> tuple[ShardInfo, list[str]]:
    url, items = args
    skipped: list[str] = []

    def samples():
        for item in items:
            sample = _SOURCE.load(item)
            if sample is None:
                skipped.append(str(getattr(item, "path", item)))
            else:
                yield sample

    written = write_shard(url, samples())
    write_offsets(offsets_url(url), written.offsets)
    return ShardInfo(url=posixpath.basename(url), num_samples=written.count, sha256=written.sha256,
                     bytes=written.bytes, offsets=posixpath.basename(offsets_url(url))), skipped


def write_split(source: Any, items: Sequence[Any], out_url: str, split: str, shard_size: int = 10000,
                workers: int = 1, log: Callable[[str], None] = print) -> Manifest:
    """Shard ``items`` of ``source`` into ``out_url/<split>-NNNNNN.tar`` and write ``out_url/manifest.json``.

    Each worker process writes whole shards; the manifest is written last, once every shard is in place.
    """
    if shard_size < 1:
        raise ValueError("shard_size must be >= 1")
    out_url = out_url.rstrip("/")
    probe_write(out_url, "writing shards")  # refused writes fail before any image is read
    fs, path = fsspec.core.url_to_fs(out_url)
    fs.makedirs(path, exist_ok=True)
    chunks = [items[i: i + shard_size] for i in range(0, len(items), shard_size)]
    jobs = [(f"{out_url}/{split}-{n:06d}.tar", chunk) for n, chunk in enumerate(chunks)]
    progress = Progress(f"{split}: shards written", len(jobs), "shards")
    if workers > 1 and len(jobs) > 1:
        with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(source,)) as pool:
            futures = {pool.submit(_write_one, job): n for n, job in enumerate(jobs)}
            results: list[Any] = [None] * len(jobs)
            for done in as_completed(futures):  # in the order shards finish, for the progress lines
                results[futures[done]] = done.result()
                progress.update()
    else:
        _init_worker(source)
        results = [_write_one(job) for job in progress.wrap(jobs)]
    shards = [info for info, _ in results]
    skipped = [s for _, sk in results for s in sk]
    manifest = Manifest(split=split, shards=shards, classes=list(source.classes), image_ext=source.image_ext,
                        skipped=skipped)
    where = manifest.location = manifest.save(out_url)
    log(f"{split}: {manifest.num_samples} samples in {len(shards)} shards -> {where}"
        + (f" ({len(skipped)} unreadable images skipped)" if skipped else ""))
    return manifest


def index_shards(urls: Sequence[str], out_url: str, split: str, classes: Sequence[str] = (),
                 strict: bool = False, log: Callable[[str], None] = print) -> Manifest:
    """Write a manifest for existing WebDataset shards (made by any tool): counts complete samples, checks
    that each archive is whole, hashes files.

    A truncated shard (cut inside a member, or ending without its end-of-archive marker) is recorded with the
    number of complete samples before the damage and the reason, and named in the output; the loader then
    reads only those samples. With ``strict`` any truncated shard is a ManifestError naming each one, and no
    manifest is written."""
    shards, exts = [], set()
    # Local paths are stored absolute: relative ones would be read against the manifest's folder.
    urls = [u if "://" in u else os.path.abspath(u) for u in urls]
    out_url = out_url[:-len(".json")].rsplit("/", 1)[0] if out_url.endswith(".json") else out_url.rstrip("/")
    for n, url in enumerate(urls):
        scan = scan_shard(url)
        exts.update(scan.extensions & {"jpg", "jpeg", "png", "webp"})
        sha, nbytes = sha256_of(url)
        offsets = None
        if scan.offsets:  # beside the manifest: the shards' own folder may be read-only
            offsets = f"offsets/{n:06d}-{posixpath.basename(url).rsplit('.tar', 1)[0]}.offsets"
            write_offsets(f"{out_url}/{offsets}", scan.offsets)
        shards.append(ShardInfo(url=url, num_samples=scan.num_samples, sha256=sha, bytes=nbytes,
                                truncated=scan.truncated, offsets=offsets))
        if scan.truncated is None:
            log(f"{url}: {scan.num_samples} samples")
        else:
            log(f"{url}: TRUNCATED, {scan.num_samples} complete samples readable: {scan.truncated}")
    manifest = Manifest(split=split, shards=shards, classes=list(classes),
                        image_ext=sorted(exts)[0] if exts else "jpg")
    cut = manifest.truncated_shards()
    if cut and strict:
        raise ManifestError(f"{len(cut)} of {len(shards)} shards truncated, no manifest written (--strict): "
                            + "; ".join(f"{s.url}: {s.truncated}" for s in cut))
    manifest.location = manifest.save(out_url)
    if cut:
        log(f"{split}: {len(cut)} of {len(shards)} shards truncated ({', '.join(s.url for s in cut)}); the manifest "
            f"records them and only their complete samples are read ({manifest.num_samples} in all)")
    return manifest
