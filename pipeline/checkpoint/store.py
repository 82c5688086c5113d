"""Checkpoint directories with a commit marker, discovery of the newest complete one, and retention.

Layout under ``root``::

    step-00001000/            a complete checkpoint
        state.ckpt            Lightning checkpoint (a folder under DeepSpeed)
        config.yaml           the resolved recipe
        COMPLETE              written last: its presence is the commit; it records the size and SHA-256 of
                              every other file, so a resume can tell a checkpoint damaged afterwards
    .step-00001200.partial/   being written (or left by a crash): never picked up by resume
    mlflow_run.json           the MLflow run these checkpoints belong to (a resume continues it)
    exports/step-00001000/    safetensors export of a step, made when it is registered
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE = "state.ckpt"
CONFIG = "config.yaml"
RUN_ID = "mlflow_run.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass
class CheckpointConfig:
    """Where and how often to checkpoint, and which checkpoints to keep."""

    dir: str = "checkpoints"
    enabled: bool = True
    """False: write no checkpoints at all (smoke runs and benchmarks of large models; nothing to resume)."""
    every_n_steps: int = 1000
    keep_last: int = 3
    keep_every_n_steps: int | None = None
    """Also keep every checkpoint whose step is a multiple of this (for later evaluation)."""
    mirror: str | None = None
    """Object-store prefix (``s3://bucket/runs/x``, any fsspec URL) that receives a copy of every complete
    checkpoint; ``--resume auto`` then resumes from the newest complete copy there, fetching it into ``dir``.
    For nodes that share no filesystem: ``dir`` is then each node's local disk."""

    def __post_init__(self) -> None:
        if self.every_n_steps < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every_n_steps and checkpoint.keep_last must be >= 1")
        if "://" in self.dir:
            raise ValueError(f"checkpoint.dir: {self.dir} is a URL; checkpoints are written to a filesystem path "
                             "(local or shared) and copied to object storage with checkpoint.mirror")


def step_name(step: int) -> str:
    """A checkpoint folder's name, locally and in the mirror."""
    return f"step-{step:08d}"


def step_dir(root: Path, step: int) -> Path:
    return root / step_name(step)


def partial_dir(root: Path, step: int) -> Path:
    return root / f".{step_name(step)}.partial"


def marker_text(step: int, files: dict[str, dict[str, Any]] | None = None) -> str:
    """What the COMPLETE marker holds: the step and time (locally and in the mirror), and locally the size and
    SHA-256 of each file of the checkpoint."""
    body: dict[str, Any] = {"step": step, "time": time.time()}
    if files is not None:
        body["files"] = files
    return json.dumps(body)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):  # hashlib releases the GIL on large buffers: files hash in parallel
            digest.update(chunk)
    return digest.hexdigest()


def file_records(folder: Path) -> dict[str, dict[str, Any]]:
    """{path relative to ``folder``: {"size", "sha256"}} of every file under it but the marker. Reads every
    byte once (a few seconds per 10 GB on a few threads): the price of telling a damaged checkpoint apart."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MARKER)
    with ThreadPoolExecutor(max_workers=4) as pool:
        hashes = list(pool.map(_sha256, files))
    return {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": h} for p, h in zip(files, hashes)}


def damage(step_folder: Path) -> str | None:
    """What is wrong with a committed checkpoint's files against its marker's record (the first problem
    found), or None when they match. A marker without a record (written before records were kept, or a
    mirror's) is taken on trust."""
    try:
        files = json.loads((step_folder / MARKER).read_text()).get("files")
    except (OSError, ValueError) as err:
        return f"its {MARKER} marker cannot be read ({err})"
    if files is None:
        return None
    for rel, want in sorted(files.items()):
        path = step_folder / rel
        if not path.is_file():
            return f"{path} is missing"
        if (size := path.stat().st_size) != want["size"]:
            return f"{path} has {size} bytes, {want['size']} were committed"
    for rel, want in sorted(files.items()):
        if _sha256(step_folder / rel) != want["sha256"]:
            return f"{step_folder / rel} does not hold the bytes committed (SHA-256 differs)"
    return None


def newest_sound(root: str | Path, before: int | None = None) -> Path | None:
    """The newest complete checkpoint under ``root`` (of a step below ``before``, when given) whose files match
    its marker's record; each damaged newer one is named in a warning and passed over."""
    for step, folder in reversed(complete_checkpoints(root)):
        if before is not None and step >= before:
            continue
        if (problem := damage(folder)) is None:
            return folder
        log.warning("checkpoint %s is damaged: %s; falling back to the previous one", folder, problem)
    return None


def steps_to_prune(steps: list[int], keep_last: int, keep_every: int | None) -> list[int]:
    """The retention rule: of ``steps`` (oldest first), those beyond the newest ``keep_last`` that are not
    multiples of ``keep_every``."""
    old = steps[:-keep_last] if keep_last else steps
    return [s for s in old if not (keep_every and s % keep_every == 0)]


def complete_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, dir) of every complete checkpoint under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / MARKER).is_file() and (d / STATE).exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_complete(root: str | Path) -> Path | None:
    found = complete_checkpoints(root)
    return found[-1][1] if found else None


def committed_step(checkpoint: str | Path) -> Path:
    """A complete step folder: ``checkpoint`` itself, or a checkpoint folder's newest complete step."""
    step = latest_complete(checkpoint) or Path(checkpoint)
    if not (step / MARKER).is_file():
        raise FileNotFoundError(f"{checkpoint}: no complete checkpoint (no {MARKER} marker)")
    return step


def commit(tmp: Path, final: Path, step: int) -> Path:
    """Write the marker last, with the record of the files it commits, then move the folder into its final
    name (atomic on one filesystem)."""
    (tmp / MARKER).write_text(marker_text(step, file_records(tmp)))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    return final


def prune(root: str | Path, keep_last: int, keep_every: int | None) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last`` except multiples of ``keep_every``."""
    found = dict(complete_checkpoints(root))
    removed = [found[step] for step in steps_to_prune(sorted(found), keep_last, keep_every)]
    for d in removed:
        shutil.rmtree(d, ignore_errors=True)
    return removed


def resolve_resume(resume: str | None, root: str | Path) -> Path | None:
    """``auto``: the newest complete checkpoint under root that is not damaged (None if there is none); a path:
    that checkpoint, which must be complete and undamaged."""
    if resume in (None, "", "none", "never"):
        return None
    if resume == "auto":
        return newest_sound(root)
    path = Path(resume)
    if path.name == STATE:
        path = path.parent
    if not (path / MARKER).is_file():
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {MARKER} marker)")
    if (problem := damage(path)) is not None:
        raise ValueError(f"checkpoint {path} is damaged: {problem}")
    return path
