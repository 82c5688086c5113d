"""The training guard: skips an optimizer step whose loss or gradient is non-finite on any rank, and asks for
a rollback when the loss spikes or skipped steps pile up.

A step is skipped on the device, without reading anything back: the flag goes to the fused AdamW kernel as
its ``found_inf`` (the mechanism of torch's GradScaler), which then leaves weights, moments and step count
bitwise as they were; under DeepSpeed the client optimizer inside ZeRO takes the same flag. ZeRO in bf16
leaves the gradient check to the guard too (``distributed.zero_sync``): its norm joins the flag on the device,
just before the client optimizer steps; elsewhere ZeRO's own check skips a non-finite gradient norm. The
weight average (EMA) skips with it. Each step's flag and loss go into a device-side record, read back once
per logging step (a step that synchronises anyway), where the host-side ``Detector`` judges them, the skipped
steps' sample keys are named, and a rollback is decided.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.loggers import MLFlowLogger

from ..checkpoint.store import STEP_DIR, newest_sound
from ..distributed import zero_sync
from ..distributed.gather import every_rank
from ..errors import RunStopped
from ..step_boundary import StepBoundary
from ..tasks.optim import skips_by_found_inf
from .config import GuardConfig
from .detector import Detector, Verdict

log = logging.getLogger(__name__)
STATE_KEY = "StepGuard"
EVENTS = "guard_events.jsonl"  # beside the checkpoints: one JSON line per skipped step and rollback


class GuardError(RunStopped):
    """The run cannot heal itself (rollbacks used up, or no checkpoint to roll back to)."""


@dataclass
class GuardLedger:
    """What the guard did over the whole run: kept across rollbacks (a rolled-back checkpoint holds an older
    ledger) and saved with each checkpoint."""

    skipped: list[int] = field(default_factory=list)
    rollbacks: list[str] = field(default_factory=list)

    def summary(self) -> str | None:
        if not self.skipped and not self.rollbacks:
            return None
        shown = ", ".join(map(str, self.skipped[:10])) + (" ..." if len(self.skipped) > 10 else "")
        parts = [f"{len(self.skipped)} non-finite steps skipped" + (f" ({shown})" if shown else "")]
        parts += [f"rollback: {r}" for r in self.rollbacks]
        return "guard: " + "; ".join(parts)


@dataclass
class Rollback:
    """A rollback the guard asked for: the run restarts from ``checkpoint`` with the data where it is now."""

    checkpoint: Path
    verdict: Verdict
    position: dict[str, Any]
    """The data stream's state after the last batch trained on (the offending batches are not read again)."""
    lr_factor: float
    ledger: GuardLedger


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    """The torch optimizer that updates the weights (DeepSpeed's ZeRO wraps the client optimizer)."""
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def step_applied(trainer: L.Trainer) -> torch.Tensor | None:
    """1.0 on the device when the last optimizer step was applied, 0.0 when the guard skipped it; None
    without a guard."""
    guard = next((c for c in trainer.callbacks if isinstance(c, StepGuard)), None)
    return None if guard is None else guard.applied


