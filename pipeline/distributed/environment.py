"""Ranks, world size and master address as the launcher or cluster states them.

Three launchers are recognised, in this order:

- torchrun (also what Kubernetes PyTorchJob and indexed-Job manifests run): ``WORLD_SIZE`` and
  ``LOCAL_WORLD_SIZE``; ``--nnodes`` with a c10d rendezvous gives several nodes.
- Slurm ``srun`` tasks (``SLURM_STEP_ID`` set): ``SLURM_NTASKS`` over ``SLURM_NNODES``. The master address is
  the first node's ``NodeAddr`` as ``scontrol`` reports it, because node *names* need not resolve.
- Kubeflow's plain env (one process per pod): ``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR`` without torchrun.

Without any of them the recipe's ``devices x num_nodes`` holds and Lightning launches the processes.
"""
from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from lightning.fabric.plugins.environments import KubeflowEnvironment, SLURMEnvironment

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Layout:
    devices: int
    """Processes per node."""
    num_nodes: int
    launcher: str

    @property
    def world_size(self) -> int:
        return self.devices * self.num_nodes


def _int(env: Mapping[str, str], key: str) -> int:
    try:
        return int(env[key])
    except ValueError:
        raise ValueError(f"environment variable {key}={env[key]!r} is not an integer") from None


def launcher_layout(env: Mapping[str, str] | None = None) -> Layout | None:
    """The process layout a launcher set up, or None when this process was started directly."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env and "LOCAL_WORLD_SIZE" in env:
        world, local = _int(env, "WORLD_SIZE"), _int(env, "LOCAL_WORLD_SIZE")
        if world % local:
            raise ValueError(f"WORLD_SIZE={world} is not a multiple of LOCAL_WORLD_SIZE={local}")
        return Layout(local, world // local, "torchrun")
    if "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env:
        tasks, nodes = _int(env, "SLURM_NTASKS"), _int(env, "SLURM_NNODES") if "SLURM_NNODES" in env else 1
        if tasks % nodes:
            raise ValueError(f"SLURM_NTASKS={tasks} over SLURM_NNODES={nodes} nodes: use --ntasks-per-node")
        return Layout(tasks // nodes, nodes, "slurm")
    if {"WORLD_SIZE", "RANK", "MASTER_ADDR"} <= env.keys():
        return Layout(1, _int(env, "WORLD_SIZE"), "kubeflow")
    return None


def resolve_layout(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> Layout:
    found = launcher_layout(env)
    if found is not None and found.world_size != devices * num_nodes:
        log.info("%s launched %d x %d processes; the recipe's %d x %d is overridden", found.launcher,
                 found.num_nodes, found.devices, num_nodes, devices)
    return found or Layout(devices, num_nodes, "lightning")


def world_size(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> int:
    return resolve_layout(devices, num_nodes, env).world_size


def slurm_node_addr(node: str) -> str:
    """The address ``scontrol`` gives for ``node`` (its NodeAddr), or the name itself if there is none."""
    try:
        out = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                             timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("scontrol show node %s failed (%s); using the node name as master address", node, err)
        return node
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else node


class SlurmNodeAddrEnvironment(SLURMEnvironment):
    """Lightning's Slurm environment with the master address taken from the first node's NodeAddr."""

    @property
    def main_address(self) -> str:
        if "MASTER_ADDR" not in os.environ:
            first = self.resolve_root_node_address(os.environ.get("SLURM_NODELIST", "127.0.0.1"))
            os.environ["MASTER_ADDR"] = slurm_node_addr(first)
        return os.environ["MASTER_ADDR"]


def cluster_environment(layout: Layout) -> Any:
    """The Lightning cluster environment for a launcher Lightning would not detect or would get wrong."""
    if layout.launcher == "slurm":
        return SlurmNodeAddrEnvironment(auto_requeue=False)
    if layout.launcher == "kubeflow":
        return KubeflowEnvironment()
    return None  # torchrun: Lightning's TorchElasticEnvironment; no launcher: Lightning's own
