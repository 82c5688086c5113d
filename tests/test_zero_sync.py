"""distributed/zero_sync: the device-side replacements compute, bitwise, what DeepSpeed's own ZeRO-1/2 helpers
compute; ZeRO-3's norm test keeps DeepSpeed's answer outside a changed optimizer's step."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from deepspeed.runtime.utils import is_invalid_grad_norm, mask_nan_or_inf_with_val_inplace
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from pipeline.distributed import zero_sync
from pipeline.distributed.zero_sync import clip_on_device, fill_non_finite


@pytest.mark.parametrize("value", [3.5, 0.0, float("inf"), float("-inf"), float("nan")])
def test_the_fill_of_a_non_finite_norm_equals_deepspeeds(value):
    ours, theirs = torch.tensor(value), torch.tensor(value)
    fill_non_finite(ours, device="cpu")
    mask_nan_or_inf_with_val_inplace(theirs, device="cpu")
    assert torch.equal(ours, theirs), (value, ours, theirs)


@pytest.mark.parametrize("clip", [0.0, 1.0])
@pytest.mark.parametrize("norm", [0.5, 3.0, -1.0, float("inf"), float("nan")])
def test_clipping_on_the_device_equals_deepspeeds(clip, norm):
    """Flat partitions and lists of sub-partitions alike; an invalid norm (-1, inf, NaN) zeroes the gradients
    with clipping on, as DeepSpeed's does."""
    torch.manual_seed(0)
    flat = [torch.randn(1000), [torch.randn(300), torch.randn(200)]]  # enough values to tell x / s from x * (1 / s)
    ours = [flat[0].clone(), [t.clone() for t in flat[1]]]
    theirs = [flat[0].clone(), [t.clone() for t in flat[1]]]
    opt = SimpleNamespace(clip_grad=clip, loss_scale=1.0, device="cpu")
    clip_on_device(opt, ours, torch.tensor(norm))
    DeepSpeedZeroOptimizer.unscale_and_clip_grads(opt, theirs, torch.tensor(norm))
    for a, b in zip([ours[0], *ours[1]], [theirs[0], *theirs[1]], strict=True):
        assert torch.equal(a, b) or (a.isnan().all() and b.isnan().all()), (a, b)  # bitwise
    if clip and norm == 3.0:  # the coefficient is real: 1 / (3 + 1e-6)
        torch.testing.assert_close(ours[0], flat[0] / (3.0 + 1e-6))


@pytest.mark.parametrize("norm", [2.0, -1.0, float("inf"), float("nan")])
def test_zero3_norm_test_reads_only_outside_a_changed_step(norm):
    """Any other ZeRO-3 optimizer in the process (fp16, offload) still gets DeepSpeed's verdict; inside the step of
    one ``install`` changed, a tensor norm is never read (the guard's flag skips an invalid one)."""
    assert zero_sync.stage3_norm_check(torch.tensor(norm)) == is_invalid_grad_norm(torch.tensor(norm))
    assert zero_sync.stage3_norm_check(norm) == is_invalid_grad_norm(norm)
    zero_sync._stage3_stepping.on = True
    try:
        assert zero_sync.stage3_norm_check(torch.tensor(norm)) is False
    finally:
        zero_sync._stage3_stepping.on = False
