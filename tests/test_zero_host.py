"""distributed/zero_host: ZeRO-1/2's gradient norm from one fused norm equals DeepSpeed's per-parameter one, the
padding left out and a non-finite gradient marked invalid (-1) alike; the weights are re-pointed at the flat
buffer when, and only when, it moved. Both are installed on the real 2-process ZeRO-1/2 engines of test_zero,
whose losses equal DDP's."""
from __future__ import annotations

import math
from types import SimpleNamespace

import deepspeed.comm
import pytest
import torch
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from pipeline.distributed.zero_host import partition_norm, repoint_moved


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


def test_weights_are_re_pointed_only_when_the_flat_buffer_moved():
    """DeepSpeed's own re-pointing runs (through the class's method) exactly when a parameter's data is no longer
    its slice of the flat buffer; either way every parameter ends as a view of its slice."""
    shapes = [(4, 3), (5,), (2, 2, 2)]
    flat = torch.arange(sum(math.prod(s) for s in shapes), dtype=torch.bfloat16)
    offsets = [0, 12, 17]
    params = [torch.nn.Parameter(flat.narrow(0, o, math.prod(s)).view(s)) for o, s in zip(offsets, shapes)]
    opt = DeepSpeedZeroOptimizer.__new__(DeepSpeedZeroOptimizer)  # the state the two methods read, no engine
    opt.bit16_groups_flat, opt.bit16_groups = [flat], [params]
    opt.round_robin_bit16_groups, opt.round_robin_bit16_offsets = [params], [offsets]
    opt.round_robin_bit16_meta = [[torch.empty(s, device="meta") for s in shapes]]
    opt.round_robin_bit16_indices = [[0, 1, 2]]
    calls = []
    original = DeepSpeedZeroOptimizer._update_model_bit16_weights

    def counted(self, group_index):
        calls.append(group_index)
        original(self, group_index)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(DeepSpeedZeroOptimizer, "_update_model_bit16_weights", counted)
        repoint_moved(opt, 0)
        assert calls == []  # the gathered weights are already the slices
        opt.bit16_groups_flat = [flat.clone() + 1]  # a reload puts the buffer elsewhere
        repoint_moved(opt, 0)
        assert calls == [0]
    moved = opt.bit16_groups_flat[0]
    for p, o, s in zip(params, offsets, shapes):
        assert p.data_ptr() == moved.data_ptr() + o * moved.element_size() and p.shape == s
        assert torch.equal(p.data, moved.narrow(0, o, math.prod(s)).view(s))
