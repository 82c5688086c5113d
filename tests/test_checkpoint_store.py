"""Checkpoint discovery, commit marker and retention, on real folders."""
from __future__ import annotations

import pytest

from pipeline.checkpoint.store import (MARKER, STATE, commit, complete_checkpoints, latest_complete, partial_dir,
                                       prune, resolve_resume, step_dir)


def _make(root, step, complete=True):
    tmp = partial_dir(root, step)
    tmp.mkdir(parents=True)
    (tmp / STATE).write_bytes(b"x")
    if complete:
        return commit(tmp, step_dir(root, step), step)
    return tmp


def test_only_complete_checkpoints_are_found(tmp_path):
    _make(tmp_path, 10)
    _make(tmp_path, 20)
    _make(tmp_path, 30, complete=False)  # crashed while writing
    # a folder with the final name but no marker (e.g. copied by hand, interrupted) is not complete either
    bogus = step_dir(tmp_path, 40)
    bogus.mkdir()
    (bogus / STATE).write_bytes(b"x")
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [10, 20]
    assert latest_complete(tmp_path) == step_dir(tmp_path, 20)
    assert resolve_resume("auto", tmp_path) == step_dir(tmp_path, 20)
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume(str(step_dir(tmp_path, 10) / STATE), tmp_path) == step_dir(tmp_path, 10)
    with pytest.raises(FileNotFoundError, match=MARKER):
        resolve_resume(str(bogus), tmp_path)
    assert latest_complete(tmp_path / "missing") is None


def test_retention_keeps_last_k_and_every_nth(tmp_path):
    for step in range(100, 1100, 100):
        _make(tmp_path, step)
    removed = prune(tmp_path, keep_last=2, keep_every=500)
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [500, 900, 1000]
    assert len(removed) == 7
