"""Pretrain -> register -> evaluate against a real MLflow server, lineage tags, loading by alias and
version, and the errors for names, aliases and broken model files."""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from conftest import PROGRAM, mlflow_store, tiny_overrides
from mlflow import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401  (fixture)

from pipeline.config import ConfigError
from pipeline.evaluation import LinearProbeConfig
from pipeline.evaluation.config import EvalConfig
from pipeline.exports.vit import load_encoder
from pipeline.recipe import load_recipe
from pipeline.registry import ModelError, load_model_encoder, register_export, resolve_model
from pipeline.stages.evaluate import evaluate_model
from pipeline.stages.export import export_checkpoint
from pipeline.stages.train import train as pretrain
from pipeline.tracking import TrackingConfig


@pytest.fixture(autouse=True)
def model_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))


def eval_config(shards: Path) -> EvalConfig:
    return EvalConfig(train=str(shards / "train"), val=str(shards / "val"), max_train=400, max_val=200,
                      crop_pct=1.0, linear=LinearProbeConfig(epochs=10, batch_size=64))


def test_pretrain_register_evaluate_on_a_real_server(mlflow_server, fmnist_shards, tmp_path, monkeypatch):  # noqa: F811
    # Credentials in the tracking URI reach the server but must never be logged. They move into MLflow's
    # variables of this process: removed again after the test.
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    uri = mlflow_server.uri.replace("http://", "http://alice:s3cr3t-pw@")
    recipe = load_recipe("mae/tiny_fmnist", tiny_overrides(
        fmnist_shards, tmp_path, **{"tracking.uri": uri, "tracking.experiment": "chain",
                                    "tracking.system_metrics_every_n_steps": 4,
                                    "register.name": "tiny-mae", "register.alias": "candidate"}))
    trained = pretrain(recipe, resume="none")
    client = MlflowClient(mlflow_server.uri)

    # The version and its lineage: run, code, recipe, data.
    version = client.get_model_version_by_alias("tiny-mae", "candidate")
    run = client.get_run(trained.run_id)
    tags = version.tags
    assert version.run_id == trained.run_id == tags["vitpipe.run_id"]
    for key in ("vitpipe.git_commit", "vitpipe.recipe_hash", "vitpipe.manifest", "vitpipe.manifest_hash"):
        assert tags[key] == run.data.tags[key], key
    assert tags["vitpipe.recipe_hash"] == recipe.digest()
    assert tags["vitpipe.manifest"].endswith("train/manifest.json")
    assert tags["vitpipe.step"] == "8"
    history = client.get_metric_history(trained.run_id, "system/process_rss_megabytes")
    assert [m.step for m in history] == [4, 8] and all(m.value > 0 for m in history)
    artifacts = {a.path for a in client.list_artifacts(trained.run_id)}
    assert {"recipe.yaml", "export"} <= artifacts and "reconstructions" in artifacts
    exported = {Path(a.path).name for a in client.list_artifacts(trained.run_id, "export")}
    assert exported == {"encoder.safetensors", "mae.safetensors", "metadata.json"}
    logged_recipe = yaml.safe_load(Path(client.download_artifacts(trained.run_id, "recipe.yaml", str(tmp_path)))
                                   .read_text())
    assert logged_recipe["model"] == yaml.safe_load(recipe.to_yaml())["model"]

    # No secret anywhere in params, tags or the recipe artifact.
    everything = json.dumps([run.data.params, run.data.tags, logged_recipe, tags])
    assert "s3cr3t-pw" not in everything and "alice:***@" in run.data.params["tracking.uri"]

    # Loaded back by alias and by version: the same features as the checkpoint's encoder.
    direct = load_encoder(export_checkpoint(trained.checkpoint, tmp_path / "direct")).eval()
    imgs = torch.randn(3, 3, 16, 16)
    for model_uri in ("models:/tiny-mae@candidate", f"models:/tiny-mae/{version.version}"):
        ref = resolve_model(model_uri, mlflow_server.uri)
        encoder = load_model_encoder(ref).eval()
        with torch.no_grad():
            torch.testing.assert_close(encoder(imgs), direct(imgs), rtol=0, atol=0)

    # Evaluation: a run nested under the pretrain run, metrics attached to the version.
    result = evaluate_model("models:/tiny-mae@candidate", eval_config(fmnist_shards),
                            TrackingConfig(uri=mlflow_server.uri))
    assert 0.0 <= result.metrics["knn_top1"] <= 1.0 and 0.0 <= result.metrics["linear_top1"] <= 1.0
    assert result.metrics["train_samples"] == 400 and result.metrics["val_samples"] == 200
    eval_run = client.get_run(result.run_id)
    assert eval_run.data.tags["mlflow.parentRunId"] == trained.run_id
    assert eval_run.info.experiment_id == run.info.experiment_id
    assert eval_run.data.metrics["knn_top1"] == pytest.approx(result.metrics["knn_top1"])
    tags = client.get_model_version("tiny-mae", version.version).tags
    assert float(tags["vitpipe.eval.knn_top1"]) == pytest.approx(result.metrics["knn_top1"], abs=1e-4)
    assert tags["vitpipe.eval.run_id"] == result.run_id


