"""End to end: the CLI trains, checkpoints, prunes and tracks in a real MLflow SQLite store."""
from __future__ import annotations

import subprocess

import pytest
from conftest import PROGRAM, tiny_overrides
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow


def _cli(args: list[str], env: dict, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, "-m", "pipeline.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def _flags(overrides: dict[str, str]) -> list[str]:
    return [x for k, v in overrides.items() for x in (f"--{k}", str(v))]


def test_pretrain_cli_checkpoints_and_tracks(fmnist_shards, tmp_path, child_env):
    o = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 12, "checkpoint.every_n_steps": 2,
                                                   "checkpoint.keep_last": 2, "checkpoint.keep_every_n_steps": 4,
                                                   "trainer.log_every_n_steps": 4})
    out = _cli(["pretrain", "--config", "mae/tiny_fmnist", *_flags(o)], child_env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "MLflow run" in out.stdout and "vitpipe ui --tracking-uri sqlite:///" in out.stdout

    # Not a terminal (a log file): one progress line per logging step, no bar's carriage returns, none of the
    # start-up chatter of Lightning or MLflow.
    lines = [line for line in out.stdout.splitlines() if line.startswith("step ") and "loss " in line]
    assert [line.split(",")[0] for line in lines] == [f"step {s}/12 ({s / 12:.0%})" for s in (4, 8, 12)]
    assert all(" img/s" in line and "ETA" in line for line in lines)
    assert "\r" not in out.stdout + out.stderr
    for noise in ("srun", "litlogger", "LeafSpec", "weights_only", "GPU available", "Creating initial MLflow"):
        assert noise not in out.stdout + out.stderr, noise

    # retention: newest 2 (10, 12) plus every 4th (4, 8); each complete with its resolved recipe
    ckpt = tmp_path / "ckpt"
    steps = sorted(p.name for p in ckpt.glob("step-*"))
    assert steps == ["step-00000004", "step-00000008", "step-00000010", "step-00000012"]
    for name in steps:
        assert (ckpt / name / "COMPLETE").is_file() and (ckpt / name / "config.yaml").is_file()
    assert not list(ckpt.glob(".*partial"))
    assert (ckpt / "config.yaml").is_file()

    client = MlflowClient(tracking_uri=o["tracking.uri"])
    exp = client.get_experiment_by_name("vitpipe-demo")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.params["model.mask_ratio"] == "0.75"
    assert run.data.params["trainer.global_batch"] == "16"
    assert len(run.data.tags["vitpipe.recipe_hash"]) == 16
    losses = client.get_metric_history(run.info.run_id, "train/loss")
    assert len(losses) >= 1 and all(m.value == m.value for m in losses)  # logged and not NaN
    for metric in ("train/lr", "perf/images_per_s"):
        assert client.get_metric_history(run.info.run_id, metric), metric
    assert client.get_metric_history(run.info.run_id, "data/skipped_samples")[-1].value == 0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "recipe.yaml" in artifacts
    recon = [a.path for a in client.list_artifacts(run.info.run_id, "reconstructions")]
    assert "reconstructions/reconstruction_step00000004.png" in recon

    # a second call resumes from step 12, has nothing left to do, and continues the same MLflow run
    again = _cli(["pretrain", "--config", "mae/tiny_fmnist", *_flags(o)], child_env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "step-00000012" in again.stderr
    assert len(client.search_runs([exp.experiment_id])) == 1


def test_pretrain_rejects_bad_override(fmnist_shards, tmp_path, child_env):
    o = tiny_overrides(fmnist_shards, tmp_path)
    out = _cli(["pretrain", "--config", "mae/tiny_fmnist", *_flags(o), "--optim.base_lr", "fast"], child_env)
    assert out.returncode == 2
    assert "optim.base_lr" in out.stderr and "expected a number" in out.stderr


def test_ddp_two_processes_on_cpu(fmnist_shards, tmp_path, child_env):
    """Two DDP ranks on CPU keep the global batch, see disjoint samples and stay in step."""
    trace = tmp_path / "trace.jsonl"
    o = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.strategy": "ddp", "trainer.devices": 2,
                                                   "trainer.max_steps": 6, "data.num_workers": 1,
                                                   "trainer.sample_trace": trace})
    out = _cli(["pretrain", "--config", "mae/tiny_fmnist", *_flags(o)], child_env, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "8 per device x 2 devices x 1 accumulation" in out.stderr
    import json

    ranks = [[json.loads(line) for line in (tmp_path / f"trace.rank{r}.jsonl").read_text().splitlines()]
             for r in (0, 1)]
    assert [r["step"] for r in ranks[0]] == [r["step"] for r in ranks[1]] == list(range(1, 7))
    keys = [k for rank in ranks for rec in rank for k in rec["keys"]]
    assert len(keys) == 6 * 16 and len(set(keys)) == len(keys)
    assert (tmp_path / "ckpt" / "step-00000006" / "COMPLETE").is_file()
