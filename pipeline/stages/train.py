"""The one training path, for every objective: recipe -> plan (data, schedule, resume point) -> the objective's
task -> Trainer -> fit -> the objective's end-of-run step -> the run summary.

Strategies, checkpointing, resume and tracking behave the same for every objective; what differs between
objectives is declared in ``pipeline.objectives``.
"""
from __future__ import annotations

import dataclasses
import gc
import logging
import math
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L

from ..checkpoint import CommittedCheckpoint, latest_complete
from ..checkpoint.preemption import PreemptionStop, end_preempted_stage, held_signals
from ..checkpoint.resume import FetchCheckpoint, ResumePoint, find_resume
from ..checkpoint.store import STATE
from ..console import report
from ..data.datamodule import ShardDataModule
from ..data.storage import apply_storage, probe_write
from ..distributed import build_strategy, cluster_environment, derive_batch, launcher_layout, resolve_layout, world_size
from ..evaluation.monitor import PretrainMonitor
from ..guard import ContinueAt, GuardLedger, StepGuard
from ..objectives.registry import objective_of
from ..objectives.spec import Training
from ..recipe import RunRecipe
from ..tasks import Schedule
from ..tracking import resolve_uri
from ..tracking.callbacks import DataWait, SystemMetrics
from ..tracking.final_status import keep as keep_final_status
from ..tracking.mlflow_setup import tracking_failures
from ..tracking.progress import progress_callbacks
from ..tracking.sample_trace import SampleTrace
from ..tracking.secrets import scrub_url
from ..tracking.throughput import Throughput
from .run_record import RunRecord, TrainResult
from .ui import browse_command

log = logging.getLogger(__name__)
# Our loader deals out rank and worker batches itself (data.order), so Lightning's generic caution does not apply.
warnings.filterwarnings("ignore", message=r".*`IterableDataset` has `__len__` defined.*")


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
                                 num_classes=recipe.label_classes())
    # an epoch delivers every sample `repeats` times (repeated augmentation)
    samples = datamodule.manifest.num_samples * recipe.data.repeats
    schedule, per_device, accumulate = plan_schedule(recipe, samples, world)
    datamodule.batch_size = per_device
    return RunPlan(datamodule, schedule, accumulate, resume_point)


def train(recipe: RunRecipe, resume: str | None = "auto", extra_callbacks: Sequence[L.Callback] = ()) -> TrainResult:
    """Train ``recipe`` with its objective; ``resume``: auto (newest complete checkpoint), none, or a folder.

    A rollback the guard asks for restarts the run here, in this process, from the checkpoint it names (the
    strategy restores the full state, ZeRO-3 included) with the data stream where it was. SIGUSR1 / SIGTERM, from
    the stage's start to its end, stop the run at a step boundary (``held_signals``), with a checkpoint when
    checkpoints are on."""
    with held_signals():
        return _train(recipe, resume, extra_callbacks)


def _train(recipe: RunRecipe, resume: str | None, extra_callbacks: Sequence[L.Callback]) -> TrainResult:
    objective = objective_of(recipe)
    stage = objective.stage
    plan = plan_run(recipe, resume)
    result = fit(recipe, plan, objective.build(recipe, plan), extra_callbacks)
    while (rollback := result.rollback) is not None and not result.preempted:  # a signal wins: stop, as asked
        gc.collect()  # the abandoned trajectory's model and optimizer state, before the checkpoint's are built
        plan = plan_run(recipe, str(rollback.checkpoint))
        result = fit(recipe, plan, objective.build(recipe, plan), [*extra_callbacks, ContinueAt(rollback)],
                     ledger=rollback.ledger)
    if result.preempted:
        if result.is_global_zero:
            where = (f"checkpoint {result.checkpoint}; --resume auto continues from there" if result.checkpoint
                     else "no checkpoint (checkpoints are off)")
            report.info(f"{stage}: stopped by {signal.Signals(result.preempted).name} at step "
                        f"{result.global_step}, {where}")
        layout = launcher_layout()  # a requeued job without a checkpoint would only start again from step 0
        end_preempted_stage(requeue=recipe.checkpoint.enabled and layout is not None and layout.launcher == "slurm")
        return result
    if not result.is_global_zero:
        return result
    if objective.after_training is not None:
        objective.after_training(objective, recipe, result)
    loss = "n/a" if result.last_loss is None else f"{result.last_loss:.4f}"
    report.info(f"{stage}: {result.global_step} steps, last loss {loss}; checkpoint {result.checkpoint}")
    report.info(f"MLflow run {result.run_id} in experiment '{result.experiment}' at {scrub_url(result.tracking_uri)}")
    report.info(f"  browse it with: {browse_command(result.tracking_uri)}")
    if result.summary.lines:
        report.info(result.summary)
    return result