class StepGuard(L.Callback):
    def __init__(self, cfg: GuardConfig, grad_clip: float | None, owns_clipping: bool, skips: bool,
                 root: Path | None, saver: Any = None, ledger: GuardLedger | None = None):
        self.cfg, self.grad_clip, self.owns_clipping, self.skips = cfg, grad_clip, owns_clipping, skips
        self.root, self.saver = root, saver  # checkpoint folder and its writer (held during a rollback)
        self.detector = Detector(cfg)
        self.ledger = ledger if ledger is not None else GuardLedger()
        self._carried = ledger is not None  # a restarted run keeps its ledger over the checkpoint's
        self.rollback: Rollback | None = None
        self.applied: torch.Tensor | None = None
        self._trainer: L.Trainer | None = None
        self._pending: Verdict | None = None  # found at a checkpoint, acted on at the next logging step
        self._hook: Any = None  # under ZeRO-1/2 in bf16: the client optimizer's pre-step hook
        self._recent: dict[int, list[str]] = {}  # this rank's sample keys of the last ``window`` steps judged
        self.boundary = StepBoundary()

    @property
    def state_key(self) -> str:
        return STATE_KEY

    # -- per step, on the device ----------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._trainer, device, n = trainer, pl_module.device, trainer.log_every_n_steps
        self._opt = innermost_optimizer(trainer.optimizers[0])
        self.found_inf = torch.zeros((), device=self._opt_device(device))  # 1.0: the fused kernel skips
        # (fp16: the loss scaler sets its own found_inf on the optimizer and skips by it.) Each group's flag
        # decides, not the defaults (build_optimizer resumes an unfused optimizer's checkpoint fused).
        if self.skips and skips_by_found_inf(self._opt):
            self._opt.found_inf = self.found_inf
        elif self.skips:
            log.warning("trainer.guard: %s is not torch's fused AdamW, so non-finite steps cannot be skipped "
                        "(spikes are still watched)", type(self._opt).__name__)
        self.applied = torch.ones((), device=device)
        self._bad_loss = torch.zeros((), device=device)
        self._loss = torch.zeros((), device=device)
        # per step of the logging window: [skipped (any rank), mean loss over ranks, this rank's loss non-finite]
        self._record = torch.zeros(n, 3, device=device)
        # what the all-reduced [skipped, loss] is divided by: made once (a copy to a GPU waits for its queue)
        self._divisor = torch.tensor([1.0, float(trainer.world_size)], device=device)
        self._keys: list[list[str]] = [[] for _ in range(n)]  # this rank's sample keys of each of those steps
        self._done = trainer.global_step  # steps the detector has seen
        # the trained parameters, listed once: walking the module tree every step costs the host ~400 calls
        self._params = [p for p in pl_module.parameters() if p.requires_grad]
        self.boundary.start(trainer)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        self._engine = engine
        self._ds_skipped = engine.skipped_steps if engine is not None else 0
        self._slot = 0  # the record's row of the step being taken
        if self.skips and engine is not None and zero_sync.leaves_skips_to_the_client(engine.optimizer):
            self._zero = engine.optimizer  # steps whatever its norm: the flag takes the norm in, on the device
            self._hook = self._opt.register_step_pre_hook(self._fold_zero_norm)

    def _fold_zero_norm(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """Before the client optimizer steps inside ZeRO: a non-finite gradient norm of this step (ZeRO's, the
        same on every rank) skips it too. Runs once per parameter group; taking the maximum makes that harmless."""
        bad = (~torch.isfinite(zero_sync.step_norm(self._zero))).float().to(self.found_inf.device)
        self.found_inf.copy_(torch.maximum(self.found_inf, bad))
        self.applied.copy_(1.0 - self.found_inf.to(self.applied.device))
        row = self._record[self._slot]
        row[0] = torch.maximum(row[0], bad.to(row.device))

    def _opt_device(self, fallback: torch.device) -> torch.device:
        for group in self._opt.param_groups:
            for p in group["params"]:
                return p.device
        return fallback

    def on_before_backward(self, trainer: L.Trainer, pl_module: L.LightningModule, loss: torch.Tensor) -> None:
        loss = loss.detach().float()  # already divided by the accumulation: the micro-batches sum to the mean
        self._bad_loss.copy_(torch.maximum(self._bad_loss, (~torch.isfinite(loss)).float()))
        self._loss.add_(loss)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        if self._engine is not None and not self._engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed accumulates itself: Lightning calls this for every micro-batch, the step is the last
        bad = self._bad_loss.clone()
        if self.owns_clipping:  # one gradient norm serves the clipping and the finiteness check
            params = [p for p in self._params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm([p.grad for p in params])
            if self.grad_clip:
                torch.nn.utils.clip_grads_with_norm_(params, self.grad_clip, norm)
            bad = torch.maximum(bad, (~torch.isfinite(norm)).float())
        row = torch.stack([bad, self._loss])  # [2]
        if trainer.world_size > 1:  # every rank skips if any rank must; the loss becomes the mean over ranks
            dist.all_reduce(row)
            row = row / self._divisor
        skip = (row[0] > 0).float()
        self.found_inf.copy_(skip)
        self.applied.copy_(1.0 - skip)
        self._slot = trainer.global_step % len(self._keys)
        self._record[self._slot].copy_(torch.cat([row, self._bad_loss.view(1)]))
        self._bad_loss.zero_()
        self._loss.zero_()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        slot = (step - 1) % len(self._keys)
        if not self.boundary.crossed(trainer):  # a micro-batch of an accumulation: its keys belong to the coming step
            self._keys[step % len(self._keys)].extend(batch.get("key", []))
            return
        self._keys[slot].extend(batch.get("key", []))
        if self._engine is not None and self._engine.skipped_steps > self._ds_skipped:
            # ZeRO found the gradient norm non-finite and skipped (it read the norm back: no sync of ours)
            self._ds_skipped = self._engine.skipped_steps
            self._record[slot, 0] = 1.0
            self.applied.zero_()
        if step % trainer.log_every_n_steps == 0:
            self._judge(trainer, pl_module)

    # -- per logging step, on the host ----------------------------------------------------------------------
    def _observe(self, trainer: L.Trainer) -> Verdict | None:
        """Feed the steps since the last look to the detector (one read of the record); name skipped steps."""
        step, n = trainer.global_step, len(self._keys)
        if step <= self._done:
            return None
        rows = self._record.tolist()
        verdict, skipped = None, []
        mine: dict[int, bool] = {}  # skipped step -> whether this rank's own loss was non-finite
        for s in range(self._done + 1, step + 1):
            bad, loss, local = rows[(s - 1) % n]
            if bad > 0:
                skipped.append(s)
                mine[s] = local > 0
            found = self.detector.observe(s, loss, bad > 0)
            verdict = verdict or found
        if skipped:
            keys = self._gather_keys(mine)
            self.ledger.skipped.extend(skipped)
            for s in skipped:
                log.warning("step %d skipped: non-finite loss or gradient on some rank; its samples: %s", s,
                            ", ".join(keys[s]) or "(none)")
                self._event(trainer, {"event": "skipped", "step": s, "keys": keys[s]})
        for s in range(self._done + 1, step + 1):  # kept a window longer: a verdict names its steps' samples
            self._recent[s], self._keys[(s - 1) % n] = self._keys[(s - 1) % n], []
        for s in [s for s in self._recent if s <= step - self.cfg.window]:
            del self._recent[s]
        self._done = step
        return verdict

    def _gather_keys(self, bad_here: dict[int, bool]) -> dict[int, list[str]]:
        """The sample keys of each skipped step: of the ranks whose loss was non-finite, or of every rank when
        only the (shared) gradient was."""
        n = len(self._keys)
        mine = {s: (bad, list(self._keys[(s - 1) % n])) for s, bad in bad_here.items()}
        every = every_rank(mine)  # every rank knows the same steps were skipped: all join
        out = {}
        for s in bad_here:
            culprits = [keys for bad, keys in (rank[s] for rank in every) if bad]
            out[s] = [k for keys in (culprits or [keys for _, keys in (rank[s] for rank in every)]) for k in keys]
        return out

    def _verdict_keys(self, verdict: Verdict) -> list[str]:
        """Every rank's sample keys of the verdict's steps (those still remembered)."""
        mine = [k for s in verdict.steps for k in self._recent.get(s, [])]
        return [k for rank in every_rank(mine) for k in rank]  # every rank reaches the same verdict: all join

    def _judge(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        verdict = self._pending or self._observe(trainer)
        self._pending = None
        pl_module.log("guard/skipped_steps", float(len(self.ledger.skipped)), batch_size=1)
        pl_module.log("guard/rollbacks", float(len(self.ledger.rollbacks)), batch_size=1)
        if verdict is not None:
            self._roll_back(trainer, verdict)

    def _roll_back(self, trainer: L.Trainer, verdict: Verdict) -> None:
        done, keys = len(self.ledger.rollbacks), self._verdict_keys(verdict)
        shown = ", ".join(keys[:16]) + (f", ... ({len(keys)} in all)" if len(keys) > 16 else "")
        if self.root is None:
            raise GuardError(f"trainer.guard: {verdict.describe()}, and checkpointing is off, so there is no "
                             "checkpoint to roll back to")
        target = newest_sound(self.root, before=verdict.first) if trainer.is_global_zero else None
        target = trainer.strategy.broadcast(target)  # one choice for all ranks
        if done >= self.cfg.max_rollbacks:
            raise GuardError(f"trainer.guard: {verdict.describe()} after {done} rollbacks (max_rollbacks "
                             f"{self.cfg.max_rollbacks}; {'; '.join(self.ledger.rollbacks)}); newest sound "
                             f"checkpoint before it: {target}; skipped steps: {self.ledger.skipped or 'none'}; "
                             f"the samples of steps {list(verdict.steps)}: {shown or 'not known'}")
        if target is None:
            raise GuardError(f"trainer.guard: {verdict.describe()}, and no sound checkpoint under {self.root} "
                             f"precedes step {verdict.first} (checkpoint.every_n_steps / keep_last)")
        self.rollback = Rollback(
            checkpoint=Path(target), verdict=verdict, position=trainer.datamodule.loader.state_dict(),
            lr_factor=self.cfg.lr_factor, ledger=self.ledger)
        line = f"{verdict.describe()} -> back to {Path(target).name}"
        if self.cfg.lr_factor != 1.0:
            line += f", lr x {self.cfg.lr_factor:g}"
        self.ledger.rollbacks.append(line)
        log.warning("trainer.guard: %s; data continues after step %d's batch", line, trainer.global_step)
        self._event(trainer, {"event": "rollback", "step": trainer.global_step, "reason": verdict.reason,
                              "steps": list(verdict.steps), "checkpoint": str(target), "keys": keys})
        if self.saver is not None:  # the weights of this trajectory are not saved, nor resumed from
            self.saver.hold(trainer, after=int(STEP_DIR.match(Path(target).name).group(1)))
        trainer.should_stop = True

    def _event(self, trainer: L.Trainer, record: dict[str, Any]) -> None:
        if self.root is None or not trainer.is_global_zero:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / EVENTS).open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _remove_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._remove_hook()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._remove_hook()
        if self.rollback is None:
            self._observe(trainer)  # the steps since the last logging step
        logger = next((lg for lg in trainer.loggers if isinstance(lg, MLFlowLogger)), None)
        if logger is not None and trainer.is_global_zero and (summary := self.ledger.summary()):
            logger.experiment.set_tag(logger.run_id, "vitpipe.guard", summary[:4000])

    # -- checkpoints -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self._trainer is not None:
            # A checkpoint is a sync point: judge the steps so far, so a resume continues the same judgement.
            # A verdict found here is acted on at the next logging step, as in a run without this checkpoint.
            self._pending = self._pending or self._observe(self._trainer)
        pending = None if self._pending is None else [self._pending.reason, list(self._pending.steps)]
        return {"detector": self.detector.state_dict(), "skipped": list(self.ledger.skipped),
                "rollbacks": list(self.ledger.rollbacks), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.detector.load_state_dict(state["detector"])
        if state.get("pending"):
            self._pending = Verdict(state["pending"][0], tuple(state["pending"][1]))
        if not self._carried:
            self.ledger = GuardLedger(list(state["skipped"]), list(state["rollbacks"]))
