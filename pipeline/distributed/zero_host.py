"""ZeRO-1/2's step with less work on the host: the gradient norm in a few operators instead of a few per
parameter, and the weights re-pointed at the flat buffer only when they moved.

With a small per-GPU batch the host's time per step is what the GPU's waits on (``benchmarks/host_overhead.py``).
DeepSpeed 0.19's ZeRO-1/2 optimizer spends some of it on two per-parameter loops in every step:

- its gradient norm (``get_grad_norm_direct``) runs a test for model- and pipeline-parallel copies, a cast, a
  vector norm and a move for each parameter, then stacks the norms: for ViT-L's 396 parameters about a tenth
  of its host step. With data parallelism alone, which is all vitpipe runs, the same norm is one
  ``torch._foreach_norm`` over the partition's gradients, in DeepSpeed's norm dtype;
- after gathering the updated weights into its flat bf16 buffer, it points every parameter's ``.data`` at its
  slice of that buffer again (``_update_model_bit16_weights``, "probably not needed" in DeepSpeed's own
  comment): the gather writes into the slices the parameters already are. ``repoint_moved`` checks where each
  parameter's data lies and re-points only when one moved (an offload and reload moves the buffer);
- at the first gradient of every backward, its hook counts the parameters the backward will reach
  (``count_used_parameters_in_backward``): a view of each parameter, to find its gradient accumulator, and a
  query of the autograd engine, about 15 us a parameter on a 2-core CPU (6 ms for ViT-L).
  ``UsedParameterCount`` keeps the accumulators it found, as DDP's reducer does, and asks the engine about
  those: the same count while they are current, and DeepSpeed's walk again when one is not.
"""
from __future__ import annotations

import functools
from typing import Any

import torch


def partition_norm(optimizer: Any, gradients: list[torch.Tensor], params: list[torch.Tensor],
                   norm_type: float = 2) -> torch.Tensor:
    """``get_grad_norm_direct`` of a ZeRO-1/2 optimizer without model or pipeline parallelism: the L2 norm of
    the gradients of this rank's partition (padding left out) and the other data-parallel ranks', a
    non-finite result set to -1 (DeepSpeed's "invalid" mark, through its module's helper)."""
    from deepspeed import comm as dist
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.utils import get_norm_dtype

    if float(norm_type) != 2.0:
        return type(optimizer).get_grad_norm_direct(optimizer, gradients, params, norm_type)
    grads = [g.detach() for g in gradients if not getattr(g, "_zero_padding", False)]
    dtype = get_norm_dtype()
    if grads:
        norms = torch._foreach_norm(grads, 2, dtype=dtype)  # one per gradient, [len(grads)] once stacked
        total = torch.stack(norms).pow(2).sum().float()
    else:
        total = torch.zeros((), dtype=torch.float32, device=optimizer.device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM, group=optimizer.dp_process_group)
    total = total.pow(0.5)
    stage_1_and_2.mask_nan_or_inf_with_val_inplace(total, device=optimizer.device)  # zero_sync may replace it
    return total


def repoint_moved(optimizer: Any, group_index: int) -> None:
    """``_update_model_bit16_weights``: the group's parameters as views of their slices of the flat buffer,
    done only when a parameter's data does not already start where its slice does."""
    flat = optimizer.bit16_groups_flat[group_index]
    base, size = flat.data_ptr(), flat.element_size()
    params, offsets = optimizer.round_robin_bit16_groups[group_index], optimizer.round_robin_bit16_offsets[group_index]
    if any(p.data_ptr() != base + offset * size for p, offset in zip(params, offsets, strict=True)):
        type(optimizer)._update_model_bit16_weights(optimizer, group_index)


