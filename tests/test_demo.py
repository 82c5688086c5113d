"""The README's first command: `vitpipe demo` shards Fashion-MNIST, pretrains (here: a few steps), registers
the encoder and compares it with its random initialisation and raw pixels (here: on small subsets)."""
from __future__ import annotations

import json
import subprocess

import pytest
from conftest import PYTHON
from mlflow import MlflowClient

pytestmark = pytest.mark.slow


def test_demo_shards_trains_and_reports_mlflow_run(tmp_path, child_env):
    out = subprocess.run([PYTHON, "-m", "pipeline.cli", "demo", "--workdir", str(tmp_path / "demo"), "--steps", "3",
                          "--eval-train", "300", "--eval-val", "100", "--finetune-steps", "2"],
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
    # what pretraining bought: the pretrained encoder and its architecture from random init, fine-tuned alike
    tuned = out.stdout[out.stdout.index("| encoder | fine-tuned top-1 |"):]
    for row in ("| MAE-pretrained encoder |", "| same architecture, random init |"):
        assert row in tuned
    assert "2 steps of 64 images" in out.stdout and "same 100 held-out images" in out.stdout
    for kind in ("pretrained", "scratch"):
        assert (work / f"finetune-{kind}" / "step-00000002" / "COMPLETE").is_file()
    assert "Mean attention distance (mean over heads): MAE-pretrained" in out.stdout
    client = MlflowClient(f"sqlite:///{work / 'mlflow' / 'mlflow.db'}")
    evaluation = client.search_runs(client.get_experiment_by_name("vitpipe-demo").experiment_id,
                                    "tags.`vitpipe.task` = 'evaluate'")[0]
    logged = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"demo_comparison.md", "mean_attention_distance_vs_random_init.png"} <= logged
    scratch = client.search_runs(client.get_experiment_by_name("vitpipe-demo").experiment_id,
                                 "tags.`vitpipe.init` = 'scratch'")[0]
    assert scratch.data.params["model.from_scratch"] == "True" and "val/top1" in scratch.data.metrics

    # The demo ends with the next commands; they work as printed in a fresh shell, from another folder,
    # without the virtual environment on PATH (only the UI's port is added: 5000 may be taken here).
    steps = out.stdout.split("next steps")[1].splitlines()
    commands = {line.split()[1]: line.strip() for line in steps if line.startswith("    ")}
    assert set(commands) == {"ui", "evaluate", "finetune"}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    fresh = {"PATH": "/usr/bin:/bin", "HOME": child_env.get("HOME", str(tmp_path)),
             "VITPIPE_CACHE": str(tmp_path / "cache"), "PYTHONPATH": child_env["PYTHONPATH"]}
    evaluated = subprocess.run(["bash", "-c", commands["evaluate"]], env=fresh, cwd=elsewhere, capture_output=True,
                               text=True, timeout=600)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "evaluate models:/vitpipe-demo-mae@demo: knn_top1" in evaluated.stdout
    finetuned = subprocess.run(["bash", "-c", commands["finetune"] + " --trainer.max_steps 2 --model.eval_limit 64"],
                               env=fresh, cwd=elsewhere, capture_output=True, text=True, timeout=600)
    assert finetuned.returncode == 0, finetuned.stderr[-3000:]
    assert "registered models:/vitpipe-demo-classifier/1" in finetuned.stdout
    assert list(elsewhere.iterdir()) == []  # no stray ./mlflow or checkpoints where the commands ran
    assert commands["ui"].endswith(f"ui --workdir {work}")

    # No warning a user cannot act on, and no progress-bar residue, in the run's output.
    for noise in ("srun", "litlogger", "LeafSpec", "weights_only", "Creating initial MLflow database", "v_num",
                  "Downloading artifacts"):
        assert noise not in out.stdout + out.stderr, noise
