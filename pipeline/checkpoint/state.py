"""Read the trained module's weights back from a checkpoint's ``state.ckpt``, whatever strategy wrote it.

- a file: Lightning's checkpoint (single process, DDP); its ``state_dict`` is the module's.
- a folder: DeepSpeed's (ZeRO 1-3), one optimizer shard per data-parallel rank. The fp32 master weights are
  consolidated from the shards; the shards are memory-mapped and their Adam moments dropped as each is read,
  so the whole optimizer state is never held in one process. Non-tensor module state (position-embedding
  metadata) is not in the shards: it comes from the rank-0 model-state file.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)
DEEPSPEED_TAG = "checkpoint"  # the tag (sub-folder) Lightning's DeepSpeed strategy saves under
# Rank 0's module and client state: ZeRO 1/2 write one file for all ranks, ZeRO-3 one per rank.
MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")


def is_sharded(state: Path) -> bool:
    return Path(state).is_dir()


def model_states_file(state: str | Path) -> Path:
    """Rank 0's model-state file in a DeepSpeed ``state.ckpt`` folder."""
    shards = Path(state) / DEEPSPEED_TAG
    for name in MODEL_STATES:
        if (shards / name).is_file():
            return shards / name
    raise FileNotFoundError(f"{shards}: not a DeepSpeed checkpoint (none of {', '.join(MODEL_STATES)})")


def read_module_state(state: str | Path) -> dict[str, Any]:
    """The LightningModule's state dict (keys as in ``module.state_dict()``), on the CPU, in fp32."""
    state = Path(state)
    if not state.exists():
        raise FileNotFoundError(f"{state}: no checkpoint state")
    if not is_sharded(state):
        return torch.load(state, map_location="cpu", weights_only=False)["state_dict"]
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    states = model_states_file(state)
    lazy = get_fp32_state_dict_from_zero_checkpoint(str(state), tag=DEEPSPEED_TAG, lazy_mode=True)
    out: dict[str, Any] = {k: v.contiguous() for k, v in lazy.items()}
    module = torch.load(states, map_location="cpu", mmap=True, weights_only=False)["module"]
    out.update({k: v for k, v in module.items() if not isinstance(v, torch.Tensor)})
    return out


def submodule_state(state: dict[str, Any], prefix: str = "model.") -> dict[str, Any]:
    """Entries of a task's state dict that belong to its ``model`` attribute, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def read_callback_state(state: str | Path, key: str) -> dict[str, Any] | None:
    """A callback's saved state (Lightning's ``checkpoint["callbacks"][key]``) from a checkpoint file or, under
    DeepSpeed, rank 0's model-state file (which holds Lightning's client state); None if it has none."""
    state = Path(state)
    path = model_states_file(state) if is_sharded(state) else state
    return torch.load(path, map_location="cpu", weights_only=False).get("callbacks", {}).get(key)
