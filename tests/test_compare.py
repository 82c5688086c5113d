"""`vitpipe compare`: speed and memory of a ViT and a CNN measured in their own processes, written in timm's
benchmark columns with a plot."""
from __future__ import annotations

import csv
import subprocess

from conftest import PYTHON


def test_compare_writes_timm_benchmark_columns_and_a_plot(tmp_path, child_env):
    out = subprocess.run([PYTHON, "-m", "pipeline.cli", "compare", "--models", "vit_tiny_patch16_224,resnet10t",
                          "--image-size", "32", "--batch", "2", "--steps", "1", "--out", str(tmp_path)],
                         env=child_env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    with (tmp_path / "compare.csv").open() as f:
        rows = {r["model"]: r for r in csv.DictReader(f)}
    assert set(rows) == {"vit_tiny_patch16_224", "resnet10t"}
    vit = rows["vit_tiny_patch16_224"]
    for column in ("param_count", "infer_gmacs", "infer_samples_per_sec", "infer_step_time", "infer_batch_size",
                   "infer_img_size", "train_samples_per_sec", "train_step_time", "train_batch_size",
                   "train_img_size", "train_peak_mem_mb"):
        assert float(vit[column]) > 0, column
    import timm

    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32)
    assert float(vit["param_count"]) == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"
