"""Cluster jobs rendered by `vitpipe submit`: the sbatch script and its chain, cluster profiles, and
Kubernetes manifests against the real schemas (core kinds with kubernetes-validate, PyTorchJob and JobSet
against their CRDs with unknown fields as errors) plus the checks schemas miss; the pods' command really runs.

The CRD files come from $VITPIPE_K8S_CRDS (default ../shared/k8s-crds beside the repository); tests that
need them skip, saying so, where that folder is absent.
"""
from __future__ import annotations

import copy
import functools
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from conftest import REPO

from pipeline.config import ConfigError
from pipeline.jobs.k8s import RDZV_PORT, RECIPE_FILE
from pipeline.jobs.profile import load_profile
from pipeline.recipe import load_recipe
from pipeline.stages.submit import SubmitRequest, render, submit

PROFILE = str(REPO / "tests" / "data" / "cluster_local.yaml")
CRDS = Path(os.environ.get("VITPIPE_K8S_CRDS", REPO.parent / "shared" / "k8s-crds"))


def sbatch(nodes: int, gpus: int, cpu_tasks: int = 1, **kw) -> str:
    req = SubmitRequest("slurm", "mae/tiny_fmnist", nodes=nodes, gpus_per_node=gpus, cpu_tasks_per_node=cpu_tasks,
                        cluster=PROFILE, **kw)
    return render(req, load_profile(PROFILE))[0]


def test_sbatch_checkpoints_before_the_limit_and_parses():
    """(The committed golden renders are compared with the jobs test_slurm.py submits to a real cluster.)"""
    text = sbatch(2, 8)
    for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --signal=USR1@120", "#SBATCH --requeue", "#SBATCH --output=logs/slurm/%x-%j.out",
                 "#SBATCH --open-mode=append", "#SBATCH --partition=debug", "export OMP_NUM_THREADS=1"):
        assert line in text.splitlines()
    assert text.rstrip().endswith("srun --kill-on-bad-exit=1 vitpipe pretrain --config mae/tiny_fmnist --resume auto "
                                  "--trainer.num_nodes=2 --trainer.devices=8 --trainer.accelerator=gpu")
    cpu = sbatch(2, 0, cpu_tasks=2)
    assert "--gpus-per-node" not in cpu
    assert cpu.rstrip().endswith("--trainer.num_nodes=2 --trainer.devices=2 --trainer.accelerator=cpu")
    script = Path(os.environ.get("TMPDIR", "/tmp")) / f"vitpipe-check-{os.getpid()}.sh"
    try:  # the shell parses it
        script.write_text(text)
        assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    finally:
        script.unlink(missing_ok=True)


def test_chain_waits_for_each_stage_and_passes_overrides_verbatim(capsys):
    req = SubmitRequest("slurm", "mae/tiny_fmnist", nodes=1, gpus_per_node=4, cluster=PROFILE,
                        overrides={"register.name": "tiny-mae", "trainer.max_steps": "50"})
    submit(req, dry_run=True, chain=True)
    jobs = capsys.readouterr().out.split("#!/usr/bin/env bash")[1:]
    assert len(jobs) == 3
    pretrain, register, evaluate = jobs
    assert "--resume auto --register.name=null --trainer.max_steps=50" in pretrain  # the register job registers
    assert "--dependency" not in pretrain and "#SBATCH --dependency=afterok:<pretrain>" in register
    assert "vitpipe register --checkpoint vitpipe-demo/checkpoints --name tiny-mae --alias candidate" in register
    assert "#SBATCH --dependency=afterok:<register>" in evaluate
    assert ("vitpipe evaluate --model models:/tiny-mae@candidate --train vitpipe-demo/shards/fmnist/train "
            "--val vitpipe-demo/shards/fmnist/val") in evaluate
    # register and evaluate are one process, not preemptible training
    assert "--ntasks-per-node=1" in register and "#SBATCH --signal" not in register
    assert "#SBATCH --requeue" not in evaluate and "#SBATCH --gpus-per-node=1" in evaluate  # features on a GPU
    assert "--gpus-per-node" not in register


