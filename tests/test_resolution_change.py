"""Using an encoder at another resolution says so: one line (kind, grid before -> after, method) and a run
param, for evaluation (`vitpipe evaluate --image-size`) and fine-tuning (see test_finetune)."""
from __future__ import annotations

import pytest
import torch
from conftest import mlflow_store
from mlflow import MlflowClient

from pipeline.cli import main
from pipeline.exports.vit import write_export
from pipeline.models import ViTConfig, ViTEncoder
from pipeline.models.pos_embed import grid_change


@pytest.mark.parametrize("kind, method", [
    ("learned", "bicubic interpolation of the learned table (antialiased when shrinking)"),
    ("sincos2d", "sin-cos table recomputed for the new grid"),
    ("rope2d", "RoPE positions rescaled onto the trained grid"),
])
def test_grid_change_names_kind_grids_and_method(kind, method):
    enc = ViTEncoder(ViTConfig(size="tiny", image_size=(16, 16), patch_size=4, embed_dim=32, depth=1, num_heads=2,
                               pos_embed=kind))
    meta = enc.pos_embed.meta()
    assert grid_change(meta, (4, 4)) is None
    change = grid_change(meta, (6, 8))
    assert str(change) == f"{kind} position embedding resampled: grid 4x4 -> 6x8, {method}"


def test_evaluate_at_another_image_size_resamples_says_so_and_logs_it(fmnist_shards, tmp_path, capsys):
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(size="tiny", image_size=(16, 16), patch_size=4, embed_dim=32, depth=1, num_heads=2,
                               pos_embed="learned"))
    export = write_export(tmp_path / "export", enc, None, {"mean": [0.5] * 3, "std": [0.5] * 3})
    uri = mlflow_store(tmp_path)
    common = ["evaluate", "--model", str(export), "--train", str(fmnist_shards / "train"), "--val",
              str(fmnist_shards / "val"), "--max-train", "64", "--max-val", "32", "--protocol", "knn",
              "--crop-pct", "1.0", "--tracking-uri", uri]
    assert main(common) == 0
    assert "resampled" not in capsys.readouterr().out  # the model's own size: nothing to say

    assert main([*common, "--image-size", "24"]) == 0
    line = ("learned position embedding resampled: grid 4x4 -> 6x6, bicubic interpolation of the learned table "
            "(antialiased when shrinking)")
    assert f"evaluate {export}: {line}" in capsys.readouterr().out
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("vitpipe").experiment_id],
                              order_by=["attributes.start_time DESC"])
    params = runs[0].data.params
    assert params["eval.position_resample"] == line
    assert params["eval.image_size"] == "[24, 24]"
    assert "eval.position_resample" not in runs[1].data.params

    assert main([*common, "--image-size", "30"]) == 2  # not a multiple of the patch size
    assert "30x30 is not a multiple of patch size 4" in capsys.readouterr().err