def apply_block_options(recipe: RunRecipe, task: L.LightningModule) -> None:
    """Activation checkpointing and regional compilation of the trained model's transformer blocks (a model
    without ViT blocks, such as a timm CNN, runs as it is, said once)."""
    from lightning.pytorch.utilities import rank_zero_warn

    from ..models.block_options import compile_blocks, compile_refusal, set_activation_checkpointing

    tr, model = recipe.trainer, getattr(task, "model", task)  # the trained network, not a DeiT teacher
    set_activation_checkpointing(model, tr.activation_checkpointing)
    if not tr.compile:
        return
    if (refusal := compile_refusal(tr.strategy, recipe.zero.stage)) is not None:
        rank_zero_warn(refusal)
    elif compile_blocks(model) == 0:
        rank_zero_warn(f"trainer.compile: {type(model).__name__} has no ViT blocks to compile; it runs eager")


def build_guard(recipe: RunRecipe, saver: CommittedCheckpoint | None, ledger: GuardLedger | None
                ) -> StepGuard | None:
    """The guard of ``trainer.guard``. It clips gradients itself (one norm for clipping and its check), except
    under DeepSpeed, which clips inside ZeRO and skips a non-finite norm there, and under fp16, whose loss
    scaler skips non-finite steps its own way."""
    tr = recipe.trainer
    if not tr.guard.enabled:
        return None
    skips = tr.precision != "16-mixed"
    return StepGuard(tr.guard, recipe.optim.grad_clip, owns_clipping=skips and tr.strategy != "deepspeed",
                     skips=skips, root=Path(recipe.checkpoint.dir) if saver is not None else None, saver=saver,
                     ledger=ledger)


def build_monitor(recipe: RunRecipe) -> PretrainMonitor | None:
    """kNN top-1 and RankMe every ``monitor.every_n_steps`` (its splits default to the run's data.val)."""
    cfg = recipe.monitor
    if not cfg.every_n_steps:
        return None
    cfg = dataclasses.replace(cfg, train=cfg.train or recipe.data.val, val=cfg.val or recipe.data.val)
    return PretrainMonitor(cfg, recipe.input_size(), recipe.normalisation())


