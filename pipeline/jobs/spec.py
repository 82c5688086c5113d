"""What one cluster job runs: a vitpipe stage with its arguments, on how many nodes and devices."""
from __future__ import annotations

import re
from dataclasses import dataclass, field

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@dataclass
class JobSpec:
    stage: str
    """pretrain, finetune, register or evaluate: the subcommand every task runs."""
    args: list[str]
    """The stage's arguments, exactly as a user would type them after `vitpipe <stage>`."""
    job_name: str
    nodes: int = 1
    gpus_per_node: int = 0
    """Devices per node; 0 runs CPU processes (``cpu_tasks_per_node`` of them)."""
    cpu_tasks_per_node: int = 1
    after: list[str] = field(default_factory=list)
    """Slurm job ids this job waits for (afterok)."""
    preemptible: bool = True
    """Training stages checkpoint on SIGUSR1 and requeue; register / evaluate simply rerun."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.job_name) or len(self.job_name) > 52:
            raise ValueError(f"job name {self.job_name!r}: lower-case letters, digits and '-', at most 52 "
                             "characters (it names Kubernetes objects too)")
        if self.nodes < 1 or self.gpus_per_node < 0 or self.cpu_tasks_per_node < 1:
            raise ValueError("nodes must be >= 1, gpus_per_node >= 0, cpu_tasks_per_node >= 1")

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node or self.cpu_tasks_per_node

    @property
    def description(self) -> str:
        devices = f"{self.gpus_per_node} GPU(s)" if self.gpus_per_node else f"{self.cpu_tasks_per_node} CPU task(s)"
        return f"vitpipe {self.stage} on {self.nodes} node(s) x {devices}: vitpipe {self.stage} {' '.join(self.args)}"