class UsedParameterCount:
    """How many of ``params`` (each requiring a gradient when the hooks were made) the running backward gives a
    gradient to: ``count_used_parameters_in_backward``'s answer. Its walk is done once and again only when the
    answer may have changed; in between, the gradient accumulators found last are asked whether the engine runs
    them. Holding them keeps them current: autograd makes a parameter a new one only when none is alive or its
    data changes dtype or device, and then the held one does not run, which sends the count back to the walk, as
    does a parameter the backward does not reach. A walk that finds a parameter frozen keeps nothing, so the
    next backward walks too. (A parameter frozen between a forward and its backward is still counted: its
    gradient hook fires in that backward all the same.)"""

    def __init__(self, params: list[torch.nn.Parameter]):
        self.params = params
        self.accumulators: list[Any] = []  # an autograd AccumulateGrad node per parameter, from the last walk

    def __call__(self) -> int:
        will_run = torch._C._will_engine_execute_node  # only valid inside a backward, as DeepSpeed's hook is
        if self.accumulators and all(map(will_run, self.accumulators)):
            return len(self.accumulators)
        from torch.autograd.graph import _get_grad_fn_or_grad_acc

        with torch.enable_grad():  # hooks run without grad mode; reaching a leaf's accumulator needs it
            nodes = {_get_grad_fn_or_grad_acc(p) for p in self.params if p.requires_grad}
        # kept only when every parameter has one: then all of them running is a count of all the parameters
        self.accumulators = list(nodes) if len(nodes) == len(self.params) else []
        return sum(map(will_run, nodes))


HOOK_RELEASES = ("0.19.",)  # DeepSpeed releases whose ZeRO-1/2 gradient hook ``gradient_hook`` repeats


def gradient_hook(optimizer: Any, count: UsedParameterCount, param: torch.nn.Parameter, group_index: int,
                  *_: Any) -> None:
    """DeepSpeed's ZeRO-1/2 gradient hook (``create_gradient_handling_hooks``) with ``count`` for its walk: hand
    the parameter's gradient to the optimizer's bucketing and reduction, and run the backward's epilogue once
    every hook expected has fired."""
    refresh = optimizer.should_refresh_expected_hook_count()  # before re-entering, as DeepSpeed asks it
    optimizer.reenter_backward_if_needed()
    optimizer.process_gradients(param, group_index)
    expected = count() if refresh else optimizer._max_expected_hooks_seen
    optimizer.update_hook_state_and_maybe_run_epilogue(expected)


def replace_gradient_hooks(optimizer: Any) -> bool:
    """Swap the optimizer's gradient hooks for ``gradient_hook``s sharing one ``UsedParameterCount``; False
    (nothing changed) under another DeepSpeed release than ``HOOK_RELEASES``, or when the optimizer has no
    hooks, or not one per parameter requiring a gradient."""
    import deepspeed
    from deepspeed.utils.torch import register_grad_hook

    if not deepspeed.__version__.startswith(HOOK_RELEASES):
        return False
    owned = [(p, i) for i, group in enumerate(optimizer.bit16_groups) for p in group if p.requires_grad]
    handles = getattr(optimizer, "_grad_acc_hooks", [])
    if not handles or len(handles) != len(owned) or not hasattr(optimizer, "should_refresh_expected_hook_count"):
        return False
    for handle in handles:
        handle.remove()
    count = UsedParameterCount([p for p, _ in owned])
    optimizer._grad_acc_hooks = [register_grad_hook(p, functools.partial(gradient_hook, optimizer, count, p, i))
                                 for p, i in owned]  # destroy() removes these
    return True


def install(optimizer: Any) -> bool:
    """Give a ZeRO-1/2 optimizer ``partition_norm``, ``repoint_moved`` and, where it has gradient hooks,
    ``gradient_hook``s; False (nothing changed) for another optimizer, or one with model-parallel groups or
    pipeline-replicated parameters, whose norms DeepSpeed counts its own way."""
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero import stage_1_and_2

    if not isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if pg_utils.is_parallel(optimizer.model_parallel_group) or optimizer.has_moe_layers:
        return False
    if any(getattr(p, PIPE_REPLICATED, False) for group in optimizer.params_in_partition for p in group):
        return False
    optimizer.get_grad_norm_direct = functools.partial(partition_norm, optimizer)  # instance attributes shadow
    optimizer._update_model_bit16_weights = functools.partial(repoint_moved, optimizer)  # the class's methods
    replace_gradient_hooks(optimizer)
    return True