def test_auto_register_adds_versions_and_moves_the_alias(fmnist_shards, tmp_path):
    uri = mlflow_store(tmp_path)
    for i in (1, 2):
        recipe = load_recipe("mae/tiny_fmnist", tiny_overrides(
            fmnist_shards, tmp_path / f"run{i}", **{"tracking.uri": uri, "trainer.max_steps": 2,
                                                     "register.name": "m", "register.alias": "prod"}))
        pretrain(recipe, resume="none")
    client = MlflowClient(uri)
    assert str(client.get_model_version_by_alias("m", "prod").version) == "2"
    assert resolve_model("models:/m/1", uri).version == "1"
    assert resolve_model("models:/m/latest", uri).version == "2"
    with pytest.raises(Exception, match="reserved by MLflow"):
        load_recipe("mae/tiny_fmnist", {"register.alias": "latest"})


@pytest.fixture
def store(tmp_path):
    """A SQLite tracking store with one run whose export folder can be tampered with."""
    uri = mlflow_store(tmp_path)
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("e", artifact_location=str(tmp_path / "artifacts")))
    return uri, client, run.info.run_id


def tiny_export(fmnist_shards: Path, tmp_path: Path) -> Path:
    recipe = load_recipe("mae/tiny_fmnist", tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 1}))
    return export_checkpoint(pretrain(recipe, resume="none").checkpoint, tmp_path / "export")


def test_unknown_name_alias_and_version_are_named(store):
    uri, client, run_id = store
    with pytest.raises(ModelError, match="no registered model named 'nope'"):
        resolve_model("models:/nope@prod", uri)
    client.create_registered_model("empty")
    with pytest.raises(ModelError, match="has no alias 'prod'"):
        resolve_model("models:/empty@prod", uri)
    with pytest.raises(ModelError, match="has no version 7"):
        resolve_model("models:/empty/7", uri)
    with pytest.raises(ModelError, match="expected models:/<name>@<alias>"):
        resolve_model("models:/just-a-name", uri)


def test_missing_or_inconsistent_metadata_is_refused(store, fmnist_shards, tmp_path):
    uri, client, run_id = store
    export = tiny_export(fmnist_shards, tmp_path)

    meta = json.loads((export / "metadata.json").read_text())
    meta["encoder"]["embed_dim"] = 32  # weights are 64 wide
    (export / "metadata.json").write_text(json.dumps(meta))
    register_export(client, export, run_id, "wrong-width", "x")
    with pytest.raises(ModelError, match="weights do not match metadata.json"):
        load_model_encoder(resolve_model("models:/wrong-width@x", uri))

    (export / "metadata.json").unlink()
    client.log_artifacts(run_id, str(export), "bare")
    client.create_registered_model("bare")
    client.create_model_version("bare", f"{client.get_run(run_id).info.artifact_uri}/bare", run_id=run_id)
    with pytest.raises(ModelError, match="no metadata.json"):
        resolve_model("models:/bare/1", uri)


def test_registered_files_must_match_the_version_tags(store, fmnist_shards, tmp_path):
    uri, client, run_id = store
    export = tiny_export(fmnist_shards, tmp_path)
    version = register_export(client, export, run_id, "tagged", "x")
    client.set_model_version_tag("tagged", version.version, "vitpipe.recipe_hash", "0000000000000000")
    with pytest.raises(ModelError, match="differs from the version's tag"):
        resolve_model("models:/tagged@x", uri)


def test_cli_evaluate_unknown_model_exits_with_its_name(fmnist_shards, tmp_path, child_env):
    MlflowClient(f"sqlite:///{tmp_path / 'm.db'}").search_experiments()  # a store without that model
    out = subprocess.run([*PROGRAM, "-m", "pipeline.cli", "evaluate", "--model", "models:/ghost@prod",
                          "--train", str(fmnist_shards / "train"), "--val", str(fmnist_shards / "val"),
                          "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}"],
                         capture_output=True, text=True, env=child_env, timeout=300)
    assert out.returncode == 2
    assert "models:/ghost@prod: no registered model named 'ghost'" in out.stderr

    # a store that does not exist is named as such (and not created)
    with pytest.raises(ConfigError, match=f"no MLflow store at {tmp_path / 'none.db'}"):
        evaluate_model("models:/ghost@prod", eval_config(fmnist_shards),
                       TrackingConfig(uri=f"sqlite:///{tmp_path / 'none.db'}"))
    assert not (tmp_path / "none.db").exists()
