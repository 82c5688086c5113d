"""Where a run resumes from: a local step folder, or the newest complete copy in the checkpoint mirror, which
is fetched into the local folder by every node before the state is loaded."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from .mirror import Mirror
from .shared_fs import folder_owner
from .store import STEP_DIR, CheckpointConfig, complete_checkpoints, newest_sound, resolve_resume, step_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Fetch:
    """The mirror's copy of one step, to be fetched before the run loads it."""

    mirror: str
    step: int


@dataclass(frozen=True)
class ResumePoint:
    folder: Path
    """The local step folder the run loads."""
    fetch: Fetch | None = None


def find_resume(resume: str | None, cfg: CheckpointConfig) -> ResumePoint | None:
    """``auto`` with a mirror: the mirror's newest complete checkpoint (the mirror is what every node sees; a
    local one newer than it was not mirrored and is passed over, with a warning). ``auto`` without a mirror, or
    a path: as :func:`resolve_resume`. A URL of a mirrored step folder: that step, fetched."""
    root = Path(cfg.dir)
    if resume and "://" in resume:
        base, _, name = resume.rstrip("/").rpartition("/")
        m = STEP_DIR.match(name)
        if m is None:
            raise ValueError(f"--resume {resume}: a mirrored checkpoint URL ends in step-NNNNNNNN")
        return ResumePoint(step_dir(root, int(m.group(1))), Fetch(base, int(m.group(1))))
    if resume == "auto" and cfg.mirror:
        step = Mirror(cfg.mirror).latest()
        local = complete_checkpoints(root)
        if step is None:
            if (sound := newest_sound(root)) is not None:
                log.warning("%s holds no complete checkpoint: resuming from the local %s", cfg.mirror, sound)
                return ResumePoint(sound)
            return None
        if local and local[-1][0] > step:
            log.warning("local checkpoint %s is newer than the newest mirrored one (step %d) but was not mirrored; "
                        "resuming from the mirror's", local[-1][1], step)
        return ResumePoint(step_dir(root, step), Fetch(cfg.mirror, step))
    folder = resolve_resume(resume, root)
    return None if folder is None else ResumePoint(folder)


class FetchCheckpoint(L.Callback):
    """Before the state is restored, one process per copy of the checkpoint folder (per node, unless the nodes
    share it) completes the local copy from the mirror; the others wait."""

    def __init__(self, point: ResumePoint):
        assert point.fetch is not None
        self.point = point

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        fetch = self.point.fetch
        if folder_owner(trainer.strategy, self.point.folder.parent):
            got = Mirror(fetch.mirror).fetch(fetch.step, self.point.folder)
            log.warning("fetched %.1f MB of checkpoint step %d from %s into %s", got / 1e6, fetch.step,
                        fetch.mirror, self.point.folder)
        trainer.strategy.barrier("checkpoint-fetched")
