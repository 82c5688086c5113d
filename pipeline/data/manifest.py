"""The shard manifest: which tar shards make a split, how many samples each holds, their sha256, classes.

A manifest is the unit the loader reads. Shard URLs inside it are relative to the manifest's own folder
(so a copied or mirrored dataset keeps working) unless they carry a scheme or an absolute path.
"""
from __future__ import annotations

import hashlib
import json
import logging
import posixpath
from dataclasses import asdict, dataclass, field
from typing import Any

import fsspec

from .storage import bucket_exists, explain, is_object_store

log = logging.getLogger(__name__)
FORMAT = "vitpipe.shards/1"
MANIFEST_NAME = "manifest.json"


class ManifestError(ValueError):
    """A manifest is missing, malformed, or does not match its shards; the message names the file."""


@dataclass
class ShardInfo:
    url: str
    num_samples: int
    """Complete samples the loader reads from the shard: of a truncated shard, those before the damage."""
    sha256: str = ""
    bytes: int = 0
    truncated: str | None = None
    """Why the shard is readable only up to ``num_samples`` (where and how its archive ends); None: whole.
    Left out of the JSON when None, so manifests of whole shards (and their digests) are as before."""
    offsets: str | None = None
    """The file of the byte offset of each sample (relative to the manifest like ``url``), which lets a loader
    worker read any run of samples with one ranged request. None (left out of the JSON): not recorded, the
    shard is read from its start."""


@dataclass
class Manifest:
    split: str
    shards: list[ShardInfo]
    classes: list[str] = field(default_factory=list)
    image_ext: str = "png"
    skipped: list[str] = field(default_factory=list)
    """Source items that were unreadable at sharding time (kept out of the shards)."""
    location: str = ""
    """Where this manifest was read from (not stored); relative shard URLs resolve against it."""

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    def shard_urls(self) -> list[str]:
        return [resolve(self.location, s.url) for s in self.shards]

    def offsets_urls(self) -> list[str | None]:
        return [resolve(self.location, s.offsets) if s.offsets else None for s in self.shards]

    def truncated_shards(self) -> list[ShardInfo]:
        return [s for s in self.shards if s.truncated is not None]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("location")
        for shard in d["shards"]:
            for optional in ("truncated", "offsets"):
                if shard[optional] is None:
                    del shard[optional]
        return {"format": FORMAT, "num_samples": self.num_samples, **d}

    def digest(self) -> str:
        """Stable hash of the content (shard names, counts, checksums), for lineage and resume checks."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()[:16]

    def save(self, url: str) -> str:
        """Write to ``url`` (a folder gets ``manifest.json``); written last, it is the commit of a split."""
        target = url if url.endswith(".json") else posixpath.join(url.rstrip("/"), MANIFEST_NAME)
        with fsspec.open(target, "w") as f:
            json.dump(self.to_json(), f, indent=1)
        return target


def resolve(location: str, url: str) -> str:
    if "://" in url or url.startswith("/") or not location:
        return url
    return posixpath.join(posixpath.dirname(location), url)


def load_manifest(url: str) -> Manifest:
    """Read a manifest from a file URL or from the folder that holds ``manifest.json``."""
    target = url if url.endswith(".json") else posixpath.join(url.rstrip("/"), MANIFEST_NAME)
    try:
        with fsspec.open(target, "r") as f:
            raw = json.load(f)
    except FileNotFoundError as err:
        if is_object_store(target) and bucket_exists(target) is False:
            raise explain(target, err, "reading the shard manifest") from None
        raise ManifestError(f"{target}: no shard manifest here (write one with `vitpipe shard --images DIR --out URL`, "
                            "or `vitpipe shard --index TAR... --out DIR` for shards made elsewhere)") from None
    except PermissionError as err:
        raise explain(target, err, "reading the shard manifest") from None
    except json.JSONDecodeError as err:
        raise ManifestError(f"{target}: not valid JSON ({err})") from None
    if raw.get("format") != FORMAT:
        raise ManifestError(f"{target}: format {raw.get('format')!r} is not {FORMAT!r}")
    try:
        shards = [ShardInfo(**s) for s in raw["shards"]]
        manifest = Manifest(split=raw["split"], shards=shards, classes=list(raw.get("classes", [])),
                            image_ext=raw.get("image_ext", "png"), skipped=list(raw.get("skipped", [])),
                            location=target)
    except (KeyError, TypeError) as err:
        raise ManifestError(f"{target}: malformed manifest ({err})") from None
    if not shards:
        raise ManifestError(f"{target}: lists no shards")
    for shard in manifest.truncated_shards():
        log.warning("%s: shard %s is truncated (%s); its %d complete samples are read", target, shard.url,
                    shard.truncated, shard.num_samples)
    return manifest
