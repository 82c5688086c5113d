"""`vitpipe submit`: render a stage's job for Slurm or Kubernetes from jobs/ and a cluster profile, then submit
it (sbatch, kubectl apply) or print it. The recipe is loaded here first, so a broken recipe or override fails
on the submitting machine, not on the cluster."""
from __future__ import annotations

import shlex
import subprocess
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

from ..config import ConfigError
from ..console import notes, report
from ..jobs.k8s import RECIPE_FILE, dump_manifests, render_k8s
from ..jobs.profile import ClusterProfile, find_profile, load_profile, profile_note
from ..jobs.slurm import render_sbatch
from ..jobs.spec import JobSpec
from ..recipe import RunRecipe, load_recipe
from ..tracking.credentials import take_credentials

TRAINING = ("pretrain", "finetune")
Stage = Literal["pretrain", "finetune", "register", "evaluate"]


@dataclass
class SubmitRequest:
    target: Literal["slurm", "k8s"]
    config: str
    stage: Stage = "pretrain"
    overrides: dict[str, str] = field(default_factory=dict)
    nodes: int = 1
    gpus_per_node: int = 8
    """One process per GPU; 0: CPU processes (``cpu_tasks_per_node`` of them)."""
    cpu_tasks_per_node: int = 1
    cluster: str = "example"
    job_name: str | None = None
    after: list[str] = field(default_factory=list)


def layout_overrides(req: SubmitRequest) -> dict[str, str]:
    """The recipe's process layout as the training job's. Under srun or torchrun the launcher's layout runs
    whatever the recipe says (distributed.environment), but the recipe must still agree: it is what the ConfigMap,
    the checkpoints' config.yaml and the run's params show, and its accelerator must be the devices the job has."""
    layout = {"trainer.num_nodes": str(req.nodes),
              "trainer.devices": str(req.gpus_per_node or req.cpu_tasks_per_node),
              "trainer.accelerator": "gpu" if req.gpus_per_node else "cpu"}
    clash = [f"--{k}={req.overrides[k]}" for k, v in layout.items()
             if k in req.overrides and str(req.overrides[k]) != v]
    if clash:
        asked = (f"--gpus-per-node {req.gpus_per_node}" if req.gpus_per_node else
                 f"--gpus-per-node 0 --cpu-tasks-per-node {req.cpu_tasks_per_node}")
        raise ConfigError(f"{' '.join(clash)} disagrees with the job's layout (--nodes {req.nodes} {asked}), which "
                          "sets trainer.num_nodes, trainer.devices and trainer.accelerator: drop the override or "
                          "change the job's options")
    return layout


def stage_args(stage: str, config: str, overrides: dict[str, str], recipe: RunRecipe) -> list[str]:
    """The stage's command line, as a user would type it after `vitpipe <stage>`."""
    if stage in TRAINING:
        return ["--config", config, "--resume", "auto", *(f"--{k}={v}" for k, v in overrides.items())]
    if not recipe.register.name:
        raise ConfigError(f"{config}: register.name is not set, so there is no registered model to {stage}")
    tracking = ["--tracking-uri", recipe.tracking.uri] if recipe.tracking.uri else []
    if stage == "register":
        return ["--checkpoint", recipe.checkpoint.dir, "--name", recipe.register.name, "--alias",
                recipe.register.alias, *tracking]
    return ["--model", f"models:/{recipe.register.name}@{recipe.register.alias}", "--train", recipe.data.train,
            "--val", recipe.data.val, *tracking]


def job_spec(req: SubmitRequest, stage: str, recipe: RunRecipe, config: str,
             overrides: dict[str, str], after: list[str]) -> JobSpec:
    training = stage in TRAINING
    name = req.job_name if req.job_name and stage == req.stage else f"{recipe.name}-{stage}"
    name = name.lower().replace("_", "-").replace("/", "-")
    return JobSpec(stage=stage, args=stage_args(stage, config, overrides, recipe), job_name=name,
                   nodes=req.nodes if training else 1,
                   # registering needs no device; evaluation extracts features on one
                   gpus_per_node=req.gpus_per_node if training else min(req.gpus_per_node, int(stage == "evaluate")),
                   cpu_tasks_per_node=req.cpu_tasks_per_node if training else 1,
                   after=after, preemptible=training)


