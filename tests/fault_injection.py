"""Test-only faults injected into a real training run through callbacks, and probes that report its state.

Each fault fires a fixed number of times over the life of the callback, so a run the guard rolls back (the
same process, the same callbacks, step numbers counted again from the checkpoint) does not meet it again.
Steps are 1-based optimizer steps: the step a batch trains.
"""
from __future__ import annotations

import errno
import json
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch


class PoisonBatch(L.Callback):
    """NaN images in global rank ``rank``'s batches of optimizer ``step`` (a corrupt batch)."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank, self.keys = step, rank, []
        self.fired = False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.fired or trainer.global_step + 1 != self.step or trainer.global_rank != self.rank:
            return
        batch["image"].fill_(float("nan"))
        self.keys = list(batch.get("key", []))
        self.fired = True


class InfParameter(L.Callback):
    """At optimizer ``step`` one weight of the trained model becomes inf, so every later step is non-finite
    until a rollback restores the weights (not under ZeRO-3, whose weights are partitioned)."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if self.fired or trainer.global_step + 1 != self.step:
            return
        with torch.no_grad():
            next(p for p in pl_module.parameters() if p.requires_grad).view(-1)[0] = float("inf")
        self.fired = True


class LossFault(L.Callback):
    """Alters what the task's ``training_step`` returns (``alter``), for this run's task only: a rolled-back
    run builds a new task, and meets the fault again only if ``alter`` has not used it up."""

    def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        plain = type(pl_module).training_step

        def training_step(batch: Any, batch_idx: int) -> Any:
            return self.alter(trainer, plain(pl_module, batch, batch_idx))

        pl_module.training_step = training_step

    def alter(self, trainer: L.Trainer, out: Any) -> Any:
        raise NotImplementedError


class SpikeLoss(LossFault):
    """The loss of ``count`` consecutive optimizer steps from ``step`` multiplied by ``factor`` (its gradient
    too, before clipping): a loss spike the guard must see on every rank."""

    def __init__(self, step: int, count: int, factor: float = 50.0):
        self.step, self.count, self.factor, self.left = step, count, factor, count
        self.fired: list[int] = []

    def alter(self, trainer: L.Trainer, out: Any) -> Any:
        step = trainer.global_step + 1
        if not self.left or step < self.step:
            return out
        if step not in self.fired:
            self.fired.append(step)
            self.left -= 1
        return out * self.factor if isinstance(out, torch.Tensor) else {**out, "loss": out["loss"] * self.factor}


class InfGradient(LossFault):
    """Global rank ``rank``'s gradients of optimizer ``step`` are infinite while its loss stays finite (an
    overflow in the backward pass): only a gradient check can see it."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank, self.fired = step, rank, False

    def alter(self, trainer: L.Trainer, out: Any) -> Any:
        if not self.fired and trainer.global_step + 1 == self.step and trainer.global_rank == self.rank:
            out.register_hook(lambda grad: grad * float("inf"))
            self.fired = True
        return out


class Snapshot(L.Callback):
    """Copies of the model's weights and the optimizer's state before and after optimizer ``step``."""

    def __init__(self, step: int):
        self.step = step
        self.before: dict[str, torch.Tensor] = {}
        self.after: dict[str, torch.Tensor] = {}

    @staticmethod
    def _state(trainer: L.Trainer, pl_module: Any) -> dict[str, torch.Tensor]:
        out = {f"w.{k}": v.detach().clone() for k, v in pl_module.state_dict().items() if torch.is_tensor(v)}
        for i, state in enumerate(trainer.optimizers[0].state.values()):
            out.update({f"opt.{i}.{k}": v.detach().clone() for k, v in state.items() if torch.is_tensor(v)})
        # ZeRO with 16-bit weights: this rank's fp32 master partitions (ZeRO-1/2, then ZeRO-3)
        opt = trainer.optimizers[0]
        masters = getattr(opt, "single_partition_of_fp32_groups", None) or getattr(opt, "fp32_partitioned_groups_flat", [])
        for i, part in enumerate(masters):
            out[f"master.{i}"] = part.detach().clone()
        for name, param in pl_module.named_parameters():  # ZeRO-3: the module holds only this rank's partitions
            if hasattr(param, "ds_tensor"):
                out[f"w.part.{name}"] = param.ds_tensor.detach().clone()
        return out

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step + 1 == self.step:
            self.before = self._state(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.step and not self.after:
            self.after = self._state(trainer, pl_module)


class SigkillAt(L.Callback):
    """Global rank ``rank`` SIGKILLs itself after optimizer ``step``, in the first attempt of a launcher's group
    only (a restarted group, ``TORCHELASTIC_RESTART_COUNT`` > 0, runs on)."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        first = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        if first and trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGKILL)


