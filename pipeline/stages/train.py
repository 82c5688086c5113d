"""The one training path: recipe -> data, schedule, strategy, checkpoints, MLflow run -> Trainer.fit.

Every training stage (MAE pretraining, fine-tuning) builds its task and hands it here; strategies,
checkpointing, resume and tracking behave the same for all of them.
"""
from __future__ import annotations

import json
import logging
import math
import signal
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import lightning as L
import yaml
from lightning.pytorch.utilities import rank_zero_only

from ..checkpoint import CommittedCheckpoint, latest_complete
from ..checkpoint.mirror import Mirror
from ..checkpoint.preemption import PreemptionCheckpoint
from ..checkpoint.resume import FetchCheckpoint, ResumePoint, find_resume
from ..checkpoint.store import CONFIG, RUN_ID, STATE
from ..config import flatten
from ..data.datamodule import ShardDataModule
from ..data.storage import apply_storage, probe_write
from ..distributed import build_strategy, cluster_environment, derive_batch, resolve_layout, world_size
from ..recipe import RunRecipe
from ..registry.lineage import MANIFEST, MANIFEST_HASH, RECIPE_HASH, code_version
from ..tasks import Schedule
from ..tracking import make_logger, resolve_uri
from ..tracking.callbacks import SampleTrace, SystemMetrics
from ..tracking.mlflow_setup import run_exists, tracking_failures
from ..tracking.progress import progress_callbacks
from ..tracking.secrets import scrub, scrub_url, without_userinfo
from .ui import browse_command

log = logging.getLogger(__name__)
# Our loader plans rank and worker splits itself (data.plan), so Lightning's generic caution does not apply.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


@dataclass
class TrainResult:
    run_id: str
    tracking_uri: str
    experiment: str
    checkpoint: Path | None
    global_step: int
    last_loss: float | None
    tracking_failures: int = 0
    """Logging calls to MLflow that failed or were dropped while the server was unreachable."""
    preempted: int | None = None
    """The signal (SIGUSR1, SIGTERM) that stopped the run after a checkpoint; None when it ran to its end."""


@dataclass
class RunPlan:
    """What a stage needs before it builds its task: data, schedule and where to resume from."""

    datamodule: ShardDataModule
    schedule: Schedule
    accumulate: int
    resume: ResumePoint | None

    @property
    def resume_from(self) -> Path | None:
        return None if self.resume is None else self.resume.folder


def plan_schedule(recipe: RunRecipe, num_samples: int, world: int) -> tuple[Schedule, int, int]:
    """(schedule, per-device batch, accumulation) for this data size and world size."""
    tr = recipe.trainer
    batch = derive_batch(tr.global_batch, world, tr.micro_batch)
    batches_per_rank = num_samples // (world * batch.per_device)
    steps_per_epoch = max(1, math.ceil(batches_per_rank / batch.accumulate))
    total = tr.max_steps if tr.max_steps is not None else tr.max_epochs * steps_per_epoch
    warmup = recipe.optim.warmup_steps
    if warmup is None:
        warmup = round(recipe.optim.warmup_epochs * steps_per_epoch)
    log.info("%s; %d steps per epoch, %d steps, %d warm-up", batch, steps_per_epoch, total, warmup)
    schedule = Schedule(total_steps=total, warmup_steps=min(warmup, total), effective_batch=tr.global_batch,
                        seed=recipe.seed)
    return schedule, batch.per_device, batch.accumulate


def plan_run(recipe: RunRecipe, resume: str | None) -> RunPlan:
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    apply_storage(recipe.storage)  # before the first URL is opened (the manifest, just below)
    world = world_size(recipe.trainer.devices, recipe.trainer.num_nodes)
    ckpt = recipe.checkpoint
    if ckpt.enabled and ckpt.mirror:  # read-only credentials fail here, not after the first training steps
        probe_write(ckpt.mirror, "writing checkpoints")
    resume_point = find_resume(resume, ckpt)
    datamodule = ShardDataModule(recipe.data, batch_size=1, seed=recipe.seed, labelled=recipe.labelled,
                                 num_classes=getattr(recipe.model, "num_classes", None))
    # an epoch delivers every sample `repeats` times (repeated augmentation)
    samples = datamodule.manifest.num_samples * recipe.data.repeats
    schedule, per_device, accumulate = plan_schedule(recipe, samples, world)
    datamodule.batch_size = per_device
    return RunPlan(datamodule, schedule, accumulate, resume_point)


