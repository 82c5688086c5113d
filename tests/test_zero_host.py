"""distributed/zero_host: ZeRO-1/2's gradient norm from one fused norm equals DeepSpeed's per-parameter one, the
padding left out and a non-finite gradient marked invalid (-1) alike; the weights are re-pointed at the flat
buffer when, and only when, it moved; the gradient hooks' count of the parameters a backward reaches equals
DeepSpeed's and walks the parameters only when it may have changed. All are installed on the real 2-process
ZeRO-1/2 engines of test_zero, whose losses equal DDP's."""
from __future__ import annotations

import math
from types import SimpleNamespace

import deepspeed.comm
import pytest
import torch
from deepspeed.runtime.utils import count_used_parameters_in_backward
from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

from pipeline.distributed.zero_host import UsedParameterCount, partition_norm, repoint_moved


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


def test_the_used_parameter_count_equals_deepspeeds_and_walks_only_when_it_may_change():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(3)) for _ in range(4)]
    count = UsedParameterCount(params)
    counts = []

    def backward(used: list[int]) -> tuple[int, bool]:
        """A backward through the parameters in ``used``; in it, the two counts and whether ``count`` walked."""
        x = torch.randn(3, requires_grad=True)
        y = x
        for i in used:
            y = y * params[i].float()  # .float(): the same graph whether a parameter is float32 or float64

        def hook(grad):
            held = count.accumulators
            counts.append((count(), count_used_parameters_in_backward(params), count.accumulators is not held))

        x.register_hook(hook)  # runs inside the backward, as DeepSpeed's gradient hooks do
        y.sum().backward()
        ours, theirs, walked = counts[-1]
        assert ours == theirs, (used, ours, theirs)
        return ours, walked

    assert backward([0, 1, 2, 3]) == (4, True)  # the first backward walks
    assert backward([0, 1, 2, 3]) == (4, False)  # the held accumulators are the ones autograd used again
    assert backward([0, 2]) == (2, True)  # a parameter left out: the held ones do not all run
    assert backward([0, 1, 2, 3]) == (4, False)
    params[1].requires_grad_(False)  # frozen
    assert backward([0, 1, 2, 3]) == (3, True)
    assert backward([0, 1, 2, 3]) == (3, True)  # after a walk that found one frozen, every backward walks
    params[1].requires_grad_(True)
    assert backward([0, 1, 2, 3]) == (4, True)
    params[3].data = params[3].data.double()  # a new dtype gives the parameter a new gradient accumulator
    assert backward([0, 1, 2, 3]) == (4, True)
    assert backward([0, 1, 2, 3]) == (4, False)
