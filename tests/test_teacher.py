"""DeiT teachers: a timm CNN and a ViT classifier round-tripped through a real MLflow registry (and a folder,
and timm:<arch> with a local weights file) give the logits the model gave before; frozen, eval mode, and fed
the student's images re-normalised and resized to what the teacher expects."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (fixture)

from pipeline.exports.timm_classifier import build_timm, write_timm_export
from pipeline.exports.vit import write_classifier_export
from pipeline.models.classifier import ViTClassifier
from pipeline.models.config import ViTConfig
from pipeline.models.vit import ViTEncoder
from pipeline.registry import ModelError, register_export
from pipeline.registry.teacher import load_teacher
from pipeline.tasks.config import TeacherConfig

STUDENT = {"mean": [0.2860] * 3, "std": [0.3530] * 3}  # e.g. Fashion-MNIST statistics
TEACHER_NORM = {"mean": [0.5, 0.4, 0.3], "std": [0.25, 0.2, 0.3]}


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))


def trained_cnn() -> torch.nn.Module:
    """A small timm CNN whose batch-norm statistics are not the defaults (so eval mode matters)."""
    torch.manual_seed(0)
    cnn = build_timm("test_resnet", num_classes=10, in_chans=3)
    cnn.train()
    with torch.no_grad():
        for _ in range(3):
            cnn(torch.randn(8, 3, 32, 32) * 2 + 1)
    return cnn.eval()


def test_cnn_teacher_from_the_registry_gives_the_same_logits(mlflow_server, tmp_path):  # noqa: F811
    cnn = trained_cnn()
    out = write_timm_export(tmp_path / "export", "test_resnet", cnn, 10, 3, (32, 32), TEACHER_NORM)
    client = MlflowClient(mlflow_server.uri)
    run = client.create_run(client.create_experiment("teachers")).info.run_id
    register_export(client, out, run, "cnn-teacher", "candidate")

    teacher = load_teacher(TeacherConfig(model="models:/cnn-teacher@candidate"), mlflow_server.uri, STUDENT)
    teacher.train()  # a Trainer calls train() on the whole task: the teacher must stay in eval mode
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    student_imgs = torch.randn(4, 3, 24, 24)  # student-normalised, at the student's size
    raw = student_imgs * torch.tensor(STUDENT["std"]).view(1, 3, 1, 1) + torch.tensor(STUDENT["mean"]).view(1, 3, 1, 1)
    theirs = (raw - torch.tensor(TEACHER_NORM["mean"]).view(1, 3, 1, 1)) / torch.tensor(TEACHER_NORM["std"]).view(
        1, 3, 1, 1)
    theirs = F.interpolate(theirs, size=(32, 32), mode="bicubic", align_corners=False)
    with torch.no_grad():
        want = cnn(theirs)
    got = teacher(student_imgs)
    assert got.shape == (4, 10)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    with pytest.raises(ModelError, match="not a ViT encoder"):
        from pipeline.registry import load_model_encoder, resolve_model
        load_model_encoder(resolve_model("models:/cnn-teacher@candidate", mlflow_server.uri))


def test_vit_classifier_and_local_timm_weights_teach(tmp_path):
    torch.manual_seed(1)
    enc = ViTEncoder(ViTConfig(size="tiny", embed_dim=32, depth=2, num_heads=4, image_size=(16, 16), patch_size=4))
    vit = ViTClassifier(enc, 10, pool="avg").eval()
    folder = write_classifier_export(tmp_path / "vit", vit, STUDENT)
    teacher = load_teacher(TeacherConfig(model=str(folder)), "unused", STUDENT)
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(teacher(imgs), vit(imgs), rtol=0, atol=0)

    cnn = trained_cnn()
    torch.save(cnn.state_dict(), tmp_path / "resnet.pt")
    cfg = TeacherConfig(model="timm:test_resnet", weights=str(tmp_path / "resnet.pt"), num_classes=10,
                        normalisation=STUDENT)
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_teacher(cfg, "unused", STUDENT)(imgs), cnn(imgs), rtol=1e-6, atol=1e-6)
    with pytest.raises(ModelError, match="do not fit timm:test_convnext"):
        load_teacher(TeacherConfig(model="timm:test_convnext", weights=str(tmp_path / "resnet.pt"), num_classes=10),
                     "unused", STUDENT)
    with pytest.raises(ValueError, match="teacher.weights"):
        TeacherConfig(model="timm:test_resnet")
    with pytest.raises(ValueError, match="no architecture 'no_such_net'"):
        load_teacher(TeacherConfig(model="timm:no_such_net", weights="x.pt", num_classes=3), "unused", STUDENT)
