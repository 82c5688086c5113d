"""`vitpipe compare`: speed and memory of a ViT and a CNN measured in their own processes, written in timm's
benchmark columns with a plot."""
from __future__ import annotations

import csv
import subprocess

from conftest import PROGRAM


def test_compare_writes_timm_benchmark_columns_and_a_plot(tmp_path, child_env):
    out = subprocess.run([*PROGRAM, "-m", "pipeline.cli", "compare", "--models", "vit_tiny_patch16_224,resnet10t",
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


def test_fashion_mnist_rows_train_alike_and_land_in_csv_plot_and_mlflow(fmnist_shards, tmp_path, monkeypatch):
    """The accuracy half in miniature: four rows, each the same supervised steps, batch and mixup; the MAE
    pretraining and the teacher's training in their own columns; the from-scratch ViT is the MAE row's
    architecture with fresh weights."""
    from mlflow import MlflowClient

    from pipeline.stages.compare_accuracy import compare_accuracy

    monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
    rows = compare_accuracy(tmp_path / "work", steps=2, mae_steps=2, eval_limit=32, shards=fmnist_shards,
                            overrides={"trainer.log_every_n_steps": 1})  # a throughput window per step
    names = [r.model for r in rows]
    assert names[0] == "resnet10t" and names[1:3] == ["ViT from scratch", "ViT fine-tuned from MAE"]
    assert names[3].startswith("DeiT student")
    assert all(0.0 <= r.top1 <= 1.0 and r.wall_s > 0 and r.train_images_per_s > 0 for r in rows)
    assert rows[2].pretrain_s > 0 and rows[3].teacher_s == rows[0].wall_s
    assert [r.pretrain_s for r in rows[:2]] + [rows[3].pretrain_s] == [0.0, 0.0, 0.0]
    assert rows[1].params_m == rows[2].params_m  # the same ViT, with and without MAE
    out = tmp_path / "work" / "compare"
    with (out / "accuracy.csv").open() as f:
        assert [r["model"] for r in csv.DictReader(f)] == names
    assert (out / "accuracy.png").read_bytes()[:4] == b"\x89PNG"

    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("vitpipe-compare").experiment_id])
    supervised = [r for r in runs if r.data.tags["vitpipe.task"] != "mae"]
    assert len(supervised) == 4
    for run in supervised:  # one budget and one augmentation for every row
        p = run.data.params
        assert (p["trainer.max_steps"], p["trainer.global_batch"], p["model.mixup.prob"]) == ("2", "128", "0.5")
    deit = next(r for r in supervised if r.data.tags["vitpipe.task"] == "deit")
    assert "val/teacher_top1" in deit.data.metrics
