"""AdamW with MAE's parameter groups and a warmup + cosine learning-rate schedule."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .config import OptimConfig

# Parameters that get no weight decay besides norms and biases (found by name).
NO_DECAY_NAMES = ("cls_token", "dist_token", "mask_token", "pos_embed", "encoder_mask_token")


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay applies to weight matrices, not to norms, biases, tokens or position embeddings."""
    return p.ndim > 1 and not any(n in name for n in NO_DECAY_NAMES)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: decayed weights, and norms / biases / tokens / position embeddings without decay."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float,
                       layer_id: Callable[[str], int], num_layers: int) -> list[dict]:
    """Layer-wise lr decay (BEiT / MAE fine-tuning): layer i trains at ``layer_decay ** (num_layers - i)``
    times the peak lr, so the embeddings move least and the head most. One group per (layer, decay)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        lid, wd = layer_id(name), decays(name, p)
        group = groups.setdefault((lid, wd), {"params": [], "weight_decay": weight_decay if wd else 0.0,
                                               "lr_scale": layer_decay ** (num_layers - lid)})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def absolute_lr(cfg: OptimConfig, effective_batch: int) -> float:
    return cfg.base_lr * effective_batch / 256


def warmup_cosine(step: int, warmup: int, total: int, peak: float, floor: float) -> float:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then half-cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def fusable(model: nn.Module) -> bool:
    """torch's fused AdamW takes floating-point parameters on CPU and CUDA (not on meta or other devices)."""
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in model.parameters())


def build_optimizer(model: nn.Module, cfg: OptimConfig, effective_batch: int, total_steps: int,
                    warmup_steps: int, groups: list[dict] | None = None,
                    ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``groups`` (default: ``param_groups``); a group's ``lr_scale`` scales its lr throughout."""
    peak = absolute_lr(cfg, effective_batch)
    groups = groups if groups is not None else param_groups(model, cfg.weight_decay)
    for g in groups:
        g["lr"] = peak * g.get("lr_scale", 1.0)  # LambdaLR multiplies each group's initial lr
    # Fused: one kernel for all parameters, and the step count kept on the device, where the default CPU path
    # reads it back per parameter (a host sync each). DeepSpeed's ZeRO takes it as its client optimizer.
    opt = torch.optim.AdamW(groups, lr=peak, betas=cfg.betas, fused=fusable(model))
    if opt.defaults["fused"]:
        opt.register_load_state_dict_pre_hook(_resume_fused)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: warmup_cosine(step, warmup_steps, total_steps, peak, cfg.min_lr) / peak)
    return opt, sched


def skips_by_found_inf(optimizer: Any) -> bool:
    """Whether ``optimizer`` skips its step on the device when its ``found_inf`` flag is set (the mechanism of
    torch's GradScaler): torch's fused Adam, AdamW or SGD, fused in every parameter group."""
    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW, torch.optim.SGD)) and \
        all(group.get("fused") for group in optimizer.param_groups)


def _resume_fused(optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """A checkpoint of an unfused AdamW (written before the optimizer was fused) resumes fused: its groups take
    this optimizer's flags, so torch loads the step counts onto the parameters' device as the fused kernel wants
    them, and the training guard can still skip a step on the device."""
    groups = [{**saved, "fused": True, "foreach": None} for saved in state["param_groups"]]
    return {**state, "param_groups": groups}
