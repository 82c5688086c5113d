"""DeiT on the one training path: a tiny student on Fashion-MNIST, without a teacher and with one (an exported
ViT classifier), through the CLI's recipe, checkpoints and MLflow metrics."""
from __future__ import annotations

import pytest
import torch
from mlflow import MlflowClient

from pipeline.checkpoint.export import write_classifier_export
from pipeline.models.classifier import ViTClassifier
from pipeline.models.vit import ViTConfig, ViTEncoder
from pipeline.recipe import load_recipe
from pipeline.stages.pretrain import pretrain

pytestmark = pytest.mark.slow
FMNIST = {"mean": [0.286] * 3, "std": [0.353] * 3}


def overrides(shards, work, **extra) -> dict[str, str]:
    return {"data.train": str(shards / "train"), "data.val": str(shards / "val"), "trainer.max_steps": "4",
            "trainer.global_batch": "16", "optim.warmup_steps": "1", "checkpoint.dir": str(work / "ckpt"),
            "checkpoint.every_n_steps": "2", "tracking.uri": f"sqlite:///{work / 'mlflow.db'}",
            "trainer.log_every_n_steps": "1", **{k: str(v) for k, v in extra.items()}}


def metrics(work, run_id: str) -> set[str]:
    return set(MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(run_id).data.metrics)


def test_deit_without_a_teacher_trains_and_checkpoints(fmnist_shards, tmp_path):
    result = pretrain(load_recipe("deit/tiny_fmnist", overrides(fmnist_shards, tmp_path)), resume="none")
    assert result.global_step == 4 and result.checkpoint.name == "step-00000004"
    assert torch.isfinite(torch.tensor(result.last_loss))
    assert {"train/loss", "train/loss_label", "train/loss_distill"} <= metrics(tmp_path, result.run_id)
    assert "perf/teacher_s" not in metrics(tmp_path, result.run_id)


def test_deit_with_hard_distillation_from_an_exported_teacher(fmnist_shards, tmp_path):
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(size="tiny", embed_dim=32, depth=1, num_heads=4, image_size=(16, 16), patch_size=4))
    teacher = write_classifier_export(tmp_path / "teacher", ViTClassifier(enc, 10, pool="cls"), FMNIST)
    recipe = load_recipe("deit/tiny_fmnist", overrides(fmnist_shards, tmp_path, **{
        "model.distill.kind": "hard", "model.teacher.model": teacher}))
    result = pretrain(recipe, resume="none")
    assert result.global_step == 4
    assert {"train/loss_distill", "perf/teacher_s"} <= metrics(tmp_path, result.run_id)
    state = torch.load(result.checkpoint / "state.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith("model.") for k in state)  # the teacher is not saved with the student
    assert "model.encoder.dist_token" in state and "model.head_dist.weight" in state


def test_deit_recipe_errors_name_the_field():
    with pytest.raises(Exception, match="model.teacher.model is empty"):
        load_recipe("deit/tiny_fmnist", {"model.distill.kind": "soft"})
    with pytest.raises(Exception, match="distill_token must be true"):
        load_recipe("deit/tiny_fmnist", {"model.encoder.distill_token": "false"})
