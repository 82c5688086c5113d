"""Kubernetes manifests for one stage: a ConfigMap with the resolved recipe, and a Kubeflow PyTorchJob
(training-operator v1) or a JobSet (v1alpha2) whose pods run torchrun with c10d rendezvous around the same
`vitpipe <stage>` command a user runs by hand. Skeletons come from ``jobs/k8s/``; this fills them in."""
from __future__ import annotations

import copy
import re
from typing import Any

import yaml

from ..resources import bundled
from .profile import KubernetesProfile
from .spec import JobSpec

WORKDIR = "/workspace"
RECIPE_FILE = "recipe.yaml"
RDZV_PORT = 29400


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the recipe in the ConfigMap) as literal blocks: the manifest shows the recipe as the
    file the pods read, not as one escaped line."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style="|" if "\n" in value else None)


_ManifestDumper.add_representer(str, _str)


def dump_manifests(docs: list[dict[str, Any]]) -> str:
    """A multi-document manifest for ``kubectl apply -f -``."""
    return yaml.dump_all(docs, Dumper=_ManifestDumper, sort_keys=False)


def _skeleton(name: str) -> dict[str, Any]:
    return yaml.safe_load((bundled("jobs") / "k8s" / name).read_text())


def _times(quantity: str, n: int) -> str:
    m = re.fullmatch(r"(\d+)([KMGTP]i?)?", quantity)
    if m is None:
        raise ValueError(f"kubernetes: {quantity!r} is not a whole-number quantity (e.g. 64Gi)")
    return f"{int(m.group(1)) * n}{m.group(2) or ''}"


def rendezvous_host(spec: JobSpec, p: KubernetesProfile) -> str:
    """The first pod's stable DNS name: the PyTorchJob master's service, or JobSet's pod hostname in its
    headless Service (subdomain = the JobSet's name)."""
    if p.kind == "pytorchjob":
        return f"{spec.job_name}-master-0"
    return f"{spec.job_name}-node-0-0.{spec.job_name}"


def pod_command(spec: JobSpec, p: KubernetesProfile, vitpipe: list[str]) -> list[str]:
    return ["torchrun", f"--nnodes={spec.nodes}", f"--nproc-per-node={spec.tasks_per_node}",
            "--rdzv-backend=c10d", f"--rdzv-endpoint={rendezvous_host(spec, p)}:{RDZV_PORT}",
            f"--rdzv-id={spec.job_name}", "--max-restarts=0",
            # on SIGTERM (eviction) torchrun passes it on and waits this long for the checkpoint before SIGKILL
            f"--shutdown-timeout={max(p.termination_grace_s - 10, 1)}",
            "--no-python", *vitpipe, spec.stage, *spec.args]


def pod_template(spec: JobSpec, p: KubernetesProfile, container: str, restart_policy: str,
                 vitpipe: list[str]) -> dict[str, Any]:
    tpl = _skeleton("pod.yaml")
    pod, c = tpl["spec"], tpl["spec"]["containers"][0]
    tpl["metadata"]["annotations"]["kubectl.kubernetes.io/default-container"] = container
    c.update(name=container, image=p.image, command=pod_command(spec, p, vitpipe), workingDir=WORKDIR)
    c["env"] = [*c["env"], *({"name": k, "value": str(v)} for k, v in sorted(p.env.items()))]
    if p.secret:
        c["envFrom"] = [{"secretRef": {"name": p.secret}}]
    per = spec.gpus_per_node or spec.cpu_tasks_per_node
    limits = {"cpu": str(p.cpu_per_gpu * per), "memory": _times(p.memory_per_gpu, per)}
    if spec.gpus_per_node:
        limits[p.gpu_resource] = str(spec.gpus_per_node)
    c["resources"] = {"limits": limits, "requests": dict(limits)}
    # the training operator's port name: it exports this port as MASTER_PORT instead of adding its default 23456
    c["ports"] = [{"name": "pytorchjob-port", "containerPort": RDZV_PORT}]
    for v in pod["volumes"]:
        if v["name"] == "recipe":
            v["configMap"]["name"] = f"{spec.job_name}-recipe"
        elif v["name"] == "dshm":
            v["emptyDir"]["sizeLimit"] = p.shm_size
        elif v["name"] == "work" and p.volume:
            v.pop("emptyDir")
            v["persistentVolumeClaim"] = {"claimName": p.volume.claim}
    pod.update(restartPolicy=restart_policy, terminationGracePeriodSeconds=p.termination_grace_s)
    for key, value in (("serviceAccountName", p.service_account), ("priorityClassName", p.priority_class)):
        if value:
            pod[key] = value
    if p.image_pull_secret:
        pod["imagePullSecrets"] = [{"name": p.image_pull_secret}]
    if p.node_selector:
        pod["nodeSelector"] = dict(p.node_selector)
    return tpl


def render_k8s(spec: JobSpec, p: KubernetesProfile, recipe_yaml: str, vitpipe: list[str] | None = None,
               ) -> list[dict[str, Any]]:
    vitpipe = vitpipe or ["vitpipe"]
    labels = {"app.kubernetes.io/name": "vitpipe", "vitpipe/job": spec.job_name, "vitpipe/stage": spec.stage}
    config = {"apiVersion": "v1", "kind": "ConfigMap",
              "metadata": {"name": f"{spec.job_name}-recipe", "namespace": p.namespace, "labels": labels},
              "data": {RECIPE_FILE: recipe_yaml}}
    meta = {"name": spec.job_name, "namespace": p.namespace, "labels": labels}
    if p.kind == "pytorchjob":
        job = _skeleton("pytorchjob.yaml")
        job["metadata"] = meta
        job["spec"]["runPolicy"]["backoffLimit"] = p.max_restarts
        # ExitCode: exit codes 128+ (killed by a signal, or our checkpoint-and-stop on SIGTERM) are retried
        master = pod_template(spec, p, "pytorch", "Never", vitpipe)  # the operator restarts per replicaSpec
        replicas = job["spec"]["pytorchReplicaSpecs"]
        replicas["Master"].update(replicas=1, template=master)
        if spec.nodes > 1:
            replicas["Worker"].update(replicas=spec.nodes - 1, template=copy.deepcopy(master))
        else:
            del replicas["Worker"]
    else:
        job = _skeleton("jobset.yaml")
        job["metadata"] = meta
        job["spec"]["failurePolicy"]["maxRestarts"] = p.max_restarts
        rjob = job["spec"]["replicatedJobs"][0]
        rjob["template"]["spec"].update(parallelism=spec.nodes, completions=spec.nodes)
        # Job pods may only restart Never / OnFailure; JobSet recreates the whole set on a failure instead
        rjob["template"]["spec"]["template"] = pod_template(spec, p, "vitpipe", "Never", vitpipe)
    return [config, job]
