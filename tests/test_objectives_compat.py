"""Checkpoints written before objectives were declared in one place still resume and export."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from conftest import mlflow_store

from pipeline.recipe import load_recipe

FIXTURE = Path(__file__).parent / "fixtures" / "mae_checkpoint_v1"


@pytest.fixture(scope="module")
def legacy_run(tmp_path_factory) -> Path:
    """The fixture's checkpoints and the shards they were trained on, written again the same way."""
    import sys

    sys.path.insert(0, str(FIXTURE.parent))
    from make_mae_checkpoint_v1 import write_data

    work = tmp_path_factory.mktemp("legacy")
    write_data(work / "shards")
    shutil.copytree(FIXTURE, work / "ckpt")
    return work


def test_legacy_checkpoint_resumes(legacy_run: Path):
    from pipeline.stages.train import train as pretrain

    work = legacy_run
    recipe = load_recipe(str(work / "ckpt" / "config.yaml"), {
        "data.train": str(work / "shards" / "train"), "data.val": str(work / "shards" / "val"),
        "checkpoint.dir": str(work / "ckpt"), "tracking.uri": mlflow_store(work)})
    result = pretrain(recipe, resume="auto")
    assert result.global_step == 4  # continued from step 2 to the recipe's max_steps
    assert result.checkpoint.name == "step-00000004"


def test_legacy_checkpoint_exports(legacy_run: Path, tmp_path: Path):
    from pipeline.exports.vit import load_encoder, load_mae
    from pipeline.stages.export import export_checkpoint

    out = export_checkpoint(legacy_run / "ckpt" / "step-00000002", tmp_path / "export")
    encoder = load_encoder(out)
    assert encoder.cfg.embed_dim == 16 and tuple(encoder.cfg.image_size) == (16, 16)
    assert load_mae(out).decoder_embed.out_features == 16
