"""Objectives are declared in one place: a new one (here a linear autoencoder on patches, defined in this file)
trains, exports, registers and evaluates through the stage functions with no change to ``pipeline/``; another
distribution's objective is found from the CLI through the ``vitpipe.objectives`` entry-point group; and the
built-in classifiers' checkpoints export and register like MAE's."""
from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pytest
import torch
import torch.nn.functional as F
from conftest import PYTHON, REPO, mlflow_store
from safetensors.torch import load_file
from torch import nn

from pipeline.config import ConfigError, build, to_dict
from pipeline.evaluation.config import EvalConfig
from pipeline.exports.files import save_weights, write_metadata
from pipeline.objectives import registry
from pipeline.objectives.spec import Embedding, Objective, Training
from pipeline.recipe import RunRecipe, load_recipe
from pipeline.tasks.base import StreamTask
from pipeline.tasks.config import OptimConfig
from pipeline.tracking import TrackingConfig

# ---- the toy objective: everything a new objective needs, in one place ----


@dataclass
class PatchAEConfig:
    image_size: tuple[int, int] = (16, 16)
    patch_size: int = 4
    dim: int = 8


@dataclass
class PatchAERecipe(RunRecipe):
    task: Literal["patch_ae"] = "patch_ae"
    model: PatchAEConfig = field(default_factory=PatchAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


class PatchAE(nn.Module):
    """Each p x p patch -> ``dim`` numbers -> the patch again; features are the patch codes' mean."""

    def __init__(self, cfg: PatchAEConfig):
        super().__init__()
        self.p = cfg.patch_size
        self.encode = nn.Linear(3 * self.p ** 2, cfg.dim)
        self.decode = nn.Linear(cfg.dim, 3 * self.p ** 2)

    def patches(self, imgs: torch.Tensor) -> torch.Tensor:
        return F.unfold(imgs, self.p, stride=self.p).transpose(1, 2)  # [b, L, 3 p p]

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patches(imgs)
        return F.mse_loss(self.decode(self.encode(x)), x)

    def features(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.encode(self.patches(imgs)).mean(1)  # [b, dim]


class PatchAETask(StreamTask):
    def __init__(self, model: PatchAE, optim: OptimConfig, schedule: Any):
        super().__init__()
        self.model, self.optim_cfg, self.schedule = model, optim, schedule

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self.model(batch["image"])
        self.record_loss(loss, batch["image"].shape[0])
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)


def write_patch_ae(out: Path, model: nn.Module, recipe: PatchAERecipe, meta: dict[str, Any]) -> Path:
    folder = write_metadata(out, "patch_ae", {**meta, "patch_ae": to_dict(recipe.model)})  # (makes the folder)
    save_weights(model, folder / "model.safetensors")
    return folder


def patch_ae_features(ref, cfg: EvalConfig) -> Embedding:
    meta = ref.metadata()
    model_cfg = build(PatchAEConfig, meta["patch_ae"], "patch_ae")
    model = PatchAE(model_cfg)
    model.load_state_dict(load_file(str(ref.folder / "model.safetensors")))
    return Embedding(model.eval().features, tuple(cfg.image_size or model_cfg.image_size), meta["normalisation"])


OBJECTIVE = Objective(
    "patch_ae", PatchAERecipe, "a linear autoencoder on patches (a test's own objective)",
    build=lambda recipe, plan: Training(PatchAETask(PatchAE(recipe.model), recipe.optim, plan.schedule)),
    build_model=lambda recipe: PatchAE(recipe.model), write_export=write_patch_ae, features=patch_ae_features)

RECIPE = """\
name: patch-ae
task: patch_ae
data: {transform: {mean: [0.286, 0.286, 0.286], std: [0.353, 0.353, 0.353]}, num_workers: 0}
trainer: {global_batch: 32, max_steps: 6, log_every_n_steps: 2}
optim: {warmup_steps: 1}
checkpoint: {every_n_steps: 3}
"""

# ---- the tests ----


@pytest.fixture
def patch_ae():
    registry.register(OBJECTIVE)
    yield OBJECTIVE
    registry.unregister(OBJECTIVE.name)


def settings(shards: Path, work: Path) -> dict[str, str]:
    return {"data.train": str(shards / "train"), "data.val": str(shards / "val"),
            "checkpoint.dir": str(work / "ckpt"), "tracking.uri": mlflow_store(work)}


def test_a_new_objective_trains_exports_registers_and_evaluates(patch_ae, fmnist_shards, tmp_path, monkeypatch):
    from pipeline.stages.evaluate import evaluate_model
    from pipeline.stages.export import export_checkpoint
    from pipeline.stages.register import register_checkpoint
    from pipeline.stages.train import train

    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    (tmp_path / "patch_ae.yaml").write_text(RECIPE)
    recipe = load_recipe(str(tmp_path / "patch_ae.yaml"), settings(fmnist_shards, tmp_path))
    assert isinstance(recipe, PatchAERecipe) and recipe.data.transform.image_size == (16, 16)
    result = train(recipe, resume="none")
    assert result.global_step == 6 and result.checkpoint.name == "step-00000006"
    # every objective gets the common bookkeeping, e.g. how long the loop waited for data
    from mlflow import MlflowClient

    assert "perf/data_wait_frac" in MlflowClient(recipe.tracking.uri).get_run(result.run_id).data.metrics
    assert any(line.startswith("data wait: ") for line in result.summary.lines)

    out = export_checkpoint(result.checkpoint, tmp_path / "export")
    exported = PatchAE(recipe.model)
    exported.load_state_dict(load_file(str(out / "model.safetensors")))
    from pipeline.checkpoint.state import read_module_state, submodule_state

    trained = submodule_state(read_module_state(result.checkpoint / "state.ckpt"))
    assert all(torch.equal(exported.state_dict()[k], v) for k, v in trained.items())

    version = register_checkpoint(tmp_path / "ckpt", "patch-ae", "x")
    cfg = EvalConfig(train=str(fmnist_shards / "train"), val=str(fmnist_shards / "val"), protocols=["knn"],
                     max_train=500, max_val=200, num_workers=0)
    evaluated = evaluate_model("models:/patch-ae@x", cfg, TrackingConfig(uri=recipe.tracking.uri))
    assert evaluated.ref.version == str(version.version)
    assert 0.3 < evaluated.metrics["knn_top1"] <= 1.0  # 10 classes: well above chance


def test_unknown_task_lists_the_registered_objectives(patch_ae, tmp_path):
    (tmp_path / "r.yaml").write_text("name: x\ntask: nope\n")
    with pytest.raises(ConfigError, match=r"task 'nope' is not one of \['classify', 'deit', 'finetune', 'mae', "
                                          r"'patch_ae'\]"):
        load_recipe(str(tmp_path / "r.yaml"))


def test_an_objective_must_match_its_recipe_type():
    with pytest.raises(ValueError, match="must declare task"):
        Objective("other", PatchAERecipe, "", OBJECTIVE.build, OBJECTIVE.build_model, OBJECTIVE.write_export)


def plugin_path(tmp_path: Path, entry_points: str) -> str:
    """A folder holding an installed distribution's metadata (what pip writes) with entry points."""
    site = tmp_path / "site"
    info = site / "vitpipe_patch_ae-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vitpipe-patch-ae\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[vitpipe.objectives]\n{entry_points}")
    return str(site)


