"""`vitpipe submit --target slurm` on a real Slurm cluster (tests/slurm_cluster.py: slurmctld and two slurmd
nodes on this host): a tiny pretrain on 1 node x 2 tasks and on 2 nodes x 1 task, each job script differing
from the committed 8-GPU golden render only in its GPU lines; `scancel --signal=USR1` mid-run checkpoints,
requeues and resumes to the uninterrupted run's losses and weights; pretrain -> register -> evaluate chained."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_overrides
from slurm_cluster import slurm_cluster  # noqa: F401  (fixture)

from pipeline.checkpoint.state import read_module_state
from pipeline.jobs.profile import load_profile
from pipeline.stages.submit import SubmitRequest, render

pytestmark = pytest.mark.slow
PROFILE = "tests/data/cluster_local.yaml"


def tiny(steps: int, **extra) -> dict[str, str]:
    """The job's overrides: relative paths (the job runs in the submit folder), so the script is the same
    wherever the test runs and can be compared with the committed golden render."""
    o = tiny_overrides(Path("shards"), Path("."), **{"trainer.max_steps": steps, "data.num_workers": 1,
                                                    "trainer.strategy": "ddp", "trainer.sample_trace": "trace.jsonl",
                                                    "tracking.recon_every_n_steps": 0, **extra})
    return {k: str(v) for k, v in o.items()}


def golden(nodes: int) -> Path:
    return REPO / "tests" / "golden" / f"slurm_tiny_{nodes}x8gpu.sbatch"


def script(nodes: int, gpus: int, tasks: int, steps: int = 30) -> str:
    req = SubmitRequest("slurm", "mae/tiny_fmnist", overrides=tiny(steps), nodes=nodes, gpus_per_node=gpus,
                        cpu_tasks_per_node=tasks, cluster=str(REPO / PROFILE))
    return render(req, load_profile(str(REPO / PROFILE)))[0]


def workdir(tmp_path: Path, fmnist_shards: Path) -> Path:
    (tmp_path / "shards").symlink_to(fmnist_shards)
    return tmp_path


def submit(cluster, work: Path, *args: str) -> list[str]:
    env = {**os.environ, **cluster.env, "PYTHONPATH": str(REPO),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run([sys.executable, "-m", "pipeline.cli", "submit", "--target", "slurm", "--cluster",
                          str(REPO / PROFILE), "--config", "mae/tiny_fmnist", *args], cwd=work, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return re.findall(r"Slurm job (\d+)", out.stdout)


def log_of(work: Path, job: str) -> str:
    return next((work / "logs" / "slurm").glob(f"*-{job}.out")).read_text()


def trace(work: Path) -> dict[tuple[int, int], dict]:
    return {(r["rank"], r["step"]): r for path in work.glob("trace.rank*.jsonl")
            for r in map(json.loads, path.read_text().splitlines())}


@pytest.mark.parametrize("nodes, tasks", [(1, 2), (2, 1)])
def test_tiny_pretrain_runs_on_the_cluster(slurm_cluster, fmnist_shards, tmp_path, nodes, tasks):  # noqa: F811
    if os.environ.get("VITPIPE_UPDATE_GOLDEN"):
        golden(nodes).write_text(script(nodes, 8, 8))
    ours = script(nodes, 0, tasks)
    changed = set(golden(nodes).read_text().splitlines()) ^ set(ours.splitlines())
    gpu_lines = [line for line in changed
                 if re.search(r"gpu|GPU|ntasks-per-node|CPU task|--trainer\.accelerator=cpu", line)]
    # tasks x2, title x2, the srun line x2 (the recipe follows the job's layout), gpus, mem-per-gpu
    assert sorted(changed) == sorted(gpu_lines) and len(changed) == 8

    work = workdir(tmp_path, fmnist_shards)
    [job] = submit(slurm_cluster, work, "--nodes", str(nodes), "--gpus-per-node", "0", "--cpu-tasks-per-node",
                   str(tasks), *(f"--{k}={v}" for k, v in tiny(30).items()))
    assert slurm_cluster.wait_job(job) == "COMPLETED", log_of(work, job)
    log = log_of(work, job)
    assert "pretrain: 30 steps" in log and (work / "ckpt" / "step-00000030" / "COMPLETE").is_file()
    steps = trace(work)
    assert sorted(steps) == [(r, s) for r in (0, 1) for s in range(1, 31)]  # two ranks, every step


def test_usr1_checkpoints_requeues_and_resumes_to_the_uninterrupted_run(slurm_cluster, fmnist_shards,  # noqa: F811
                                                                       tmp_path):
    steps = 40
    args = ["--nodes", "1", "--gpus-per-node", "0", "--cpu-tasks-per-node", "2",
            *(f"--{k}={v}" for k, v in tiny(steps).items())]
    ref = workdir(tmp_path / "ref", fmnist_shards) if (tmp_path / "ref").mkdir() is None else None
    [ref_job] = submit(slurm_cluster, ref, *args)
    assert slurm_cluster.wait_job(ref_job) == "COMPLETED", log_of(ref, ref_job)

    pre = workdir(tmp_path / "pre", fmnist_shards) if (tmp_path / "pre").mkdir() is None else None
    [job] = submit(slurm_cluster, pre, *args)
    deadline = time.time() + 300
    while max((s for _, s in trace(pre)), default=0) < 8:  # mid-run: signal once some steps are done
        assert time.time() < deadline and slurm_cluster.job_state(job) in ("PENDING", "RUNNING"), log_of(pre, job)
        time.sleep(0.2)
    slurm_cluster.run("scancel", "--signal=USR1", job)
    assert slurm_cluster.wait_job(job) == "COMPLETED", log_of(pre, job)
    log = log_of(pre, job)
    stopped = re.search(r"stopped by SIGUSR1 at step (\d+)", log)
    assert stopped and 8 <= int(stopped.group(1)) < steps, log
    assert f"Slurm job {job} requeued" in log and f"job {job} (restart 1)" in log
    assert f"step-{int(stopped.group(1)):08d}" in log.split("(restart 1)")[1]  # resumed from that checkpoint

    want, got = trace(ref), trace(pre)
    assert sorted(got) == sorted(want)
    for key in want:  # every rank and step: the same samples and, in fp32 on CPU, exactly the same loss
        assert got[key]["keys"] == want[key]["keys"] and got[key]["loss"] == want[key]["loss"], key
    a = read_module_state(ref / "ckpt" / f"step-{steps:08d}" / "state.ckpt")
    b = read_module_state(pre / "ckpt" / f"step-{steps:08d}" / "state.ckpt")
    assert all(torch.equal(a[k], b[k]) for k in a if isinstance(a[k], torch.Tensor))


def test_pretrain_register_evaluate_chain(slurm_cluster, fmnist_shards, tmp_path):  # noqa: F811
    work = workdir(tmp_path, fmnist_shards)
    over = tiny(8, **{"register.name": "slurm-mae"})
    jobs = submit(slurm_cluster, work, "--chain", "--nodes", "1", "--gpus-per-node", "0", "--cpu-tasks-per-node",
                  "2", *(f"--{k}={v}" for k, v in over.items()))
    assert len(jobs) == 3
    for job in jobs:
        assert slurm_cluster.wait_job(job) == "COMPLETED", log_of(work, job)
    assert "registered models:/slurm-mae/1" in log_of(work, jobs[1])
    assert re.search(r"knn_top1 \d\.\d{4}", log_of(work, jobs[2])), log_of(work, jobs[2])
