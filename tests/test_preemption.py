"""Checkpoint-and-stop on SIGUSR1 / SIGTERM: the run checkpoints at the next optimizer-step boundary (never
inside a gradient accumulation), stops with 128 + the signal, and a resume reproduces the uninterrupted
run's per-step losses and final weights exactly (fp32 on CPU); a signal on one rank stops every rank; one
that comes while the run sets up stops it at its first step, one at its last step lets it end as planned."""
from __future__ import annotations

import json
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import PROGRAM, PYTHON, REPO, tiny_overrides

from pipeline.checkpoint.state import read_module_state

pytestmark = pytest.mark.slow
RUNNER = str(REPO / "tests" / "run_pretrain.py")


def _run(overrides: dict, env: dict, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, RUNNER, json.dumps({k: str(v) for k, v in overrides.items()}), *extra], env=env,
                          capture_output=True, text=True, timeout=600)


def _mlflow_runs(work: Path) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def _records(path: Path) -> list[tuple[int, list[str], float]]:
    """(global step at the micro-batch's end, its sample keys, its loss), in the order trained."""
    return [(r["step"], r["keys"], r["loss"]) for r in map(json.loads, path.read_text().splitlines())]


def test_sigusr1_mid_accumulation_checkpoints_at_the_step_and_resumes_exactly(fmnist_shards, tmp_path, child_env):
    # 16 per step in micro-batches of 4: 4 micro-batches per optimizer step
    common = {"trainer.max_steps": 10, "trainer.micro_batch": 4, "checkpoint.every_n_steps": 4,
              "data.num_workers": 2, "checkpoint.keep_last": 5}
    ref = tiny_overrides(fmnist_shards, tmp_path / "ref", **common, **{"trainer.sample_trace": tmp_path / "ref.jsonl"})
    assert _run(ref, child_env).returncode == 0

    work = tmp_path / "pre"
    pre = tiny_overrides(fmnist_shards, work, **common, **{"trainer.sample_trace": tmp_path / "pre.jsonl"})
    first = _run(pre, child_env, "--signal-at", "22")  # the 22nd micro-batch: the 2nd of step 6
    assert first.returncode == 128 + signal.SIGUSR1, first.stderr[-3000:]
    assert "SIGUSR1 received: checkpointing step 6 and stopping" in first.stderr
    assert "stopped by SIGUSR1 at step 6" in first.stdout
    assert sorted(p.name for p in (work / "ckpt").glob("step-*")) == ["step-00000004", "step-00000006"]
    assert max(step for step, *_ in _records(tmp_path / "pre.jsonl")) == 6  # nothing trained past the checkpoint

    (run,) = _mlflow_runs(work)  # the stopped run: KILLED, and where it stopped
    assert run.info.status == "KILLED" and run.data.tags["vitpipe.stopped_by"] == "SIGUSR1 at step 6"

    second = _run(pre, child_env)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "step-00000006" in second.stderr
    (resumed,) = _mlflow_runs(work)  # the resume continued that run to its end
    assert resumed.info.run_id == run.info.run_id and resumed.info.status == "FINISHED"
    want, got = _records(tmp_path / "ref.jsonl"), _records(tmp_path / "pre.jsonl")
    assert len(want) == 40 and got == want  # 10 steps x 4 micro-batches, nothing redone, losses exactly equal
    a = read_module_state(tmp_path / "ref" / "ckpt" / "step-00000010" / "state.ckpt")
    b = read_module_state(work / "ckpt" / "step-00000010" / "state.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_a_signal_on_one_rank_stops_every_rank_at_the_same_step(fmnist_shards, tmp_path, child_env):
    """The ranks agree at the next logging step (every 2 here): a signal during step 3 stops them after step 4."""
    from mlflow_server import free_port

    o = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 10, "checkpoint.every_n_steps": 100,
                                                  "trainer.log_every_n_steps": 2,
                                                  "data.num_workers": 1, "trainer.strategy": "ddp",
                                                  "trainer.sample_trace": tmp_path / "trace.jsonl"})
    cmd = [PYTHON, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), PROGRAM[1], RUNNER, json.dumps({k: str(v) for k, v in o.items()}),
           "--signal-at", "3", "--signal-rank", "1"]
    out = subprocess.run(cmd, env=child_env, capture_output=True, text=True, timeout=600)
    assert out.returncode != 0  # both ranks exit with 128 + SIGUSR1, which torchrun reports as a failure
    assert out.stderr.count("SIGUSR1 received: checkpointing step 4 and stopping") == 2
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == ["step-00000004"]
    for rank in (0, 1):
        steps = [json.loads(line)["step"] for line in (tmp_path / f"trace.rank{rank}.jsonl").read_text().splitlines()]
        assert steps == [1, 2, 3, 4]


@pytest.mark.parametrize("at, code, step, line", [
    (0, 128 + signal.SIGUSR1, 1, "SIGUSR1 received: checkpointing step 1 and stopping"),  # while setting up
    (3, 0, 3, "SIGUSR1 received at the last step (3): the run ends as planned")])
def test_a_signal_before_the_first_step_or_at_the_last(fmnist_shards, tmp_path, child_env, at, code, step, line):
    o = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 3, "checkpoint.every_n_steps": 100})
    out = _run(o, child_env, "--signal-at", str(at))
    assert out.returncode == code and line in out.stderr, out.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "ckpt").glob("step-*")) == [f"step-{step:08d}"]
    assert ("stopped by SIGUSR1" in out.stdout) == bool(code)


def test_with_checkpoints_off_a_signal_stops_the_run_at_a_step_without_one(fmnist_shards, tmp_path, child_env):
    """No checkpoint to write and nothing to resume from, but the same clean stop: at the step boundary, with
    128 + the signal (not killed by it, and not through Lightning's handler, which broadcasts every batch)."""
    o = tiny_overrides(fmnist_shards, tmp_path, **{"trainer.max_steps": 5, "checkpoint.enabled": "false",
                                                  "trainer.sample_trace": tmp_path / "trace.jsonl"})
    out = _run(o, child_env, "--signal-at", "2")
    assert out.returncode == 128 + signal.SIGUSR1, out.stderr[-3000:]
    assert "SIGUSR1 received: stopping after step 2 (checkpoints are off: nothing to resume from)" in out.stderr
    assert "stopped by SIGUSR1 at step 2, no checkpoint (checkpoints are off)" in out.stdout
    assert not list(tmp_path.glob("ckpt/step-*"))
    (run,) = _mlflow_runs(tmp_path)
    assert run.info.status == "KILLED" and run.data.tags["vitpipe.stopped_by"] == "SIGUSR1 at step 2"
    assert [step for step, *_ in _records(tmp_path / "trace.jsonl")] == [1, 2]
