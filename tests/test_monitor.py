"""Monitors during pretraining: RankMe on hand-built features, and kNN / RankMe curves logged by a real run,
continued by a resumed one."""
from __future__ import annotations

import json
import subprocess

import pytest
import torch
from conftest import PROGRAM, REPO, tiny_overrides
from mlflow import MlflowClient

from pipeline.evaluation.monitor import rankme

MONITOR = {"monitor.every_n_steps": 4, "monitor.max_train": 200, "monitor.max_val": 100}


def test_rankme_counts_the_directions_features_use():
    assert rankme(torch.eye(16)) == pytest.approx(16, rel=1e-5)  # 16 equal singular values
    line = torch.randn(50, 1) @ torch.randn(1, 16)  # rank one
    assert rankme(line) == pytest.approx(1.0, abs=1e-3)
    mixed = torch.diag(torch.tensor([4.0, 2.0, 1.0, 1.0]))
    p = torch.tensor([0.5, 0.25, 0.125, 0.125])
    assert rankme(mixed) == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)


def _curve(db, name: str) -> dict[int, float]:
    client = MlflowClient(f"sqlite:///{db}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    return {m.step: m.value for m in client.get_metric_history(run.info.run_id, name)}


def _run(overrides: dict, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, str(REPO / "tests" / "run_pretrain.py"), json.dumps(overrides), *extra],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_monitors_log_knn_and_rankme_and_a_resumed_run_continues_the_curve(fmnist_shards, tmp_path, child_env):
    plain = tiny_overrides(fmnist_shards, tmp_path / "plain", **{"trainer.max_steps": 8, **MONITOR})
    out = _run(plain, child_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "monitors: " in out.stdout and "of the training time" in out.stdout
    knn, rank = _curve(tmp_path / "plain" / "mlflow.db", "monitor/knn_top1"), \
        _curve(tmp_path / "plain" / "mlflow.db", "monitor/rankme")
    assert sorted(knn) == sorted(rank) == [4, 8]
    assert all(0.0 <= v <= 1.0 for v in knn.values()) and all(1.0 <= v <= 64 for v in rank.values())
    assert max(knn.values()) > 0.2  # 10 classes: well above chance even for a tiny encoder

    killed = tiny_overrides(fmnist_shards, tmp_path / "killed", **{"trainer.max_steps": 8, **MONITOR})
    assert _run(killed, child_env, "--kill-in-checkpoint-at", "8").returncode == -9
    assert _run(killed, child_env).returncode == 0  # resumes from step 4: steps 5-8 and the look at 8 again
    resumed = _curve(tmp_path / "killed" / "mlflow.db", "monitor/knn_top1")
    assert resumed == pytest.approx(knn, abs=1e-6)


def test_a_short_split_is_shared_between_bank_and_queries(fmnist_shards):
    from pipeline.evaluation.config import MonitorConfig
    from pipeline.evaluation.monitor import PretrainMonitor

    val = str(fmnist_shards / "val")  # 500 samples, fewer than 1,000 + 500
    monitor = PretrainMonitor(MonitorConfig(every_n_steps=1, train=val, val=val), (16, 16),
                              {"mean": [0.5] * 3, "std": [0.5] * 3})
    bank = monitor._load()
    assert len(bank["bank"]) == 333 and len(bank["query"]) == 167
    assert bank["bank"].shape[1:] == (3, 16, 16)