def test_an_installed_plugin_objective_works_from_the_cli(fmnist_shards, tmp_path, child_env):
    # the objective is this file's, reached as another distribution's module; a broken one is named and skipped
    site = plugin_path(tmp_path, "patch_ae = test_objectives:OBJECTIVE\nbroken = no_such_module:OBJECTIVE\n")
    env = {**child_env, "PYTHONPATH": f"{site}:{REPO / 'tests'}:{child_env['PYTHONPATH']}"}
    listed = subprocess.run([PYTHON, "-m", "pipeline.cli", "recipes"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert listed.returncode == 0, listed.stderr
    assert "patch_ae   a linear autoencoder on patches" in listed.stderr
    assert "objective plugin broken = no_such_module:OBJECTIVE (vitpipe-patch-ae) not loaded" in listed.stderr

    (tmp_path / "patch_ae.yaml").write_text(RECIPE)
    args = [f"--{k}={v}" for k, v in settings(fmnist_shards, tmp_path).items()]
    trained = subprocess.run([PYTHON, "-m", "pipeline.cli", "pretrain", "--config", str(tmp_path / "patch_ae.yaml"),
                              "--trainer.max_steps", "3", *args], env=env, capture_output=True, text=True, timeout=600)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "patch_ae: 3 steps" in trained.stdout
    assert (tmp_path / "ckpt" / "step-00000003" / "COMPLETE").is_file()


# ---- the built-in classifiers' checkpoints export and register like MAE's ----


def classifier_settings(shards: Path, work: Path, **extra: str) -> dict[str, str]:
    return {**settings(shards, work), "trainer.global_batch": "16", "trainer.max_steps": "2",
            "optim.warmup_steps": "1", "checkpoint.every_n_steps": "2", "model.eval_limit": "50", **extra}


def check_export_and_registration(checkpoint: Path, work: Path, load, reference: nn.Module, name: str, shards: Path):
    """The checkpoint's export loads into the network it trained (same logits); its registration resolves and
    evaluates with kNN."""
    from pipeline.registry import resolve_model
    from pipeline.stages.evaluate import evaluate_model
    from pipeline.stages.export import export_checkpoint
    from pipeline.stages.register import register_checkpoint

    out = export_checkpoint(checkpoint, work / "export")
    imgs = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(load(out).eval()(imgs), reference.eval()(imgs))
    uri = f"sqlite:///{work / 'mlflow.db'}"
    register_checkpoint(checkpoint, name, "x")
    ref = resolve_model(f"models:/{name}@x", uri)
    with torch.no_grad():
        torch.testing.assert_close(load(ref.folder).eval()(imgs), reference.eval()(imgs))
    cfg = EvalConfig(train=str(shards / "train"), val=str(shards / "val"), protocols=["knn"], max_train=200,
                     max_val=100, num_workers=0)
    assert 0.0 < evaluate_model(f"models:/{name}@x", cfg, TrackingConfig(uri=uri)).metrics["knn_top1"] <= 1.0


def test_finetune_checkpoint_exports_and_registers(fmnist_shards, tmp_path, monkeypatch):
    from pipeline.exports.vit import load_classifier
    from pipeline.objectives.finetune import OBJECTIVE as FINETUNE
    from pipeline.objectives.trained import trained_model
    from pipeline.stages.export import export_checkpoint
    from pipeline.stages.train import train

    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    init = export_checkpoint(Path(__file__).parent / "fixtures" / "mae_checkpoint_v1", tmp_path / "init")
    recipe = load_recipe("finetune/tiny_fmnist", classifier_settings(
        fmnist_shards, tmp_path, **{"model.init": str(init), "model.image_size": "[16, 16]"}))
    result = train(recipe, resume="none")
    reference = trained_model(FINETUNE, recipe, result.checkpoint)
    check_export_and_registration(result.checkpoint, tmp_path, load_classifier, reference, "ft", fmnist_shards)


def test_classify_checkpoint_exports_registers_and_gives_features(fmnist_shards, tmp_path, monkeypatch):
    from pipeline.exports.timm_classifier import load_timm_classifier
    from pipeline.objectives.classify import OBJECTIVE as CLASSIFY
    from pipeline.objectives.trained import trained_model
    from pipeline.stages.train import train

    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    recipe = load_recipe("classify/resnet_fmnist", classifier_settings(
        fmnist_shards, tmp_path, **{"model.image_size": "[16, 16]"}))
    result = train(recipe, resume="none")
    reference = trained_model(CLASSIFY, recipe, result.checkpoint)
    check_export_and_registration(result.checkpoint, tmp_path, load_timm_classifier, reference, "cnn",
                                  fmnist_shards)


def test_exports_written_before_objectives_were_recorded_are_told_apart_by_contents():
    from pipeline.objectives.registry import objective_of_export

    assert objective_of_export({"encoder": {}}, "old-vit").name == "mae"  # any ViT objective reads it alike
    assert objective_of_export({"timm": {}}, "old-cnn").name == "classify"
    assert objective_of_export({"objective": "deit", "encoder": {}}, "new").name == "deit"
    with pytest.raises(ValueError, match="names no objective"):
        objective_of_export({"normalisation": {}}, "empty")
