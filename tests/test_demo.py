"""The README's first command: `vitpipe demo` shards Fashion-MNIST and pretrains (here: a few steps)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON

pytestmark = pytest.mark.slow


def test_demo_shards_trains_and_reports_mlflow_run(tmp_path, child_env):
    out = subprocess.run([PYTHON, "-m", "pipeline.cli", "demo", "--workdir", str(tmp_path / "demo"), "--steps", "3"],
                         env=child_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    work = tmp_path / "demo"
    train = json.loads((work / "shards" / "fmnist" / "train" / "manifest.json").read_text())
    val = json.loads((work / "shards" / "fmnist" / "val" / "manifest.json").read_text())
    assert (train["num_samples"], val["num_samples"]) == (60000, 10000)
    assert len(train["classes"]) == 10
    assert "pretrain: 3 steps" in out.stdout
    assert f"sqlite:///{work / 'mlflow' / 'mlflow.db'}" in out.stdout
    assert (work / "checkpoints" / "step-00000003" / "COMPLETE").is_file()
