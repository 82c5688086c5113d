"""Forward passes beside training that leave ZeRO-3's prefetch trace alone.

ZeRO-3 records the order in which the submodules of one training step run (its trace) and, once two steps
agree, gathers each module's weights ahead of use by that order, keeping gathered the weights it will use again
soon (a small model's stay gathered between steps). A forward pass of its own between two steps (the monitor's
kNN features) runs submodules out of that order, so DeepSpeed drops the trace: the next step runs without
prefetching and begins recording again, and the one after checks the recorded order across ranks with one host
read per module (about 340 for a small ViT), before prefetching resumes.

``outside_the_trace`` gives such a pass a coordinator of its own: a shallow copy of the engine's, with no
trace, so the pass gathers each module's weights when it runs and releases them after, as ZeRO-3 does before
it has a trace. Weights that were gathered before the pass are marked in use for its duration, so they stay
gathered. The engine's coordinator, its trace and fetch queue untouched, takes over again at the next training
step, with the same weights gathered as if the pass had not run. The copy shares the engine's registry of
in-flight gathers: invalidating the copy's trace waits for any gather left in it and releases it, as the
engine's next step would. DeepSpeed 0.19 keeps one coordinator per engine (``param_coordinator``); where it is
not found, the pass runs on the engine's coordinator, as before.
"""
from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


class _InUse:
    """Put in a gathered parameter's ``ds_active_sub_modules`` (the ids of the modules using it) while a pass
    runs: DeepSpeed releases only parameters no module uses. One per pass, so a nested pass unmarks its own."""

    def __repr__(self) -> str:
        return "outside_the_trace"


@contextmanager
def outside_the_trace(strategy: Any) -> Iterator[None]:
    """For a forward pass under ``strategy`` between training steps (under ZeRO-3; a no-op otherwise)."""
    engine = getattr(strategy, "deepspeed_engine", None)
    offload = getattr(getattr(engine, "optimizer", None), "parameter_offload", None)
    coordinator = getattr(offload, "param_coordinator", None)
    if coordinator is None or not hasattr(coordinator, "_invalidate_trace"):
        yield
        return
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    gathered = [p for p in offload.module.parameters() if getattr(p, "ds_status", None) == ZeroParamStatus.AVAILABLE]
    mark = _InUse()
    try:
        for param in gathered:
            param.ds_active_sub_modules.add(mark)
        side = copy.copy(coordinator)
        if not side.is_invalid_trace():
            side._invalidate_trace()  # on the copy: new, empty trace structures; the engine's keep theirs
        offload.param_coordinator = side
        yield
    finally:  # also when the set-up or the pass raised
        offload.param_coordinator = coordinator
        for param in gathered:
            param.ds_active_sub_modules.discard(mark)
