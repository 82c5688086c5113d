"""DeiT on the one training path: a tiny student on Fashion-MNIST, without a teacher and with one (an exported
ViT classifier), through the CLI's recipe, checkpoints and MLflow metrics."""
from __future__ import annotations

import pytest
import torch
from conftest import mlflow_store
from mlflow import MlflowClient

from pipeline.checkpoint.state import read_callback_state
from pipeline.exports.vit import load_classifier, write_classifier_export
from pipeline.models.classifier import ViTClassifier
from pipeline.models.config import ViTConfig
from pipeline.models.deit import DistilledViT
from pipeline.models.vit import ViTEncoder
from pipeline.recipe import load_recipe
from pipeline.registry import resolve_model
from pipeline.stages.export import export_checkpoint
from pipeline.stages.train import train as pretrain

pytestmark = pytest.mark.slow
FMNIST = {"mean": [0.286] * 3, "std": [0.353] * 3}


def overrides(shards, work, **extra) -> dict[str, str]:
    return {"data.train": str(shards / "train"), "data.val": str(shards / "val"), "trainer.max_steps": "4",
            "trainer.global_batch": "16", "optim.warmup_steps": "1", "checkpoint.dir": str(work / "ckpt"),
            "checkpoint.every_n_steps": "2", "tracking.uri": mlflow_store(work),
            "trainer.log_every_n_steps": "1", **{k: str(v) for k, v in extra.items()}}


def metrics(work, run_id: str) -> set[str]:
    return set(MlflowClient(f"sqlite:///{work / 'mlflow.db'}").get_run(run_id).data.metrics)


def test_deit_without_a_teacher_trains_evaluates_and_registers(fmnist_shards, tmp_path, monkeypatch):
    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("deit/tiny_fmnist", overrides(fmnist_shards, tmp_path, **{
        "register.name": "deit-student", "model.eval_limit": 200}))
    result = pretrain(recipe, resume="none")
    assert result.global_step == 4 and result.checkpoint.name == "step-00000004"
    logged = metrics(tmp_path, result.run_id)
    assert {"train/loss", "train/loss_label", "train/loss_distill", "val/top1"} <= logged
    assert "perf/teacher_s" not in logged

    # registered: the export holds both heads and loads as the same model as the checkpoint's weights
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    ref = resolve_model("models:/deit-student@candidate", uri)
    registered = load_classifier(ref.folder).eval()
    assert isinstance(registered, DistilledViT) and ref.metadata()["encoder"]["distill_token"]
    exported = load_classifier(export_checkpoint(result.checkpoint, tmp_path / "again")).eval()
    imgs = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(registered(imgs), exported(imgs), rtol=0, atol=0)
        cls, dist = registered.both_logits(imgs)
        torch.testing.assert_close(registered(imgs), (cls + dist) / 2)
    assert ref.tags["vitpipe.eval.deit_top1"] == f"{ref.metadata()['val_top1']:.4f}"

    # the rest of the chain: kNN evaluation of the registered student's encoder (its CLS token)
    from pipeline.evaluation.config import EvalConfig
    from pipeline.stages.evaluate import evaluate_model
    from pipeline.tracking import TrackingConfig

    cfg = EvalConfig(train=str(fmnist_shards / "train"), val=str(fmnist_shards / "val"), protocols=["knn"],
                     max_train=300, max_val=100, crop_pct=1.0)
    evaluated = evaluate_model("models:/deit-student@candidate", cfg, TrackingConfig(uri=uri))
    assert 0.0 <= evaluated.metrics["knn_top1"] <= 1.0