def fit(recipe: RunRecipe, plan: RunPlan, task: L.LightningModule, callbacks: Sequence[L.Callback] = (),
        run_tags: dict[str, str] | None = None, run_params: dict[str, str] | None = None,
        on_trained: Callable[[L.Trainer, TrainResult], None] | None = None, stage: str = "train") -> TrainResult:
    """Train ``task`` under ``recipe``; ``on_trained`` runs on global rank 0 after the last checkpoint."""
    tr, ckpt_root = recipe.trainer, Path(recipe.checkpoint.dir)
    layout = resolve_layout(tr.devices, tr.num_nodes)
    cluster = cluster_environment(layout)
    # One MLflow run per training run: a resume continues the run that wrote the checkpoints.
    run_file = ckpt_root / RUN_ID
    mirror = Mirror(recipe.checkpoint.mirror) if recipe.checkpoint.mirror else None
    previous = _previous_run(plan.resume, run_file)
    # Only global rank 0 talks to MLflow. Processes started by a launcher (torchrun, srun) all reach this line
    # at once: the others must not open the tracking store too (a new SQLite store migrates its schema).
    logger = None
    if rank_zero_only.rank == 0:
        if previous is not None and not run_exists(resolve_uri(recipe.tracking), previous):
            log.warning("%s names MLflow run %s, which %s does not hold (checkpoints moved to another tracking "
                        "store?): this resume starts a new run", run_file, previous,
                        scrub_url(resolve_uri(recipe.tracking)))
            previous = None
        logger = make_logger(recipe.tracking, recipe.name, run_id=previous)

    def write_extras(folder: Path) -> None:
        (folder / CONFIG).write_text(recipe.to_yaml())

    all_callbacks: list[L.Callback] = []
    if plan.resume is not None and plan.resume.fetch is not None:
        all_callbacks.append(FetchCheckpoint(plan.resume))
    if tr.sample_trace:
        all_callbacks.append(SampleTrace(tr.sample_trace))
    if recipe.tracking.system_metrics_every_n_steps:
        all_callbacks.append(SystemMetrics(recipe.tracking.system_metrics_every_n_steps))
    all_callbacks.extend(callbacks)
    shown, bar = progress_callbacks(tr.log_every_n_steps)
    all_callbacks.extend(shown)
    preemption = None
    if recipe.checkpoint.enabled:  # last: a checkpoint holds what every other callback did at that step
        saver = CommittedCheckpoint(recipe.checkpoint, write_extras)
        preemption = PreemptionCheckpoint(saver, requeue=layout.launcher == "slurm")
        all_callbacks.extend([saver, preemption])
    trainer = L.Trainer(
        accelerator=tr.accelerator, devices=layout.devices, num_nodes=layout.num_nodes,
        strategy=build_strategy(tr.strategy, recipe.zero), plugins=[cluster] if cluster else None,
        precision=tr.precision,
        max_steps=plan.schedule.total_steps, max_epochs=-1, accumulate_grad_batches=plan.accumulate,
        gradient_clip_val=recipe.optim.grad_clip, logger=logger, callbacks=all_callbacks,
        enable_checkpointing=False, log_every_n_steps=tr.log_every_n_steps, use_distributed_sampler=False,
        num_sanity_val_steps=0, enable_model_summary=False, deterministic=False, enable_progress_bar=bar,
    )
    if trainer.is_global_zero:
        if previous is None:
            _start_run(logger, recipe, plan.datamodule, run_tags or {}, run_params or {})
        if recipe.checkpoint.enabled:
            ckpt_root.mkdir(parents=True, exist_ok=True)
            (ckpt_root / CONFIG).write_text(recipe.to_yaml())
            run_file.write_text(json.dumps({"run_id": logger.run_id}))
            if mirror is not None:
                mirror.put_text(CONFIG, recipe.to_yaml())
                mirror.put_text(RUN_ID, run_file.read_text())
    if plan.resume_from is not None:
        _warn_changed_config(plan.resume_from, recipe)
        log.warning("resuming from %s", plan.resume_from)
    ckpt_path = str(plan.resume_from / STATE) if plan.resume_from else None
    trainer.fit(task, datamodule=plan.datamodule, ckpt_path=ckpt_path)

    result = TrainResult(run_id=logger.run_id if logger else "", tracking_uri=resolve_uri(recipe.tracking),
                         experiment=recipe.tracking.experiment,
                         checkpoint=latest_complete(ckpt_root) if recipe.checkpoint.enabled else None,
                         global_step=trainer.global_step, last_loss=getattr(task, "last_loss", None),
                         tracking_failures=tracking_failures(logger),
                         preempted=preemption.preempted if preemption else None)
    if result.preempted:
        if trainer.is_global_zero:
            print(f"{stage}: stopped by {signal.Signals(result.preempted).name} at step {result.global_step}, "
                  f"checkpoint {result.checkpoint}; --resume auto continues from there")
        return result
    if trainer.is_global_zero:
        if on_trained is not None:
            on_trained(trainer, result)
        loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
        print(f"{stage}: {result.global_step} steps, last loss {loss}; checkpoint {result.checkpoint}")
        print(f"MLflow run {result.run_id} in experiment '{result.experiment}' at {scrub_url(result.tracking_uri)}")
        print(f"  browse it with: {browse_command(result.tracking_uri)}")
        if result.tracking_failures:
            print(f"{logger.tracking.summary()}; training was not affected")
    return result


