"""The fault table (benchmarks/faults.py) in the suite: its accounting of lost and repeated samples, on the NaN
row. The other rows' scenarios are tests of their own, checked step by step: the damaged checkpoint in
tests/test_resume.py, the tracking server lost at the end in tests/test_tracking_resilience.py, rollbacks in
tests/test_guard.py, a full disk below."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO, tiny_overrides

pytestmark = pytest.mark.slow


def test_fault_table_accounts_a_skipped_batch_as_skipped_not_lost(tmp_path, child_env):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), "--rows",
                          "nan", "--work", str(tmp_path), "--json", str(tmp_path / "rows.json")],
                         env=child_env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    rows = {r["fault"].split(" ")[0]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert all(r["recovered"] and r["lost"] == 0 and r["repeated"] == 0 for r in rows.values()), rows
    assert rows["NaN"]["by_design"] == 16 and rows["NaN"]["redone"] == 0  # one skipped batch, nothing redone
    assert "| fault | recovered |" in out.stdout


def test_a_full_disk_stops_the_run_clearly_and_the_rerun_resumes(fmnist_shards, tmp_path):
    """ENOSPC while writing checkpoint 8 (benchmarks/faults.py fills a real tmpfs instead): the run stops with
    an error naming the step and the way on, no partial folder is left, and --resume auto takes step 4."""
    from fault_injection import NoSpaceAt

    from pipeline.checkpoint.callback import CheckpointWriteError
    from pipeline.recipe import load_recipe
    from pipeline.stages.train import train

    recipe = load_recipe("mae/tiny_fmnist", tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 10}))
    ckpt = tmp_path / "ckpt"
    with pytest.raises(CheckpointWriteError, match=r"checkpoint of step 8: writing .*No space left on device.*"
                                                   r"newest complete checkpoint is .*step-00000004"):
        train(recipe, resume="none", extra_callbacks=[NoSpaceAt(8)])
    assert not list(ckpt.glob(".step-*.partial")) and not (ckpt / "step-00000008").exists()
    result = train(recipe, resume="auto")
    assert result.global_step == 10 and result.checkpoint.name == "step-00000010"


def test_a_full_disk_on_one_rank_stops_every_rank_of_a_zero_run(fmnist_shards, tmp_path, child_env):
    """ZeRO-2, 2 processes: rank 1's optimizer shard of checkpoint 4 fails with ENOSPC while rank 0 writes its
    files. Every rank stops with the error, none left waiting in a collective for the other; no partial folder
    stays, and the rerun resumes from checkpoint 2."""
    from test_zero import strategy_overrides, torchrun

    overrides = strategy_overrides(fmnist_shards, tmp_path, 2, **{"trainer.max_steps": 6,
                                                                  "checkpoint.every_n_steps": 2})
    proc = torchrun(overrides, child_env, "--no-space-at", "4", "--no-space-rank", "1", timeout=240)
    assert proc.returncode != 0
    assert "CheckpointWriteError: checkpoint of step 4" in proc.stderr, proc.stderr[-4000:]
    assert "No space left on device" in proc.stderr and "failed (on another rank)" in proc.stderr
    ckpt = tmp_path / "ckpt"
    assert not list(ckpt.glob(".step-*.partial")) and not (ckpt / "step-00000004").exists()
    proc = torchrun(overrides, child_env, timeout=240)  # --resume auto
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resuming from" in proc.stderr + proc.stdout and "step-00000002" in proc.stderr + proc.stdout
    assert (ckpt / "step-00000006").is_dir()