def test_deit_with_hard_distillation_from_an_exported_teacher(fmnist_shards, tmp_path):
    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(size="tiny", embed_dim=32, depth=1, num_heads=4, image_size=(16, 16), patch_size=4))
    teacher = write_classifier_export(tmp_path / "teacher", ViTClassifier(enc, 10, pool="cls"), FMNIST)
    recipe = load_recipe("deit/tiny_fmnist", overrides(fmnist_shards, tmp_path, **{
        "model.distill.kind": "hard", "model.teacher.model": teacher, "model.eval_limit": 64,
        "model.encoder.image_size": "[16, 16]"}))  # the teacher's size: no resize
    result = pretrain(recipe, resume="none")
    assert result.global_step == 4
    logged = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").get_run(result.run_id).data.metrics
    assert {"train/loss_distill", "perf/teacher_s", "train/teacher_top1", "train/dist_teacher_agreement"} <= set(logged)

    # The diagnosis's teacher top-1 is the teacher's own on those held-out images, computed here without the
    # student's pipeline (same normalisation and size: the Teacher wrapper must change nothing).
    from pipeline.evaluation.features import EvalTransform, LabelledSplit, extract

    own = load_classifier(teacher).eval()
    split = LabelledSplit(str(fmnist_shards / "val"), EvalTransform((16, 16), FMNIST["mean"], FMNIST["std"], 1.0),
                          batch_size=32, limit=64)
    direct = extract(own, split)
    assert logged["val/teacher_top1"] == pytest.approx((direct.feats.argmax(1) == direct.labels).float().mean().item())
    for key in ("val/top1_cls_head", "val/top1_dist_head", "val/dist_head_teacher_agreement",
                "val/cls_head_teacher_agreement"):
        assert 0.0 <= logged[key] <= 1.0, key
    # ...and the same pass gives the student's top-1: what a pass of its own over the images computes
    from pipeline.objectives.hooks import held_out_top1
    from pipeline.objectives.registry import objective_of
    from pipeline.objectives.trained import trained_model

    student = trained_model(objective_of(recipe), recipe, result.checkpoint)
    assert logged["val/top1"] == pytest.approx(held_out_top1(student, recipe, recipe.model.eval_crop_pct, 64)[0])
    assert "; teacher_top1 " in str(result.summary)
    state = torch.load(result.checkpoint / "state.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    assert state and all(k.startswith("model.") for k in state)  # the teacher is not saved with the student
    assert "model.encoder.dist_token" in state and "model.head_dist.weight" in state


def test_deit_recipe_errors_name_the_field():
    with pytest.raises(Exception, match="model.teacher.model is empty"):
        load_recipe("deit/tiny_fmnist", {"model.distill.kind": "soft"})
    with pytest.raises(Exception, match="distill_token must be true"):
        load_recipe("deit/tiny_fmnist", {"model.encoder.distill_token": "false"})


def test_killed_deit_run_resumes_to_the_uninterrupted_losses(fmnist_shards, tmp_path, child_env):
    """Everything random in DeiT (RandAugment, random erasing, repeated copies, mixup / cutmix, stochastic
    depth) is drawn from the data's keys: a run killed mid-checkpoint and resumed reproduces the losses."""
    import json
    import subprocess

    from conftest import PROGRAM, REPO

    torch.manual_seed(0)
    enc = ViTEncoder(ViTConfig(size="tiny", embed_dim=32, depth=1, num_heads=4, image_size=(16, 16), patch_size=4))
    teacher = write_classifier_export(tmp_path / "teacher", ViTClassifier(enc, 10, pool="cls"), FMNIST)

    def run(work, *extra) -> subprocess.CompletedProcess:
        o = overrides(fmnist_shards, work, **{
            "trainer.max_steps": 8, "checkpoint.every_n_steps": 3, "trainer.sample_trace": work / "trace.jsonl",
            "data.repeats": 2, "data.num_workers": 2, "data.interleave": 3,
            "data.transform.rand_augment": "rand-m9-mstd0.5-inc1", "data.transform.random_erase": 0.25,
            "model.mixup.prob": 1.0, "model.encoder.drop_path": 0.1, "model.ema_decay": 0.9,
            "model.distill.kind": "soft", "model.teacher.model": teacher})
        return subprocess.run([*PROGRAM, str(REPO / "tests" / "run_pretrain.py"), json.dumps(o), "--recipe",
                               "deit/tiny_fmnist", *extra], env=child_env, capture_output=True, text=True,
                              timeout=600)

    def trace(work) -> dict[int, tuple[list[str], float]]:
        return {r["step"]: (r["keys"], r["loss"])
                for r in map(json.loads, (work / "trace.jsonl").read_text().splitlines())}

    ref = run(tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr[-3000:]
    killed = tmp_path / "killed"
    assert run(killed, "--kill-in-checkpoint-at", "6").returncode == -9
    resumed = run(killed)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step-00000003" in resumed.stderr
    want, got = trace(tmp_path / "ref"), trace(killed)
    assert sorted(got) == sorted(want) == list(range(1, 9))
    for step in want:
        assert got[step][0] == want[step][0], f"step {step}: other samples"
        assert got[step][1] == pytest.approx(want[step][1], rel=1e-5), f"step {step}"
    keys = [k for step in want for k in want[step][0]]
    assert len(keys) - len(set(keys)) > 0  # repeated copies of samples did occur
    # the weight average was saved with the checkpoint and continued: the same average at the end
    ema = [read_callback_state(w / "ckpt" / "step-00000008" / "state.ckpt", "WeightEMA") for w in (tmp_path / "ref",
                                                                                               killed)]
    assert ema[0]["step"] == ema[1]["step"] == 8
    for k, v in ema[0]["shadow"].items():
        torch.testing.assert_close(ema[1]["shadow"][k], v, rtol=1e-5, atol=1e-6)


def test_cnn_teacher_trained_and_registered_by_the_pipeline_teaches_a_student(fmnist_shards, tmp_path, monkeypatch):
    """The acceptance chain in miniature: classify/resnet_fmnist registers a timm CNN, a DeiT student distils
    from it by alias; the teacher the student used is the registered one (same logits as the checkpoint's)."""
    from pipeline.checkpoint.state import read_module_state, submodule_state
    from pipeline.exports.timm_classifier import build_timm
    from pipeline.registry.teacher import load_teacher
    from pipeline.tasks.config import TeacherConfig

    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    cnn = pretrain(load_recipe("classify/resnet_fmnist", overrides(fmnist_shards, tmp_path / "cnn", **{
        "model.eval_limit": 100, "tracking.uri": mlflow_store(tmp_path)})), resume="none")
    assert "val/top1" in metrics(tmp_path, cnn.run_id)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    trained = build_timm("resnet10t", 10, 3).eval()
    trained.load_state_dict(submodule_state(read_module_state(cnn.checkpoint / "state.ckpt")))
    teacher = load_teacher(TeacherConfig(model="models:/vitpipe-demo-cnn@teacher"), uri, FMNIST)
    imgs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(teacher(imgs), trained(imgs), rtol=1e-6, atol=1e-6)  # same statistics

    student = pretrain(load_recipe("deit/tiny_fmnist", overrides(fmnist_shards, tmp_path / "student", **{
        "model.distill.kind": "hard", "model.teacher.model": "models:/vitpipe-demo-cnn@teacher",
        "model.eval_limit": 100, "tracking.uri": uri})), resume="none")
    run = MlflowClient(uri).get_run(student.run_id)
    assert run.data.tags["vitpipe.teacher"] == "models:/vitpipe-demo-cnn@teacher"
    assert {"perf/teacher_s", "train/loss_distill", "val/top1"} <= set(run.data.metrics)


def test_weight_average_follows_every_optimizer_step(fmnist_shards, tmp_path):
    """shadow_t = d * shadow_(t-1) + (1 - d) * w_t from the first weights, over optimizer steps only
    (4 micro-batches of accumulation per step), and its top-1 is logged."""
    import lightning as L

    class Record(L.Callback):
        def __init__(self):
            self.weights = []

        def on_fit_start(self, trainer, pl_module):
            self.weights.append(self.floats(pl_module))

        @staticmethod
        def floats(pl_module):
            return {k: v.detach().clone() for k, v in pl_module.model.state_dict().items() if torch.is_tensor(v)}

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.global_step > len(self.weights) - 1:
                self.weights.append(self.floats(pl_module))

    record, d = Record(), 0.7
    recipe = load_recipe("deit/tiny_fmnist", overrides(fmnist_shards, tmp_path, **{
        "model.ema_decay": d, "trainer.micro_batch": 4, "model.eval_limit": 100}))
    result = pretrain(recipe, resume="none", extra_callbacks=[record])
    assert len(record.weights) == 5  # the start and 4 optimizer steps
    ema = read_callback_state(result.checkpoint / "state.ckpt", "WeightEMA")
    for k, v in ema["shadow"].items():
        want = record.weights[0][k].float()
        for w in record.weights[1:]:
            want = d * want + (1 - d) * w[k].float()
        torch.testing.assert_close(v, want, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ema["shadow"]["head.weight"], record.weights[-1]["head.weight"])
    assert "val/top1_ema" in metrics(tmp_path, result.run_id)

