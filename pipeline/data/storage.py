"""Object storage: the recipe's storage options, and errors that say where and what (the endpoint, the
bucket, the operation refused).

Any fsspec URL works wherever vitpipe takes a path (``s3://`` through s3fs). Endpoint and credentials come
from the standard AWS environment (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
``AWS_PROFILE``) or from a recipe's ``storage`` section, whose secrets must be ``${ENV}`` references.
"""
from __future__ import annotations

import os
import re
from typing import Any
from urllib.parse import urlparse

import fsspec.config

from .config import StorageConfig

_NAME = re.compile(r"^\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?$")


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, str) and (m := _NAME.match(value)):
        if m.group(1) not in os.environ:
            raise ValueError(f"{where}: environment variable {m.group(1)} is not set")
        return os.environ[m.group(1)]
    return value


def apply_storage(cfg: StorageConfig) -> None:
    """Make the options the defaults of every s3 filesystem this process (and its forked workers) opens."""
    if cfg.s3:
        fsspec.config.conf["s3"] = {**fsspec.config.conf.get("s3", {}), **_expand(cfg.s3, "storage.s3")}


class StorageError(ValueError):
    """Object storage refused or lacks what a run needs; the message names endpoint, bucket and operation."""


def is_object_store(url: str) -> bool:
    return urlparse(url).scheme in ("s3", "s3a", "gs", "gcs", "az", "abfs")


def endpoint(url: str) -> str:
    if urlparse(url).scheme in ("s3", "s3a"):
        configured = fsspec.config.conf.get("s3", {})
        return (configured.get("endpoint_url") or configured.get("client_kwargs", {}).get("endpoint_url")
                or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
                or "AWS S3 (default)")
    return urlparse(url).scheme


def bucket_exists(url: str) -> bool | None:
    """True / False when the store answers, None when it cannot say (e.g. listing buckets is denied)."""
    fs, _ = fsspec.core.url_to_fs(url)
    try:
        return bool(fs.exists(urlparse(url).netloc))
    except Exception:  # denied or unreachable: the caller reports the original error
        return None


def explain(url: str, err: BaseException, operation: str) -> StorageError:
    """A StorageError for ``err`` raised by ``operation`` (e.g. "reading the manifest") on ``url``."""
    bucket = urlparse(url).netloc
    where = f"{endpoint(url)}, bucket '{bucket}'"
    if isinstance(err, PermissionError):
        key = (fsspec.config.conf.get("s3", {}).get("key") or os.environ.get("AWS_ACCESS_KEY_ID")
               or os.environ.get("AWS_PROFILE") or "no key set")
        return StorageError(f"{url}: {operation} was denied by {where} (credentials: {key}). Check "
                            "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and what that key may do")
    if isinstance(err, FileNotFoundError) and bucket_exists(url) is False:
        return StorageError(f"{url}: bucket '{bucket}' does not exist at {endpoint(url)} ({operation})")
    return StorageError(f"{url}: {operation} failed at {where}: {err}")


def probe_write(url: str, operation: str) -> None:
    """Write and delete a small object under ``url`` so that a store refusing writes fails now, not after the
    first shard (or training step) has been produced; StorageError names what was refused."""
    fs, path = fsspec.core.url_to_fs(url)
    probe = f"{path.rstrip('/')}/.vitpipe-write-probe"
    try:
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
    except (PermissionError, FileNotFoundError) as err:
        raise explain(url, err, operation) from None
