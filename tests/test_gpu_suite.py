"""benchmarks/gpu_suite.sh --cpu-smoke: the GPU suite's steps (synthetic JPEG shards, the real training path
model-only and through the loader with the device-decode path, MLflow, the profile) with tiny models on the
CPU, so the script works the first time it meets a GPU."""
from __future__ import annotations

import subprocess

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_gpu_suite_runs_its_rows_on_the_cpu(tmp_path, child_env):
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_suite.sh"), "--cpu-smoke", "--workdir",
                          str(tmp_path)], env=child_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    names = [r.split(" | ")[0].lstrip("| ") for r in rows]
    assert names == ["MAE ViT-L/16, model only", "MAE ViT-L/16, model only, guard off",
                     "MAE ViT-L/16, through the loader", "DeiT-B/16, model only", "MAE ViT-L/16, model only, ZeRO-2"]
    for row in rows:
        images_per_s = row.split(" | ")[2]
        assert float(images_per_s) > 0, row  # measured over the windows after the first
    assert "top operators of one step" in out.stdout and "Self CPU" in out.stdout
    assert "host waits for the device in that step (it does not log): 0" in out.stdout
    assert "the GPU was busy for n/a of the profiled step's host span" in out.stdout  # no GPU events on a CPU
    assert (tmp_path / "mlflow.db").is_file() and (tmp_path / "shards" / "train" / "manifest.json").is_file()
