"""An sbatch script for one stage, from ``jobs/slurm/job.sbatch`` and the cluster profile."""
from __future__ import annotations

import shlex
from string import Template

from ..resources import bundled
from .profile import SlurmProfile
from .spec import JobSpec


def sbatch_lines(spec: JobSpec, p: SlurmProfile) -> list[str]:
    """The #SBATCH options besides name, nodes, tasks and output; the GPU ones only when the job has GPUs."""
    lines = []
    if spec.gpus_per_node:
        lines.append(f"#SBATCH --gpus-per-node={spec.gpus_per_node}")
        if p.mem_per_gpu:
            lines.append(f"#SBATCH --mem-per-gpu={p.mem_per_gpu}")
    lines.append(f"#SBATCH --cpus-per-task={p.cpus_per_task}")
    lines.append(f"#SBATCH --time={p.time}")
    if spec.preemptible:
        lines += [f"#SBATCH --signal=USR1@{p.signal_before_s}", "#SBATCH --requeue"]
    for opt, value in (("partition", p.partition), ("account", p.account), ("qos", p.qos)):
        if value:
            lines.append(f"#SBATCH --{opt}={value}")
    if spec.after:
        lines.append(f"#SBATCH --dependency=afterok:{':'.join(spec.after)}")
    return lines


def render_sbatch(spec: JobSpec, p: SlurmProfile, profile_name: str) -> str:
    template = Template((bundled("jobs") / "slurm" / "job.sbatch").read_text())
    exports = [f"export {k}={shlex.quote(str(v))}" for k, v in sorted(p.env.items())]
    return template.substitute(
        description=spec.description, profile=profile_name, job_name=spec.job_name, nodes=spec.nodes,
        tasks_per_node=spec.tasks_per_node, sbatch_lines="\n".join(sbatch_lines(spec, p)), log_dir=p.log_dir,
        exports="\n".join(exports), setup="\n".join(p.setup), stage=spec.stage,
        command=" ".join(shlex.quote(a) for a in [*shlex.split(p.vitpipe), spec.stage, *spec.args]))