def _start_run(logger, recipe: RunRecipe, datamodule: ShardDataModule, extra: dict[str, str],
               params: dict[str, str]) -> None:
    """Params (the recipe's and the stage's own), recipe artifact and lineage tags of a new run (secrets
    scrubbed)."""
    clean = scrub(recipe.to_dict())
    logger.log_hyperparams({**flatten(clean), **scrub(params)})
    logger.experiment.log_text(logger.run_id, yaml.safe_dump(clean, sort_keys=False), "recipe.yaml")
    tags = {**code_version(), "vitpipe.task": recipe.task, RECIPE_HASH: recipe.digest(),
            MANIFEST: scrub_url(datamodule.manifest.location), MANIFEST_HASH: datamodule.manifest.digest(), **extra}
    for key, value in tags.items():
        logger.experiment.set_tag(logger.run_id, key, value)


def _previous_run(resume: ResumePoint | None, run_file: Path) -> str | None:
    """The MLflow run of the checkpoints a resume continues (from the mirror when the checkpoint comes from it)."""
    if resume is None:
        return None
    text = Mirror(resume.fetch.mirror).get_text(RUN_ID) if resume.fetch else None
    if text is None and run_file.exists():
        text = run_file.read_text()
    return json.loads(text)["run_id"] if text else None


def _comparable(recipe: dict) -> dict:
    """Flat recipe values without URL userinfo: credentials are no part of a recipe, so a URI written with a
    password (older checkpoints), with "***" or with none names the same server."""
    return {k: without_userinfo(v) if isinstance(v, str) else v for k, v in flatten(recipe).items()}


def _warn_changed_config(checkpoint: Path, recipe: RunRecipe) -> None:
    saved_file = checkpoint / CONFIG
    if not saved_file.exists():
        return
    saved = _comparable(yaml.safe_load(saved_file.read_text()))
    now = _comparable(recipe.to_dict())
    changed = sorted(k for k, v in now.items() if saved.get(k) != v) + sorted(set(saved) - set(now))
    if changed:
        log.warning("recipe differs from the checkpoint's in: %s", ", ".join(changed))
