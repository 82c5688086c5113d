"""A copy of the committed checkpoints under an object-store prefix (any fsspec URL), for clusters whose nodes
share no filesystem, and the way back: the newest complete copy fetched into a node's local folder.

Layout under the prefix mirrors the local one::

    <prefix>/step-00001000/state.ckpt/...   uploaded by the ranks that wrote the files
    <prefix>/step-00001000/COMPLETE         written last, once every rank's upload succeeded
    <prefix>/config.yaml, mlflow_run.json

A folder without its marker (an upload cut short, a deletion under way) is never fetched.
"""
from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import fsspec

from ..data.storage import StorageError, explain
from ..retry import Attempts, RetryPolicy
from .store import MARKER, STEP_DIR, marker_text, step_name, steps_to_prune

# DeepSpeed names each data-parallel rank's files "..zero_pp_rank_<R>_mp_rank_..": that rank uploads them.
_RANK_FILE = re.compile(r"(?:^|_)zero_pp_rank_(\d+)_")


def files_of_rank(folder: Path, rank: int) -> list[Path]:
    """The files under ``folder`` that ``rank`` uploads: its own ZeRO shards, and for rank 0 everything that
    belongs to no rank (model states, DeepSpeed's ``latest``, a DDP checkpoint file, the config)."""
    out = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        m = _RANK_FILE.search(path.name)
        if (int(m.group(1)) == rank) if m else rank == 0:
            out.append(path)
    return out


class Mirror:
    def __init__(self, url: str, retry: RetryPolicy | None = None):
        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")
        self.retry = retry or RetryPolicy(retries=3, backoff_s=2.0)

    def step_url(self, step: int) -> str:
        return f"{self.url}/{step_name(step)}"

    def _path(self, step: int, rel: str = "") -> str:
        return f"{self.root}/{step_name(step)}" + (f"/{rel}" if rel else "")

    def _retrying(self, what: str, fn):
        """Object stores fail transiently: retry with backoff; a refusal (permission, missing bucket) is final."""
        attempts = Attempts(self.retry, f"{self.url}: {what}", final=(PermissionError, FileNotFoundError))
        while True:
            try:
                return fn()
            except OSError as err:
                if not attempts.retry(err):
                    raise explain(self.url, err, what) from None

    # ---- listing -------------------------------------------------------------------------------------------
    def complete_steps(self) -> list[int]:
        """Steps with a marker, oldest first."""
        self.fs.invalidate_cache()  # another process (rank 0 of an earlier run) may have written since
        try:
            entries = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except PermissionError as err:
            raise explain(self.url, err, "listing checkpoints") from None
        steps = []
        for entry in entries:
            m = STEP_DIR.match(entry.rstrip("/").rsplit("/", 1)[-1])
            if m and self.fs.exists(self._path(int(m.group(1)), MARKER)):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def latest(self) -> int | None:
        steps = self.complete_steps()
        return steps[-1] if steps else None

    # ---- upload ---------------------------------------------------------------------------------------------
    def clear(self, step: int) -> None:
        """Remove what an earlier, interrupted upload of ``step`` left (it has no marker: nothing reads it)."""
        path = self._path(step)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def upload(self, folder: Path, step: int, files: list[Path]) -> int:
        """Copy ``files`` (under the local checkpoint ``folder``) to the step's prefix; returns bytes sent."""
        sent = 0
        rels = [p.relative_to(folder).as_posix() for p in files]
        for parent in sorted({self._path(step, rel).rpartition("/")[0] for rel in rels}):
            self._retrying("creating the checkpoint prefix", partial(self.fs.makedirs, parent, exist_ok=True))
        for path, rel in zip(files, rels):
            if rel == MARKER:
                continue
            put = partial(self.fs.put_file, str(path), self._path(step, rel))
            self._retrying(f"uploading checkpoint file {rel}", put)
            sent += path.stat().st_size
        return sent

    def mark_complete(self, step: int) -> None:
        body = marker_text(step).encode()
        self._retrying("committing the checkpoint", lambda: self.fs.pipe_file(self._path(step, MARKER), body))

    def put_text(self, name: str, text: str) -> None:
        self._retrying("creating the checkpoint prefix", lambda: self.fs.makedirs(self.root, exist_ok=True))
        self._retrying(f"writing {name}", lambda: self.fs.pipe_file(f"{self.root}/{name}", text.encode()))

    def get_text(self, name: str) -> str | None:
        try:
            return self.fs.cat_file(f"{self.root}/{name}").decode()
        except FileNotFoundError:
            return None

    def prune(self, keep_last: int, keep_every: int | None) -> list[int]:
        """The local retention rule, applied to the mirror; the marker goes first so a half-deleted folder
        never counts as complete."""
        removed = steps_to_prune(self.complete_steps(), keep_last, keep_every)
        for step in removed:
            self.fs.rm_file(self._path(step, MARKER))
            self.fs.rm(self._path(step), recursive=True)
        return removed

    # ---- download -------------------------------------------------------------------------------------------
    def fetch(self, step: int, local: Path) -> int:
        """Make ``local`` (a step folder) a complete copy of the mirror's ``step``: files missing or of another
        size are downloaded; the local marker is removed first and written last. Returns bytes fetched."""
        remote = self._path(step)
        listing = self._retrying("listing a checkpoint", lambda: self.fs.find(remote, detail=True))
        if MARKER not in {p[len(remote) + 1:] for p in listing}:
            raise StorageError(f"{self.step_url(step)}: not a complete checkpoint (no {MARKER} marker)")
        (local / MARKER).unlink(missing_ok=True)
        got = 0
        for path, info in sorted(listing.items()):
            rel = path[len(remote) + 1:]
            target = local / rel
            if rel == MARKER or (target.is_file() and target.stat().st_size == info["size"]):
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            part = target.with_name(target.name + ".part")
            self._retrying(f"downloading checkpoint file {rel}", partial(self.fs.get_file, path, str(part)))
            part.rename(target)
            got += info["size"]
        (local / MARKER).write_bytes(self.fs.cat_file(self._path(step, MARKER)))
        return got
