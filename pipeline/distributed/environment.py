"""World size as the launcher or cluster states it, before any process group exists."""
from __future__ import annotations

import os
from typing import Mapping


def launcher_world_size(env: Mapping[str, str] | None = None) -> int | None:
    """torchrun / Kubernetes (WORLD_SIZE) or Slurm (SLURM_NTASKS under srun); None when not launched so."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" in env:
        return int(env["WORLD_SIZE"])
    if "SLURM_NTASKS" in env and "SLURM_STEP_ID" in env:
        return int(env["SLURM_NTASKS"])
    return None


def world_size(devices: int, num_nodes: int, env: Mapping[str, str] | None = None) -> int:
    return launcher_world_size(env) or devices * num_nodes
