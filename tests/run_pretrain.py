"""Runs the pretrain stage in its own process (or under torchrun, one per rank), with test probes.

Usage: python run_pretrain.py OVERRIDES_JSON [--recipe NAME] [--kill-in-checkpoint-at STEP]
                              [--engine-report PATH] [--save-on-start PATH] [--signal-at N]
--kill-in-checkpoint-at: the process dies (SIGKILL) *while writing* the checkpoint of that step, the harshest
    point: the checkpoint folder is half written and must never be used by a resume.
--engine-report: each rank writes PATH.rank<R>.json with the ZeRO stage read from the DeepSpeed engine and how
    many elements of the partitioned fp32 weights and Adam moments this rank holds, against the model's total.
--signal-at N [--signal-rank R]: rank R (default 0) sends itself SIGUSR1 after its N-th micro-batch (0: while the
    Trainer sets up, before any step), as a scheduler would; the run checkpoints at the next optimizer step,
    stops and exits with 128 + the signal.
--save-on-start: once restored and before the first step, save the state as the strategy writes it to PATH
    (a folder under DeepSpeed): what a resume restored, to compare with what was saved.
--poison-at STEP [--poison-rank R]: rank R's batch of optimizer step STEP is all NaN (fault_injection).
--spike-at STEP [--spike-count N]: the loss of N steps from STEP is 50 times larger on every rank.
--sigkill-at STEP --sigkill-rank R: rank R SIGKILLs itself after STEP in a launcher's first attempt.
--no-space-at STEP [--no-space-rank R]: writing the checkpoint of STEP fails with ENOSPC (with a rank: that rank's
    first file of it, inside a DeepSpeed save).
--stop-server-at-end PID:PORT: when training ends, before the final MLflow status, kill the server.
--inf-grad-at STEP [--inf-grad-rank R]: rank R's gradients of STEP are infinite, its loss finite.
--snapshot-at STEP PATH: each rank saves its weights and optimizer state before and after STEP to PATH.rank<R>.pt.
--profile-step STEP PATH: rank 0 writes the host synchronisations of optimizer step STEP (1-based) to PATH (JSON).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def _option(name: str, at: int = 1) -> str | None:
    """The ``at``-th value after ``name`` on the command line; None without ``name``."""
    return sys.argv[sys.argv.index(name) + at] if name in sys.argv else None


def main() -> None:
    # Imported here, not at the top: a loader worker that a fork server starts runs this file again as
    # ``__mp_main__`` (multiprocessing re-imports the parent's main script in the child), and Lightning's
    # import alone costs each such worker about 7 s of CPU.
    import torch
    from fault_injection import (
        EngineReport,
        InfGradient,
        KillWhileSaving,
        NoSpaceAt,
        NoSpaceOnRank,
        PoisonBatch,
        SaveOnStart,
        SigkillAt,
        SignalAt,
        Snapshot,
        SpikeLoss,
        StopServerAtEnd,
    )

    from pipeline.recipe import load_recipe
    from pipeline.shutdown import skip_final_collections
    from pipeline.stages.train import train as pretrain
    from pipeline.tracking.step_profile import StepProfile

    overrides = json.loads(sys.argv[1])
    callbacks: list = []
    if (step := _option("--kill-in-checkpoint-at")) is not None:
        callbacks.append(KillWhileSaving(int(step)))
    if (path := _option("--engine-report")) is not None:
        callbacks.append(EngineReport(path))
    if (path := _option("--save-on-start")) is not None:
        callbacks.append(SaveOnStart(path))
    if (step := _option("--signal-at")) is not None:
        callbacks.append(SignalAt(int(step), int(_option("--signal-rank") or 0)))
    if (step := _option("--poison-at")) is not None:
        callbacks.append(PoisonBatch(int(step), int(_option("--poison-rank") or 0)))
    if (step := _option("--spike-at")) is not None:
        callbacks.append(SpikeLoss(int(step), int(_option("--spike-count") or 1)))
    if (step := _option("--sigkill-at")) is not None:
        callbacks.append(SigkillAt(int(step), int(_option("--sigkill-rank") or 0)))
    if (step := _option("--no-space-at")) is not None:
        rank = _option("--no-space-rank")
        callbacks.append(NoSpaceAt(int(step)) if rank is None else NoSpaceOnRank(int(step), int(rank)))
    if (server := _option("--stop-server-at-end")) is not None:
        callbacks.append(StopServerAtEnd(*map(int, server.split(":"))))
    if (step := _option("--inf-grad-at")) is not None:
        callbacks.append(InfGradient(int(step), int(_option("--inf-grad-rank") or 0)))
    snapshot = profile = None
    if (step := _option("--snapshot-at")) is not None:
        snapshot = Snapshot(int(step))
        callbacks.append(snapshot)
    if (step := _option("--profile-step")) is not None:
        profile = StepProfile(first=int(step) - 1)
        callbacks.append(profile)
    recipe = load_recipe(_option("--recipe") or "mae/tiny_fmnist", overrides)
    result = pretrain(recipe, resume="auto", extra_callbacks=callbacks)
    rank = int(os.environ.get("RANK", "0"))
    if snapshot is not None:
        path = _option("--snapshot-at", 2)
        torch.save({"before": snapshot.before, "after": snapshot.after}, f"{path}.rank{rank}.pt")
    if profile is not None and rank == 0:
        report = {"reads": len(profile.scalar_reads()), "syncs": profile.host_syncs()}
        Path(_option("--profile-step", 2)).write_text(json.dumps(report))
    skip_final_collections()
    sys.exit(128 + result.preempted if result.preempted else 0)


if __name__ == "__main__":
    main()