def test_the_recipe_agrees_with_the_jobs_layout():
    """The recipe says 8 nodes x 8 GPUs; the job asks for 2 nodes x 8 GPUs, or 2 nodes x 3 CPU processes."""
    def recipe_in(gpus: int, cpu_tasks: int = 1, **overrides) -> dict:
        req = SubmitRequest("k8s", "mae/vit_large16", nodes=2, gpus_per_node=gpus, cpu_tasks_per_node=cpu_tasks,
                            cluster=PROFILE, overrides=overrides)
        config_map = next(yaml.safe_load_all(render(req, load_profile(PROFILE))[0]))
        return yaml.safe_load(config_map["data"][RECIPE_FILE])["trainer"]

    assert {k: recipe_in(8)[k] for k in ("num_nodes", "devices", "accelerator")} == \
        {"num_nodes": 2, "devices": 8, "accelerator": "gpu"}
    assert {k: recipe_in(0, 3)[k] for k in ("num_nodes", "devices", "accelerator")} == \
        {"num_nodes": 2, "devices": 3, "accelerator": "cpu"}
    assert recipe_in(8, **{"trainer.devices": "8"})["devices"] == 8  # agreeing with the job is fine
    with pytest.raises(ConfigError, match=r"--trainer.devices=4 disagrees with the job's layout \(--nodes 2 "
                                          r"--gpus-per-node 8\)"):
        recipe_in(8, **{"trainer.devices": "4"})
    # register and evaluate are one process whatever the training layout: their recipe is left as it is
    req = SubmitRequest("k8s", "mae/vit_large16", stage="register", nodes=2, gpus_per_node=8, cluster=PROFILE,
                        overrides={"register.name": "mae-l"})
    config_map = next(yaml.safe_load_all(render(req, load_profile(PROFILE))[0]))
    assert yaml.safe_load(config_map["data"][RECIPE_FILE])["trainer"]["num_nodes"] == 8


def test_dry_run_prints_only_the_job_and_names_the_profile_on_stderr(capsys):
    submit(SubmitRequest("k8s", "mae/tiny_fmnist", nodes=2, gpus_per_node=8), dry_run=True)
    out, err = capsys.readouterr()
    config_map, job = yaml.safe_load_all(out)  # the manifest, nothing else
    assert config_map["kind"] == "ConfigMap" and job["kind"] == "PyTorchJob"
    # the recipe is a literal block, readable as the file the pods get
    assert f"  {RECIPE_FILE}: |\n    name: tiny_fmnist\n" in out
    assert config_map["data"][RECIPE_FILE] == load_recipe("mae/tiny_fmnist", {
        "trainer.num_nodes": "2", "trainer.devices": "8", "trainer.accelerator": "gpu"}).to_yaml()
    example = REPO / "jobs" / "clusters" / "example.yaml"
    assert f"cluster profile: {example}, an example" in err
    assert f"as {example.parent}/<name>.yaml and pass --cluster <name>, or pass --cluster FILE" in err

    submit(SubmitRequest("slurm", "mae/tiny_fmnist", cluster=PROFILE), dry_run=True)
    out, err = capsys.readouterr()
    assert out.startswith("#!/usr/bin/env bash") and err.strip() == f"cluster profile: {PROFILE}"