class NoSpaceAt(L.Callback):
    """Writing the checkpoint of optimizer ``step`` fails with ENOSPC, as on a full disk (once)."""

    def __init__(self, step: int):
        self.step, self.fired = step, False

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if not self.fired and trainer.global_step == self.step:
            self.fired = True
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "state.ckpt")


class NoSpaceOnRank(L.Callback):
    """Global rank ``rank``'s first file of the checkpoint of optimizer ``step`` fails with ENOSPC (once), as when
    only that rank's disk is full: the other ranks write theirs. For strategies where every rank writes its own
    files (DeepSpeed): the write fails inside the strategy's save, between its collectives."""

    def __init__(self, step: int, rank: int):
        self.step, self.rank = step, rank

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: Any, checkpoint: dict) -> None:
        if trainer.global_step != self.step or trainer.global_rank != self.rank:
            return
        real = torch.save

        def full_disk(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            torch.save = real  # once
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))

        torch.save = full_disk


class StopServerAtEnd(L.Callback):
    """When training ends, before the logger writes the run's final status: kill the tracking server (process
    group ``pid``) and wait until its ``port`` refuses connections."""

    def __init__(self, pid: int, port: int):
        self.pid, self.port = pid, port

    def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
        if not trainer.is_global_zero:
            return
        os.killpg(self.pid, signal.SIGKILL)
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            except OSError:
                return
            time.sleep(0.1)


class KillWhileSaving(L.Callback):
    """The process SIGKILLs itself while writing the checkpoint of ``step``: a half-written checkpoint."""

    def __init__(self, step: int):
        self.step = step

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAt(L.Callback):
    """Global rank ``rank`` sends itself SIGUSR1 after its ``batch``-th micro-batch of this process (mid
    gradient accumulation if so chosen; 0: in the Trainer's set-up), as `scancel --signal=USR1` would."""

    def __init__(self, batch: int, rank: int):
        self.batch, self.rank, self.seen = batch, rank, 0

    def setup(self, trainer, pl_module, stage):
        if self.batch == 0 and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGUSR1)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen == self.batch and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGUSR1)


class EngineReport(L.Callback):
    """At the end, each rank writes ``PATH.rank<R>.json``: its ZeRO stage, how many elements of the weights,
    fp32 masters and Adam moments it holds, against the model's total, and whether ``zero_host`` changed the
    optimizer (its gradient norm and re-pointing) and gave every parameter its gradient hook, and whether
    DeepSpeed's throughput timer (a device synchronisation at each step's start and end) is on."""

    def __init__(self, path: str):
        self.path = Path(path)

    def on_train_end(self, trainer, pl_module):
        from pipeline.distributed import zero_host

        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        report = {"rank": trainer.global_rank, "world_size": trainer.world_size, "num_nodes": trainer.num_nodes,
                  "stage": None}
        if engine is not None:
            params = list(engine.module.parameters())
            stage = int(engine.zero_optimization_stage())
            opt = engine.optimizer
            if stage == 3:  # each parameter keeps only its partition in ds_tensor
                local = sum(p.ds_tensor.numel() for p in params)
                master = opt.fp32_partitioned_groups_flat
            else:  # ZeRO 1/2: one flat fp32 partition per parameter group
                local = sum(t.numel() for t in opt.single_partition_of_fp32_groups)
                master = opt.single_partition_of_fp32_groups
            moments = sum(s["exp_avg"].numel() + s["exp_avg_sq"].numel()
                          for s in opt.optimizer.state.values() if "exp_avg" in s)
            report.update(stage=stage, throughput_timer=engine.tput_timer.config.enabled,
                          total=sum(getattr(p, "ds_numel", p.numel()) for p in params), local_weights=local,
                          local_master=sum(t.numel() for t in master), local_moments=moments,
                          zero_host={"get_grad_norm_direct", "_update_model_bit16_weights"} <= vars(opt).keys(),
                          zero_hooks=all(getattr(hook, "func", None) is zero_host.gradient_hook
                                         for p in params if p.requires_grad
                                         for hook in (p._post_accumulate_grad_hooks or {None: None}).values()))
        out = self.path.with_name(f"{self.path.name}.rank{trainer.global_rank}.json")
        out.write_text(json.dumps(report))


class SaveOnStart(L.Callback):
    """Once restored and before the first step, the state is saved as the strategy writes it, to ``path``."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        trainer.save_checkpoint(self.path)