def render(req: SubmitRequest, profile: ClusterProfile, stage: str | None = None,
           after: list[str] | None = None) -> tuple[str, JobSpec]:
    """The job file of ``stage`` (default: the request's), an sbatch script or a multi-document manifest,
    and the job it describes."""
    stage = stage or req.stage
    overrides = {**req.overrides, **(layout_overrides(req) if stage in TRAINING else {})}
    recipe = load_recipe(req.config, overrides)
    if "tracking.uri" in overrides:  # job files carry the URI as the recipe keeps it: without its password
        overrides["tracking.uri"] = take_credentials(overrides["tracking.uri"])
    if req.target == "slurm":
        if profile.slurm is None:
            raise ConfigError(f"cluster profile {profile.name!r} has no slurm: section")
        spec = job_spec(req, stage, recipe, req.config, overrides, after or req.after)
        return render_sbatch(spec, profile.slurm, profile.name), spec
    if profile.kubernetes is None:
        raise ConfigError(f"cluster profile {profile.name!r} has no kubernetes: section")
    # The pods read the resolved recipe (overrides applied) from a ConfigMap mounted in their working folder.
    spec = job_spec(req, stage, recipe, RECIPE_FILE, {}, [])
    return dump_manifests(render_k8s(spec, profile.kubernetes, recipe.to_yaml())), spec


def submit(req: SubmitRequest, dry_run: bool = False, chain: bool = False) -> list[str]:
    """Render and submit ``req`` (with ``chain``: pretrain -> register -> evaluate, each after the one before,
    on Slurm); returns the Slurm job ids or the applied Kubernetes objects. Only the job files go to stdout with
    ``dry_run``, so it can be redirected to a file; notes go to stderr."""
    profile = load_profile(req.cluster)
    notes.info(profile_note(find_profile(req.cluster)))
    stages = [req.stage, "register", "evaluate"] if chain else [req.stage]
    if chain and (req.target != "slurm" or req.stage != "pretrain"):
        raise ConfigError("--chain submits pretrain -> register -> evaluate as dependent Slurm jobs")
    ids: list[str] = []
    for stage in stages:
        # chained, the pretrain job leaves registering to the register job (one version, not two)
        job_req = replace(req, overrides={**req.overrides, "register.name": "null"}) if chain and stage == req.stage \
            else req
        text, spec = render(job_req, profile, stage, after=ids[-1:] or req.after)
        if dry_run:
            report.info(text)
            ids.append(f"<{stage}>")
            continue
        if req.target == "slurm":
            Path(profile.slurm.log_dir).mkdir(parents=True, exist_ok=True)  # sbatch opens the log before the job
            out = _run(["sbatch", "--parsable"], text)
            ids.append(out.strip().split(";")[0])
            log_file = f"{profile.slurm.log_dir}/{spec.job_name}-{ids[-1]}.out"
            report.info(f"submitted {stage}: Slurm job {ids[-1]}, log {log_file}")
        else:
            out = _run(["kubectl", "apply", "-f", "-"], text)
            ids.extend(out.split())
            report.info(out.strip())
    return ids


def _run(cmd: list[str], stdin: str) -> str:
    try:
        out = subprocess.run(cmd, input=stdin, capture_output=True, text=True)
    except FileNotFoundError:
        raise ConfigError(f"`{cmd[0]}` is not installed here; use --dry-run to print the job instead") from None
    if out.returncode:
        sys.stderr.write(out.stderr)
        raise ConfigError(f"`{shlex.join(cmd)}` failed (exit {out.returncode}): {out.stderr.strip()[-500:]}")
    return out.stdout