@pytest.mark.parametrize("profile_text, problem", [
    ("slurm: {partiton: gpu}", "unknown key slurm.partiton"),
    ("slurm: {time: two days}", "slurm.time 'two days' is not a Slurm time"),
    ("kubernetes: {namespace: x}", "kubernetes.image is empty"),
    ("kubernetes: {image: i, namespace: Bad_NS}", "namespace 'Bad_NS' is not a valid namespace name"),
    ("kubernetes: {image: i, env: {'1X': y}}", "kubernetes.env: '1X' is not an environment variable name"),
    ("kubernetes: {image: i, kind: deployment}", "kubernetes.kind"),
    ("- just a list", "a cluster profile is a mapping"),
])
def test_a_broken_cluster_profile_names_the_field(tmp_path, profile_text, problem):
    path = tmp_path / "broken.yaml"
    path.write_text(profile_text)
    with pytest.raises(ConfigError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        load_profile(str(path))


def test_missing_sections_and_profiles_are_named(tmp_path):
    (tmp_path / "k8s_only.yaml").write_text("kubernetes: {image: i}")
    with pytest.raises(ConfigError, match="has no slurm: section"):
        submit(SubmitRequest("slurm", "mae/tiny_fmnist", cluster=str(tmp_path / "k8s_only.yaml")), dry_run=True)
    with pytest.raises(FileNotFoundError, match="cluster profile 'nowhere'.*example"):
        load_profile("nowhere")
    with pytest.raises(ConfigError, match="register.name is not set"):
        submit(SubmitRequest("slurm", "mae/tiny_fmnist", stage="register", cluster=PROFILE), dry_run=True)


# --------------------------------------------------------------------------------------------- Kubernetes


def manifests(kind: str, nodes: int, gpus: int, cpu_tasks: int = 1, overrides: dict | None = None) -> list[dict]:
    profile = load_profile(PROFILE)
    profile.kubernetes.kind = kind
    req = SubmitRequest("k8s", "mae/tiny_fmnist", nodes=nodes, gpus_per_node=gpus, cpu_tasks_per_node=cpu_tasks,
                        cluster=PROFILE, overrides=overrides or {})
    return list(yaml.safe_load_all(render(req, profile)[0]))


def _strict(schema: dict) -> dict:
    """An OpenAPI v3 structural schema as JSON Schema with unknown fields rejected, as the API server's strict
    field validation does (except where the CRD preserves unknown fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            if node.get("x-kubernetes-int-or-string"):
                node.pop("type", None)
                node["anyOf"] = [{"type": "integer"}, {"type": "string"}]
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)
    walk(schema)
    return schema


@functools.cache
def crd_validator(kind: str):
    """A JSON Schema validator of the served version of ``kind``'s CRD, made strict. Made once per kind: parsing
    the CRD files and checking the schema against its meta-schema take seconds, validating a manifest ms."""
    import jsonschema

    if not CRDS.is_dir():
        pytest.skip(f"CRD files not found in {CRDS} (set VITPIPE_K8S_CRDS to the folder holding them)")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML has it: 10x faster
    for path in CRDS.glob("*.yaml"):
        for doc in yaml.load_all(path.read_text(), Loader=loader):
            if doc and doc["spec"]["names"]["kind"] == kind:
                served = [v for v in doc["spec"]["versions"] if v.get("served")]
                schema = _strict(served[0]["schema"]["openAPIV3Schema"])
                cls = jsonschema.validators.validator_for(schema)
                cls.check_schema(schema)  # what jsonschema.validate does on every call
                return cls(schema)
    pytest.fail(f"no CRD for {kind} in {CRDS}")


def pod_templates(job: dict) -> list[tuple[dict, dict]]:
    """(pod template, the replica or Job spec around it) of a PyTorchJob or JobSet."""
    if job["kind"] == "PyTorchJob":
        return [(r["template"], r) for r in job["spec"]["pytorchReplicaSpecs"].values()]
    return [(r["template"]["spec"]["template"], r["template"]["spec"]) for r in job["spec"]["replicatedJobs"]]


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
@pytest.mark.parametrize("nodes, gpus", [(1, 8), (4, 8), (2, 0)])
def test_manifests_pass_strict_schema_validation(kind, nodes, gpus):
    import jsonschema
    import kubernetes_validate

    config, job = manifests(kind, nodes, gpus)
    kubernetes_validate.validate(config, "1.31.0", strict=True)  # core kind: raises on any error
    crd_validator(job["kind"]).validate(job)
    for template, _ in pod_templates(job):  # the pod templates as core PodTemplateSpecs, strictly
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": template}, "1.31.0", strict=True)
    broken = copy.deepcopy(job)
    pod_templates(broken)[0][0]["spec"]["containers"][0]["comand"] = ["typo"]
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                      "template": pod_templates(broken)[0][0]}, "1.31.0", strict=True)
    broken["spec"]["unknownField"] = 1
    with pytest.raises(jsonschema.ValidationError):
        crd_validator(job["kind"]).validate(broken)


@pytest.mark.parametrize("kind", ["pytorchjob", "jobset"])
def test_what_schemas_miss(kind):
    config, job = manifests(kind, 3, 8)
    name = job["metadata"]["name"]
    assert config["metadata"]["name"] == f"{name}-recipe" and RECIPE_FILE in config["data"]
    templates = pod_templates(job)
    hosts = set()
    for template, around in templates:
        pod = template["spec"]
        c = pod["containers"][0]
        # the recipe volume is the ConfigMap, and the file the command reads is in it
        recipe = next(v for v in pod["volumes"] if v["name"] == "recipe")
        assert recipe["configMap"]["name"] == config["metadata"]["name"]
        assert c["command"][c["command"].index("--config") + 1] == RECIPE_FILE and c["workingDir"] == "/workspace"
        assert {"secretRef": {"name": "vitpipe-credentials"}} in c["envFrom"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8" and "--nproc-per-node=8" in c["command"]
        assert "--nnodes=3" in c["command"] and "--rdzv-backend=c10d" in c["command"]
        hosts.add(next(a for a in c["command"] if a.startswith("--rdzv-endpoint=")))
        assert pod["terminationGracePeriodSeconds"] == 120  # time to checkpoint after SIGTERM, which torchrun
        assert "--shutdown-timeout=110" in c["command"]    # gives its processes before it kills them
        assert c["ports"] == [{"name": "pytorchjob-port", "containerPort": RDZV_PORT}]
        if kind == "pytorchjob":
            assert c["name"] == "pytorch" and around["restartPolicy"] == "ExitCode" and pod["restartPolicy"] == "Never"
        else:  # a Job's pods may only be Never / OnFailure; JobSet restarts the set
            assert pod["restartPolicy"] in ("Never", "OnFailure")
            assert around["completionMode"] == "Indexed" and around["parallelism"] == around["completions"] == 3
    assert len(hosts) == 1  # every node meets at the same rendezvous
    host = hosts.pop().split("=", 1)[1]
    if kind == "pytorchjob":
        assert sum(r["replicas"] for r in job["spec"]["pytorchReplicaSpecs"].values()) == 3
        assert host == f"{name}-master-0:{RDZV_PORT}"  # the operator's Service for Master replica 0
    else:
        # JobSet pod 0's hostname in the JobSet's headless Service: <jobset>-<rjob>-0-0.<subdomain>,
        # the subdomain defaulting to the JobSet's name when network.subdomain is unset
        assert job["spec"]["network"]["enableDNSHostnames"] is True and "subdomain" not in job["spec"]["network"]
        rjob = job["spec"]["replicatedJobs"][0]
        assert rjob["replicas"] == 1 and host == f"{name}-{rjob['name']}-0-0.{name}:{RDZV_PORT}"


def local_pod(kind: str, nodes: int, tasks: int, overrides: dict, work: Path, env: dict) -> tuple[list[str], dict]:
    """(command, env) of the manifest's first pod, run here: the container's command and env verbatim but for
    the rendezvous address (127.0.0.1 on a free port), in ``work`` holding the ConfigMap's recipe, with the
    interpreter's bin folder on PATH as in the image."""
    import sys

    from mlflow_server import free_port

    config, job = manifests(kind, nodes, 0, tasks, overrides)
    (work / RECIPE_FILE).write_text(config["data"][RECIPE_FILE])
    c = pod_templates(job)[0][0]["spec"]["containers"][0]
    endpoint = f"--rdzv-endpoint=127.0.0.1:{free_port()}"
    command = [endpoint if a.startswith("--rdzv-endpoint=") else a for a in c["command"]]
    return command, {**env, **{e["name"]: e["value"] for e in c["env"]}, "VITPIPE_CACHE": str(work / ".cache"),
                     "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


@pytest.mark.slow
def test_the_rendered_pod_command_trains_with_two_replicas(fmnist_shards, tmp_path, child_env):
    """Each replica's command and env from the JobSet manifest, verbatim but for the rendezvous address
    (127.0.0.1 on a free port), run as its own process in a folder holding the ConfigMap's recipe."""
    from conftest import tiny_overrides

    work = tmp_path / "workspace"
    work.mkdir()
    over = tiny_overrides(fmnist_shards, Path("."), **{"trainer.max_steps": 4, "data.num_workers": 1,
                                                       "trainer.sample_trace": "trace.jsonl"})
    over["checkpoint.dir"], over["tracking.uri"] = "ckpt", "sqlite:///mlflow.db"  # relative: the pod's volume
    command, env = local_pod("jobset", 2, 1, over, work, child_env)
    pods = [subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in pods]
    for pod, (_, err) in zip(pods, outs):
        assert pod.returncode == 0, err[-4000:]
    assert (work / "ckpt" / "step-00000004" / "COMPLETE").is_file()
    assert sorted(p.name for p in work.glob("trace.rank*.jsonl")) == ["trace.rank0.jsonl", "trace.rank1.jsonl"]


def test_dockerfile_installs_the_same_pyproject_and_runs_vitpipe_unprivileged():
    """No Docker engine here: the Dockerfile's instructions are parsed and checked against what the jobs expect."""
    lines, current = [], ""
    for raw in (REPO / "docker" / "Dockerfile").read_text().splitlines():
        if raw.strip().startswith("#") or not raw.strip():
            continue
        current += raw.rstrip("\\").strip() + " "
        if not raw.rstrip().endswith("\\"):
            lines.append(current.strip())
            current = ""
    instructions = [(line.split(None, 1)[0], line.split(None, 1)[1]) for line in lines]
    known = {"FROM", "RUN", "WORKDIR", "COPY", "USER", "ENV", "ENTRYPOINT", "CMD", "ARG", "LABEL"}
    assert all(op in known for op, _ in instructions), instructions
    ops = dict(instructions)
    assert instructions[0][0] == "FROM" and "cuda" in ops["FROM"]
    copied = {arg.split()[0] for op, arg in instructions if op == "COPY"}
    assert {"pyproject.toml", "pipeline", "recipes", "jobs"} <= copied
    assert any(op == "RUN" and "pip install --no-cache-dir ." in arg for op, arg in instructions)
    assert [arg for op, arg in instructions if op == "USER"] == ["vitpipe"]  # not root
    assert ops["ENTRYPOINT"] == '["vitpipe"]'
    assert [arg for op, arg in instructions if op == "WORKDIR"][-1] == "/workspace"  # the pods' workingDir
    ignored = (REPO / ".dockerignore").read_text().split()
    assert ".venv" in ignored and ".git" in ignored and "pipeline" not in ignored


@pytest.mark.slow
def test_sigterm_to_the_pods_torchrun_checkpoints_and_a_restarted_pod_resumes(fmnist_shards, tmp_path, child_env):
    """Eviction: the kubelet sends SIGTERM to the container's first process (torchrun), which passes it to the
    training processes: they checkpoint at the next step and exit; the restarted pod resumes from there."""
    import signal
    import time

    from conftest import tiny_overrides

    work = tmp_path / "workspace"
    work.mkdir()
    over = tiny_overrides(fmnist_shards, Path("."), **{"trainer.max_steps": 300, "data.num_workers": 1,
                                                       "checkpoint.every_n_steps": 1000,
                                                       "trainer.sample_trace": "trace.jsonl"})
    over["checkpoint.dir"], over["tracking.uri"] = "ckpt", "sqlite:///mlflow.db"
    command, env = local_pod("pytorchjob", 1, 2, over, work, child_env)

    def steps() -> int:
        traced = work / "trace.rank0.jsonl"
        return len(traced.read_text().splitlines()) if traced.exists() else 0

    pod = subprocess.Popen(command, cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while steps() < 5:
        assert pod.poll() is None and time.time() < deadline, pod.communicate()[1][-3000:]
        time.sleep(0.2)
    pod.send_signal(signal.SIGTERM)
    _, err = pod.communicate(timeout=120)
    assert pod.returncode != 0 and err.count("SIGTERM received: checkpointing step") == 2, err[-3000:]
    [saved] = [p.name for p in (work / "ckpt").glob("step-*")]
    assert (work / "ckpt" / saved / "COMPLETE").is_file() and 5 <= int(saved[5:]) < 300

    over["trainer.max_steps"] = str(int(saved[5:]) + 3)  # the restarted pod: resume and train 3 more steps
    command, env = local_pod("pytorchjob", 1, 2, over, work, child_env)
    again = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and f"resuming from ckpt/{saved}" in again.stderr, again.stderr[-3000:]
