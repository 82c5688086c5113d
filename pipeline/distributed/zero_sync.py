"""ZeRO optimizer steps in bf16 that read nothing back to the host.

DeepSpeed 0.19's ZeRO-1/2 step reads its gradient norm back to Python six times a step in bf16 with clipping
(measured with ``tracking.step_profile``): its overflow check, a test of the norm before stepping, the fill of
a non-finite group norm (``masked_fill_`` with a device tensor as the value, once per parameter group) and the
clipping's test of the norm (once per group). On a GPU each read stops the host until the device has run the
whole backward pass, so the next step's kernels are not queued while the optimizer runs.

When the training guard skips non-finite steps on the device (``guard.callback``) and the client optimizer skips
by its flag (torch's fused AdamW, ``tasks.optim.skips_by_found_inf``), those checks are redundant:

- the optimizer's ``check_grad_overflow`` (DeepSpeed's ``bf16.check_grad_overflow``, read only by its step)
  turned off drops the overflow check and the norm test;
- the fill of a non-finite norm takes a Python number, which ``masked_fill_`` does not read back;
- clipping computes its coefficient on the device, a non-finite norm counting as infinite, as DeepSpeed's does.

ZeRO-3's step in bf16 already fills and clips on the device; it reads back once, its test of the norm
(``is_invalid_grad_norm``), which the same guard makes redundant: while such an optimizer steps, that test
says "valid" without reading, and a non-finite norm (DeepSpeed combines an invalid group norm into +inf)
zeroes the gradients in its clipping and skips the step through the client's flag.

The guard then reads DeepSpeed's norm of the step (infinite when any gradient is not finite) on the device,
just before the client optimizer steps (``fold_zero_norm``). fp16 keeps DeepSpeed's loss scaler. DeepSpeed is
pinned below 0.20 in pyproject; ``tests/test_zero.py`` profiles a step of each.
"""
from __future__ import annotations

import functools
import threading
from typing import Any

import torch

_stage3_stepping = threading.local()  # .on: a ZeRO-3 optimizer that ``install`` changed is stepping


def fill_non_finite(input: torch.Tensor, device: Any = None, val: float = -1.0) -> None:
    """``input`` with its NaN and infinite entries set to ``val``, in place: DeepSpeed's
    ``mask_nan_or_inf_with_val_inplace`` without reading a device value back (the fill is a Python float)."""
    input.masked_fill_(~torch.isfinite(input), val)


def clip_on_device(optimizer: Any, grad_groups_flat: list, total_norm: torch.Tensor) -> None:
    """The ZeRO optimizer's ``unscale_and_clip_grads``, computed on the device: the flat gradient partitions
    divided by the loss scale times the clipping coefficient max(1, (norm / scale + 1e-6) / clip); a negative
    (invalid) or non-finite norm counts as infinite, which zeroes the gradients of a step the guard skips."""
    scale = optimizer.loss_scale
    if optimizer.clip_grad > 0.0:
        inf = torch.full_like(total_norm, float("inf"))
        norm = torch.where(torch.isfinite(total_norm) & (total_norm >= 0), total_norm, inf)
        scale = torch.clamp((norm / scale + 1e-6) / optimizer.clip_grad, min=1.0) * scale
    elif scale == 1.0:
        return
    for grad in grad_groups_flat:
        for g in grad if isinstance(grad, list) else [grad]:
            g.data.mul_(1.0 / scale)  # times the reciprocal, as DeepSpeed: bitwise its result


def install(optimizer: Any) -> bool:
    """Make the steps of ``optimizer`` (DeepSpeed's ZeRO-1/2 optimizer in bf16, computing its gradient norm on
    the device, or its ZeRO-3 optimizer in bf16 without offload) free of host reads, its own non-finite checks
    off; False (nothing changed) for any other optimizer. The caller vouches that the client optimizer skips a
    step by its ``found_inf``."""
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    if isinstance(optimizer, stage3.DeepSpeedZeroOptimizer_Stage3):
        return _install_stage3(optimizer)
    if (not isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer) or optimizer.dtype != torch.bfloat16
            or optimizer.cpu_offload or not optimizer.compute_grad_norm or getattr(optimizer, "zenflow", False)):
        return False
    optimizer.check_grad_overflow = False  # the guard's check, on the device, takes its place
    # a module global of DeepSpeed's: the helper is called by name from the ZeRO-1/2 optimizer's norm
    stage_1_and_2.mask_nan_or_inf_with_val_inplace = fill_non_finite
    optimizer.unscale_and_clip_grads = functools.partial(clip_on_device, optimizer)  # shadows the method
    optimizer.sync_free_step = True
    return True


def stage3_norm_check(norm: Any) -> bool:
    """DeepSpeed's ``is_invalid_grad_norm`` as ZeRO-3's step calls it: "valid", without reading the norm back,
    while an optimizer ``install`` changed is stepping (the guard judges the norm on the device)."""
    from deepspeed.runtime.utils import is_invalid_grad_norm

    if getattr(_stage3_stepping, "on", False) and torch.is_tensor(norm):
        return False
    return is_invalid_grad_norm(norm)


def _install_stage3(optimizer: Any) -> bool:
    from deepspeed.runtime.zero import stage3

    if (optimizer.dtype != torch.bfloat16 or optimizer.offload_optimizer or getattr(optimizer, "zenflow", False)
            or getattr(optimizer, "use_muon", False) or getattr(optimizer, "torch_autocast_gradscaler", None)):
        return False
    # a module global of DeepSpeed's, called by name from the ZeRO-3 step: other optimizers keep its answer
    stage3.is_invalid_grad_norm = stage3_norm_check
    step = optimizer.step

    @functools.wraps(step)
    def sync_free_step(*args: Any, **kwargs: Any) -> Any:
        _stage3_stepping.on = True
        try:
            return step(*args, **kwargs)
        finally:
            _stage3_stepping.on = False

    optimizer.step = sync_free_step  # shadows the method
    optimizer.sync_free_step = True
    return True


def leaves_skips_to_the_client(optimizer: Any) -> bool:
    """Whether ``optimizer`` is a ZeRO optimizer that ``install`` changed: it steps whatever its norm, and the
    client optimizer must skip a non-finite step itself."""
    return getattr(optimizer, "sync_free_step", False)


def step_norm(optimizer: Any) -> torch.Tensor:
    """The global gradient norm of the step being taken, on the device: set by the ZeRO step before it calls
    the client optimizer, the same on every rank (all-reduced), infinite when any gradient is not finite."""
    return optimizer._global_grad_norm
