"""The pretrain stage: recipe -> data, task, strategy, callbacks, logger -> Lightning Trainer.fit.

This is the one training path: every recipe, every strategy, fresh or resumed, goes through ``pretrain``.
"""
from __future__ import annotations

import json
import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import lightning as L
import yaml

from ..checkpoint import CommittedCheckpoint, latest_complete, resolve_resume
from ..checkpoint.store import CONFIG, STATE
from ..config import flatten
from ..data.datamodule import ShardDataModule
from ..distributed import build_strategy, derive_batch, world_size
from ..recipe import Recipe
from ..tasks import MAEPretrainTask, Schedule
from ..tracking import make_logger, resolve_uri, ui_command
from ..tracking.callbacks import ReconstructionImages, SampleTrace

log = logging.getLogger(__name__)
# Our loader plans rank and worker splits itself (data.plan), so Lightning's generic caution does not apply.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")
RUN_ID_FILE = "mlflow_run.json"


@dataclass
class PretrainResult:
    run_id: str
    tracking_uri: str
    experiment: str
    checkpoint: Path | None
    global_step: int
    last_loss: float | None


def plan_schedule(recipe: Recipe, num_samples: int, world: int) -> tuple[Schedule, int, int]:
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


def pretrain(recipe: Recipe, resume: str | None = "auto",
             extra_callbacks: Sequence[L.Callback] = ()) -> PretrainResult:
    tr = recipe.trainer
    L.seed_everything(recipe.seed, workers=True, verbose=False)
    world = world_size(tr.devices, tr.num_nodes)
    ckpt_root = Path(recipe.checkpoint.dir)
    resume_from = resolve_resume(resume, ckpt_root)

    datamodule = ShardDataModule(recipe.data, batch_size=1, seed=recipe.seed)
    schedule, per_device, accumulate = plan_schedule(recipe, datamodule.manifest.num_samples, world)
    datamodule.batch_size = per_device
    task = MAEPretrainTask(recipe.model, recipe.optim, schedule)
    task.model.set_grad_checkpointing(tr.activation_checkpointing)

    # One MLflow run per training run: a resume continues the run that wrote the checkpoints.
    run_file = ckpt_root / RUN_ID_FILE
    previous = json.loads(run_file.read_text())["run_id"] if resume_from is not None and run_file.exists() else None
    logger = make_logger(recipe.tracking, recipe.name, run_id=previous)

    def write_extras(folder: Path) -> None:
        (folder / CONFIG).write_text(recipe.to_yaml())

    callbacks: list[L.Callback] = [CommittedCheckpoint(recipe.checkpoint, write_extras)]
    if recipe.tracking.recon_every_n_steps:
        t = recipe.data.transform
        callbacks.append(ReconstructionImages(recipe.tracking.recon_every_n_steps, t.mean, t.std))
    if tr.sample_trace:
        callbacks.append(SampleTrace(tr.sample_trace))
    callbacks.extend(extra_callbacks)

    trainer = L.Trainer(
        accelerator=tr.accelerator, devices=tr.devices, num_nodes=tr.num_nodes,
        strategy=build_strategy(tr.strategy, recipe.zero), precision=tr.precision,
        max_steps=schedule.total_steps, max_epochs=-1, accumulate_grad_batches=accumulate,
        gradient_clip_val=recipe.optim.grad_clip, logger=logger, callbacks=callbacks,
        enable_checkpointing=False, log_every_n_steps=tr.log_every_n_steps, use_distributed_sampler=False,
        num_sanity_val_steps=0, enable_model_summary=False, deterministic=False,
    )
    if trainer.is_global_zero:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        (ckpt_root / CONFIG).write_text(recipe.to_yaml())
        if previous is None:
            logger.log_hyperparams(flatten(recipe.to_dict()))
            logger.experiment.log_text(logger.run_id, recipe.to_yaml(), "recipe.yaml")
            logger.experiment.set_tag(logger.run_id, "vitpipe.recipe_hash", recipe.digest())
            logger.experiment.set_tag(logger.run_id, "vitpipe.manifest", datamodule.manifest.location)
            logger.experiment.set_tag(logger.run_id, "vitpipe.manifest_hash", datamodule.manifest.digest())
        run_file.write_text(json.dumps({"run_id": logger.run_id}))
    if resume_from is not None:
        _warn_changed_config(resume_from, recipe)
        log.warning("resuming from %s", resume_from)
    trainer.fit(task, datamodule=datamodule, ckpt_path=str(resume_from / STATE) if resume_from else None)

    result = PretrainResult(run_id=logger.run_id, tracking_uri=resolve_uri(recipe.tracking),
                            experiment=recipe.tracking.experiment,
                            checkpoint=latest_complete(ckpt_root), global_step=trainer.global_step,
                            last_loss=task.last_loss)
    if trainer.is_global_zero:
        loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
        print(f"pretrain: {result.global_step} steps, last loss {loss}; checkpoint {result.checkpoint}")
        print(f"MLflow run {result.run_id} in experiment '{result.experiment}' at {result.tracking_uri}")
        print(f"  browse it with: {ui_command(result.tracking_uri)}")
    return result


def _warn_changed_config(checkpoint: Path, recipe: Recipe) -> None:
    saved_file = checkpoint / CONFIG
    if not saved_file.exists():
        return
    saved = flatten(yaml.safe_load(saved_file.read_text()))
    now = flatten(recipe.to_dict())
    changed = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
    if changed:
        log.warning("recipe differs from the checkpoint's in: %s", ", ".join(changed))
