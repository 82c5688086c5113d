"""The README's first command: `vitpipe demo` shards Fashion-MNIST, pretrains (here: a few steps), registers
the encoder and compares it with its random initialisation and raw pixels (here: on small subsets)."""
from __future__ import annotations

import json
import subprocess

import pytest

from conftest import PYTHON

pytestmark = pytest.mark.slow


def test_demo_shards_trains_and_reports_mlflow_run(tmp_path, child_env):
    out = subprocess.run([PYTHON, "-m", "pipeline.cli", "demo", "--workdir", str(tmp_path / "demo"), "--steps", "3",
                          "--eval-train", "300", "--eval-val", "100"],
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
    assert "registered models:/vitpipe-demo-mae/1 (alias @demo)" in out.stdout
    table = out.stdout[out.stdout.index("| features |"):]
    for row in ("| MAE-pretrained encoder |", "| same encoder, random init |", "| raw pixels |"):
        assert row in table
    assert "300 train / 100 held-out images" in out.stdout
    assert "mlflow ui --backend-store-uri" in out.stdout.split("| raw pixels |")[1]
