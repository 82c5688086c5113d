"""Checkpoint discovery, commit marker and retention, on real folders."""
from __future__ import annotations

import json
import logging

import pytest

from pipeline.checkpoint.store import (
    MARKER,
    STATE,
    commit,
    complete_checkpoints,
    damage,
    latest_complete,
    marker_text,
    partial_dir,
    prune,
    resolve_resume,
    step_dir,
)


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


def _make_sharded(root, step):
    """A checkpoint shaped like a ZeRO one: a state folder of several files."""
    tmp = partial_dir(root, step)
    (tmp / STATE / "checkpoint").mkdir(parents=True)
    for rank in (0, 1):
        (tmp / STATE / "checkpoint" / f"rank{rank}_optim_states.pt").write_bytes(bytes([rank]) * 1000)
    (tmp / "config.yaml").write_text("task: mae\n")
    return commit(tmp, step_dir(root, step), step)


@pytest.mark.parametrize("harm", ["truncate", "delete", "flip"])
def test_a_checkpoint_damaged_after_its_commit_is_named_and_passed_over(tmp_path, caplog, harm):
    _make_sharded(tmp_path, 10)
    newest = _make_sharded(tmp_path, 20)
    record = json.loads((newest / MARKER).read_text())["files"]
    assert set(record) == {"config.yaml", "state.ckpt/checkpoint/rank0_optim_states.pt",
                           "state.ckpt/checkpoint/rank1_optim_states.pt"}
    assert record["config.yaml"]["size"] == 10 and len(record["config.yaml"]["sha256"]) == 64
    assert damage(newest) is None and resolve_resume("auto", tmp_path) == newest

    shard = newest / STATE / "checkpoint" / "rank1_optim_states.pt"
    if harm == "truncate":
        shard.write_bytes(shard.read_bytes()[:500])
        why = "has 500 bytes, 1000 were committed"
    elif harm == "delete":
        shard.unlink()
        why = "is missing"
    else:  # same size, other bytes: only the hash tells
        shard.write_bytes(b"\x07" * 1000)
        why = "SHA-256 differs"
    assert str(shard) in damage(newest) and why in damage(newest)
    with caplog.at_level(logging.WARNING):
        assert resolve_resume("auto", tmp_path) == step_dir(tmp_path, 10)
    assert f"checkpoint {newest} is damaged" in caplog.text and str(shard) in caplog.text
    with pytest.raises(ValueError, match="damaged"):  # named explicitly: refused, not silently replaced
        resolve_resume(str(newest), tmp_path)


def test_checkpoints_committed_before_file_records_still_resume(tmp_path):
    old = _make_sharded(tmp_path, 10)
    (old / MARKER).write_text(marker_text(10))  # the marker as it was written before records were kept
    (old / "config.yaml").unlink()  # nothing to check it against: taken on trust
    assert damage(old) is None and resolve_resume("auto", tmp_path) == old


def test_a_mirror_without_checkpoints_falls_back_to_the_newest_sound_local_one(tmp_path, caplog):
    from pipeline.checkpoint.resume import find_resume
    from pipeline.checkpoint.store import CheckpointConfig

    root = tmp_path / "ckpt"
    _make_sharded(root, 10)
    newest = _make_sharded(root, 20)
    (newest / "config.yaml").write_text("damaged\n")
    cfg = CheckpointConfig(dir=str(root), mirror=str(tmp_path / "empty-bucket"))
    with caplog.at_level(logging.WARNING):
        point = find_resume("auto", cfg)
    assert point is not None and point.folder == step_dir(root, 10) and point.fetch is None
    assert f"checkpoint {newest} is damaged" in caplog.text and "holds no complete checkpoint" in caplog.text
