"""A run killed mid-epoch and resumed (past a checkpoint damaged after its commit) logs the same losses and
sample keys as an uninterrupted run."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from conftest import PROGRAM, REPO, tiny_overrides

pytestmark = pytest.mark.slow


def _run(overrides: dict, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, str(REPO / "tests" / "run_pretrain.py"), json.dumps(overrides), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


def _trace(path: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())}


def test_killed_and_resumed_run_matches_uninterrupted(fmnist_shards, tmp_path, child_env):
    # 2,000 samples / batch 16 = 125 batches per epoch: steps 1..16 are all mid-epoch.
    common = {"trainer.max_steps": 16, "checkpoint.every_n_steps": 4, "data.num_workers": 2,
              "data.shuffle": "true", "data.interleave": 3}
    ref = tiny_overrides(fmnist_shards, tmp_path / "ref", **common, **{"trainer.sample_trace": tmp_path / "ref.jsonl"})
    assert _run(ref, child_env).returncode == 0

    work = tmp_path / "killed"
    killed = tiny_overrides(fmnist_shards, work, **common, **{"trainer.sample_trace": tmp_path / "killed.jsonl"})
    first = _run(killed, child_env, "--kill-in-checkpoint-at", "12")
    assert first.returncode == -9, first.stderr[-3000:]
    ckpt = work / "ckpt"
    assert (ckpt / ".step-00000012.partial").is_dir()  # the half-written checkpoint is there...
    assert sorted(p.name for p in ckpt.glob("step-*")) == ["step-00000004", "step-00000008"]

    # ...and step 8 is damaged after its commit (its state file cut short, as a full disk or a bad copy would)
    state = ckpt / "step-00000008" / "state.ckpt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])

    second = _run(killed, child_env)  # resume --auto names the damage and takes step 4: never the partial one
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"checkpoint {ckpt / 'step-00000008'} is damaged: {state} has" in second.stderr
    assert "resuming from" in second.stderr and "step-00000004" in second.stderr

    want, got = _trace(tmp_path / "ref.jsonl"), _trace(tmp_path / "killed.jsonl")
    assert sorted(want) == list(range(1, 17))
    for step in range(5, 17):  # every step after the resume point (5..8 trained again)
        assert got[step]["keys"] == want[step]["keys"], f"step {step}: different samples"
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5, abs=1e-6), f"step {step}"
    # and the steps before the kill saw the same data too (same plan, same seed)
    for step in range(1, 12):
        assert got[step]["keys"] == want[step]["keys"]
    # no sample is seen twice within the epoch
    keys = [k for s in range(1, 17) for k in got[s]["keys"]]
    assert len(keys) == len(set(keys)) == 16 * 16


def test_resume_on_fewer_processes_finishes_the_epoch_without_repeats(fmnist_shards, tmp_path, child_env):
    """2 DDP processes stop mid-epoch; 1 process resumes: epoch 0 holds all 2,000 samples, each once."""

    def cli(extra: dict, trace: str) -> subprocess.CompletedProcess:
        o = tiny_overrides(fmnist_shards, tmp_path, **{"data.num_workers": 1, "checkpoint.every_n_steps": 20,
                                                       "trainer.sample_trace": tmp_path / trace, **extra})
        return subprocess.run([*PROGRAM, "-m", "pipeline.cli", "pretrain", "--config", "mae/tiny_fmnist",
                               *(f"--{k}={v}" for k, v in o.items())], env=child_env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=600)

    first = cli({"trainer.strategy": "ddp", "trainer.devices": 2, "trainer.max_steps": 40}, "two.jsonl")
    assert first.returncode == 0, first.stderr[-3000:]
    # 2,000 samples / 16 per step = 125 steps in epoch 0: 40 on two processes, the other 85 on one
    second = cli({"trainer.devices": 1, "trainer.max_steps": 125}, "one.jsonl")
    assert second.returncode == 0, second.stderr[-3000:]
    assert "epoch 0 continues after its first 640 samples" in second.stderr  # 40 steps x 16
    records = [json.loads(line) for name in ("two.rank0.jsonl", "two.rank1.jsonl", "one.jsonl")
               for line in (tmp_path / name).read_text().splitlines()]
    assert {r["epoch"] for r in records} == {0}
    assert sorted({r["step"] for r in records}) == list(range(1, 126))
    keys = [k for r in records for k in r["keys"]]
    assert len(keys) == len(set(keys)) == 2000
