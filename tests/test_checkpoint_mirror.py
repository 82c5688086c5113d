"""The checkpoint mirror's rules on a local folder as the store (the S3 round trip is in test_s3/test_zero):
which rank uploads which file, markers written last and removed first, fetch completing a partial copy."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.checkpoint.mirror import Mirror, files_of_rank
from pipeline.checkpoint.resume import find_resume
from pipeline.checkpoint.store import MARKER, STATE, CheckpointConfig, commit, partial_dir, step_dir
from pipeline.data.storage import StorageError

ZERO_FILES = ["checkpoint/mp_rank_00_model_states.pt", "checkpoint/zero_pp_rank_0_mp_rank_00_optim_states.pt",
              "checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt",
              "checkpoint/bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt", "latest", "zero_to_fp32.py"]


def _checkpoint(root: Path, step: int, files=ZERO_FILES) -> Path:
    tmp = partial_dir(root, step)
    for i, rel in enumerate(files):
        (tmp / STATE / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / STATE / rel).write_bytes(bytes([step % 256]) * (100 + i))
    (tmp / "config.yaml").write_text("seed: 0\n")
    return commit(tmp, step_dir(root, step), step)


def _mirror_all(mirror: Mirror, folder: Path, step: int, ranks=(0, 1, 10)) -> None:
    for rank in ranks:
        mirror.upload(folder, step, files_of_rank(folder, rank))
    mirror.mark_complete(step)


def test_each_file_has_one_uploader(tmp_path):
    folder = _checkpoint(tmp_path, 3)
    rel = {r: sorted(p.relative_to(folder).as_posix() for p in files_of_rank(folder, r)) for r in (0, 1, 2, 10)}
    assert rel[1] == ["state.ckpt/checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert rel[10] == ["state.ckpt/checkpoint/bf16_zero_pp_rank_10_mp_rank_00_optim_states.pt"]
    assert rel[2] == []
    assert "state.ckpt/checkpoint/mp_rank_00_model_states.pt" in rel[0] and "config.yaml" in rel[0]
    assert MARKER in rel[0]  # listed, but the upload skips it: only mark_complete writes the mirror's marker
    every = [f for files in rel.values() for f in files]
    assert len(every) == len(set(every)) == sum(1 for p in folder.rglob("*") if p.is_file())


def test_unmarked_and_pruned_steps_are_never_resumed(tmp_path):
    local, mirror = tmp_path / "local", Mirror(str(tmp_path / "bucket"))
    for step in (3, 6, 9):
        _mirror_all(mirror, _checkpoint(local, step), step)
    mirror.upload(_checkpoint(local, 12), 12, files_of_rank(step_dir(local, 12), 0))  # rank 1 never finished
    assert not (tmp_path / "bucket" / "step-00000012" / MARKER).exists()
    assert mirror.complete_steps() == [3, 6, 9]
    assert mirror.prune(keep_last=2, keep_every=None) == [3]
    assert mirror.complete_steps() == [6, 9] and not (tmp_path / "bucket" / "step-00000003").exists()

    cfg = CheckpointConfig(dir=str(tmp_path / "node1"), mirror=str(tmp_path / "bucket"))
    point = find_resume("auto", cfg)
    assert point.folder == step_dir(Path(cfg.dir), 9) and (point.fetch.mirror, point.fetch.step) == (cfg.mirror, 9)
    url = find_resume(f"{tmp_path.as_uri()}/bucket/step-00000006", cfg)
    assert url.fetch.step == 6 and url.folder == step_dir(Path(cfg.dir), 6)
    with pytest.raises(ValueError, match="step-NNNNNNNN"):
        find_resume("s3://bucket/run/latest", cfg)
    with pytest.raises(StorageError, match="not a complete checkpoint"):
        Mirror(str(tmp_path / "bucket")).fetch(12, step_dir(Path(cfg.dir), 12))


def test_fetch_completes_a_partial_local_copy(tmp_path):
    """A node that holds only its own rank's files (no shared filesystem) gets the others' and a marker."""
    source, mirror = _checkpoint(tmp_path / "node0", 6), Mirror(str(tmp_path / "bucket"))
    _mirror_all(mirror, source, 6)
    node1 = step_dir(tmp_path / "node1", 6)
    mine = "state.ckpt/checkpoint/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    (node1 / mine).parent.mkdir(parents=True)
    (node1 / mine).write_bytes((source / mine).read_bytes())
    (node1 / "state.ckpt" / "latest").write_bytes(b"stale, of another size")
    fetched = mirror.fetch(6, node1)
    want = {p.relative_to(source).as_posix(): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    got = {p.relative_to(node1).as_posix(): p.read_bytes() for p in node1.rglob("*") if p.is_file()}
    assert set(got) == set(want) and all(got[k] == want[k] for k in want if k != MARKER)
    assert fetched == sum(len(v) for k, v in want.items() if k not in (MARKER, mine))
    assert mirror.fetch(6, node1) == 0  # complete now: nothing to fetch


def test_checkpoint_dir_must_be_a_path():
    with pytest.raises(ValueError, match="checkpoint.mirror"):
        CheckpointConfig(dir="s3://bucket/ckpt")
