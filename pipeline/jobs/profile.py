"""Cluster profiles (``jobs/clusters/<name>.yaml``): what differs between clusters (partition, account, image,
network and NCCL settings, secret and volume names) lives here, not in templates or code."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..config import ConfigError, build, read_mapping
from ..resources import bundled

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _check_env(env: dict[str, str], where: str) -> None:
    for name in env:
        if not _ENV_NAME.match(str(name)):
            raise ValueError(f"{where}.env: {name!r} is not an environment variable name")


@dataclass
class SlurmProfile:
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    time: str = "48:00:00"
    cpus_per_task: int = 8
    mem_per_gpu: str | None = None
    """e.g. 120G; None leaves memory to the partition's default."""
    signal_before_s: int = 300
    """SIGUSR1 this many seconds before the time limit: the run checkpoints, stops and requeues itself."""
    log_dir: str = "logs/slurm"
    """Job logs: <log_dir>/<job name>-<job id>.out, appended to across requeues."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before the job's command (modules, a virtual environment's activate, ...)."""
    env: dict[str, str] = field(default_factory=dict)
    """Exported before the command (NCCL and network settings)."""
    vitpipe: str = "vitpipe"
    """How the nodes run vitpipe (a path, or a container wrapper around it)."""

    def __post_init__(self) -> None:
        if not re.match(r"^(\d+-)?\d+(:\d{2}){0,2}$", self.time):
            raise ValueError(f"slurm.time {self.time!r} is not a Slurm time (D-HH:MM:SS, HH:MM:SS, MM)")
        if self.signal_before_s < 0 or self.cpus_per_task < 1:
            raise ValueError("slurm.signal_before_s must be >= 0 and slurm.cpus_per_task >= 1")
        _check_env(self.env, "slurm")


@dataclass
class VolumeProfile:
    claim: str
    """PersistentVolumeClaim mounted as the pods' working directory: relative checkpoint folders (and a local
    MLflow store, if the recipe names none) land on it, so a restarted pod finds them."""


@dataclass
class KubernetesProfile:
    image: str = ""
    """The training image (docker/Dockerfile), e.g. registry.example.com/vitpipe:0.1."""
    namespace: str = "default"
    kind: Literal["pytorchjob", "jobset"] = "pytorchjob"
    secret: str | None = None
    """Secret whose keys become environment variables (AWS_*, MLFLOW_TRACKING_*): credentials never in recipes."""
    image_pull_secret: str | None = None
    service_account: str | None = None
    gpu_resource: str = "nvidia.com/gpu"
    cpu_per_gpu: int = 8
    memory_per_gpu: str = "64Gi"
    shm_size: str = "16Gi"
    """Size of the memory-backed /dev/shm (DataLoader workers and NCCL need more than the 64 MiB default)."""
    volume: VolumeProfile | None = None
    """The working-directory volume; None: an emptyDir, so checkpoints must be mirrored (checkpoint.mirror)."""
    termination_grace_s: int = 600
    """Time from SIGTERM (eviction) to SIGKILL: long enough to write a checkpoint."""
    max_restarts: int = 10
    env: dict[str, str] = field(default_factory=dict)
    priority_class: str | None = None
    node_selector: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.image:
            raise ValueError("kubernetes.image is empty: name the training image built from docker/Dockerfile")
        if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", self.namespace):
            raise ValueError(f"kubernetes.namespace {self.namespace!r} is not a valid namespace name")
        _check_env(self.env, "kubernetes")


@dataclass
class ClusterProfile:
    name: str
    slurm: SlurmProfile | None = None
    kubernetes: KubernetesProfile | None = None


def find_profile(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = bundled("jobs") / "clusters"
    candidate = root / f"{name_or_path}.yaml"
    if candidate.is_file():
        return candidate
    known = ", ".join(sorted(p.stem for p in root.glob("*.yaml")))
    raise FileNotFoundError(f"cluster profile {name_or_path!r} is neither a file nor one of jobs/clusters/ ({known})")


def profile_note(path: Path) -> str:
    """Which profile a job is rendered with; for the bundled example, where the user's own goes instead."""
    folder = bundled("jobs") / "clusters"
    if path.resolve() != (folder / "example.yaml").resolve():
        return f"cluster profile: {path}"
    return (f"cluster profile: {path}, an example whose partition, account, image and Secret are placeholders. "
            f"Write your cluster's as {folder}/<name>.yaml and pass --cluster <name>, or pass --cluster FILE "
            "with a profile file anywhere (start from a copy of the example)")


def load_profile(name_or_path: str) -> ClusterProfile:
    path = find_profile(name_or_path)
    raw = read_mapping(path, "a cluster profile is a mapping with slurm: and/or kubernetes: sections")
    try:
        return build(ClusterProfile, raw)
    except ConfigError as err:
        raise ConfigError(f"cluster profile {path}: {err}") from None