def fit(recipe: RunRecipe, plan: RunPlan, training: Training, extra_callbacks: Sequence[L.Callback] = (),
        ledger: GuardLedger | None = None) -> TrainResult:
    """Build the Trainer for ``recipe`` around the objective's task and run it to its end (or a preemption, or
    a rollback the guard asks for; ``ledger``: the guard's record carried over from before a rollback)."""
    tr = recipe.trainer
    apply_block_options(recipe, training.task)
    layout = resolve_layout(tr.devices, tr.num_nodes)
    cluster = cluster_environment(layout)
    record = RunRecord(recipe, plan.resume)
    logger = record.open_logger()
    data_wait, throughput = DataWait(), Throughput(training.flops_per_image, tr.peak_tflops)
    callbacks: list[L.Callback] = [data_wait, throughput]
    saver = CommittedCheckpoint(recipe.checkpoint, record.write_config) if recipe.checkpoint.enabled else None
    guard = build_guard(recipe, saver, ledger)
    if guard is not None:  # before the objective's callbacks: the weight average follows its verdict
        callbacks.append(guard)
    if plan.resume is not None and plan.resume.fetch is not None:
        callbacks.append(FetchCheckpoint(plan.resume))
    if tr.sample_trace:
        callbacks.append(SampleTrace(tr.sample_trace))
    if recipe.tracking.system_metrics_every_n_steps:
        callbacks.append(SystemMetrics(recipe.tracking.system_metrics_every_n_steps))
    monitor = build_monitor(recipe)
    if monitor is not None:
        callbacks.append(monitor)
    callbacks.extend([*training.callbacks, *extra_callbacks])
    shown, bar = progress_callbacks(tr.log_every_n_steps)
    callbacks.extend(shown)
    if saver is not None:  # last: a checkpoint holds what every other callback did at that step
        callbacks.append(saver)
    preemption = PreemptionStop(saver, on_stop=logger.mark_stopped if logger is not None else None)
    callbacks.append(preemption)
    trainer = L.Trainer(
        accelerator=tr.accelerator, devices=layout.devices, num_nodes=layout.num_nodes,
        strategy=build_strategy(tr.strategy, recipe.zero, device_skips=guard is not None and guard.skips),
        plugins=[cluster] if cluster else None,
        precision=tr.precision,
        max_steps=plan.schedule.total_steps, max_epochs=-1, accumulate_grad_batches=plan.accumulate,
        gradient_clip_val=None if guard is not None and guard.owns_clipping else recipe.optim.grad_clip,
        logger=logger, callbacks=callbacks,
        enable_checkpointing=False, log_every_n_steps=tr.log_every_n_steps, use_distributed_sampler=False,
        num_sanity_val_steps=0, enable_model_summary=False, deterministic=False, enable_progress_bar=bar,
    )
    if trainer.is_global_zero:
        size = sum(p.numel() for p in training.task.model.parameters())  # before any strategy partitions them
        record.begin(logger, plan.datamodule, dict(training.tags), {"model.parameters": str(size),
                                                                    **training.params})
    record.check_resume()
    ckpt_path = str(plan.resume_from / STATE) if plan.resume_from else None
    started = time.perf_counter()
    trainer.fit(training.task, datamodule=plan.datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - started
    result = TrainResult(run_id=logger.run_id if logger else "", tracking_uri=resolve_uri(recipe.tracking),
                         experiment=recipe.tracking.experiment,
                         checkpoint=latest_complete(record.root) if recipe.checkpoint.enabled else None,
                         global_step=trainer.global_step, last_loss=getattr(training.task, "last_loss", None),
                         tracking_failures=tracking_failures(logger),
                         preempted=preemption.preempted,
                         is_global_zero=trainer.is_global_zero, rollback=guard.rollback if guard else None)
    if (line := throughput.summary(trainer.world_size)) is not None:
        result.summary.add(line)
    if (waited := data_wait.fraction()) is not None and waited[1] > 0:
        result.summary.add(f"data wait: {waited[0] / waited[1]:.1%} of the training loop's time on this rank "
                           f"({waited[0]:.1f} s of {waited[1]:.1f} s; perf/data_wait_frac per step)")
    if monitor is not None and (line := monitor.summary(fit_seconds)) is not None:
        result.summary.add(line)
    if guard is not None and (line := guard.ledger.summary()) is not None:
        result.summary.add(line)
    if result.tracking_failures:
        result.summary.add(f"{logger.tracking.summary()}; training was not affected")
    if logger is not None and logger.unsettled is not None:
        status = logger.unsettled["status"]
        if recipe.checkpoint.enabled:
            kept = keep_final_status(record.root, logger.unsettled)
            result.summary.add(f"MLflow did not answer when the run ended: its final status {status} is kept in "
                               f"{kept} and written by the next vitpipe command that touches the run "
                               "(pretrain --resume, register)")
        else:
            result.summary.add(f"MLflow did not answer when the run ended: run {logger.run_id} stays RUNNING "
                               f"there (final status {status}; with checkpoints off there is no folder to keep it)")
    return result
