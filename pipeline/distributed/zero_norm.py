"""ZeRO-1/2's gradient norm in a few operators instead of a few per parameter.

DeepSpeed 0.19's ZeRO-1/2 optimizer computes the norm of its gradient partition parameter by parameter
(``get_grad_norm_direct``: a test for model- and pipeline-parallel copies, a cast, a vector norm and a move
for each), then stacks the norms. The host runs all of that every step; for ViT-L's ~400 parameters it was
about a tenth of a ZeRO-2 step's host time (``benchmarks/host_overhead.py``), and with a small per-GPU batch
the host's time per step is what the GPU's waits on. With data parallelism alone, which is all vitpipe runs,
the same norm is one ``torch._foreach_norm`` over the partition's gradients, in DeepSpeed's norm dtype.
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


def install(optimizer: Any) -> bool:
    """Give a ZeRO-1/2 optimizer ``partition_norm``; False (nothing changed) for another optimizer, or one with
    model-parallel groups or pipeline-replicated parameters, whose norms DeepSpeed counts its own way."""
    from deepspeed.comm import pg_utils
    from deepspeed.runtime.constants import PIPE_REPLICATED
    from deepspeed.runtime.zero import stage_1_and_2

    if not isinstance(optimizer, stage_1_and_2.DeepSpeedZeroOptimizer) or optimizer.cpu_offload:
        return False
    if pg_utils.is_parallel(optimizer.model_parallel_group) or optimizer.has_moe_layers:
        return False
    if any(getattr(p, PIPE_REPLICATED, False) for group in optimizer.params_in_partition for p in group):
        return False
    optimizer.get_grad_norm_direct = functools.partial(partition_norm, optimizer)  # shadows the method
    return True
