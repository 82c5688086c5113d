"""Resume a ZeRO checkpoint on a different number of data-parallel ranks.

DeepSpeed's own checkpoints hold one optimizer shard per rank and refuse another world size. Its
*universal* format holds each parameter whole (fp32 weights, Adam ``exp_avg`` / ``exp_avg_sq``, step) and
is repartitioned on load, for ZeRO 1, 2 and 3. ``ensure_universal`` converts a checkpoint's
``state.ckpt/checkpoint`` shards into ``state.ckpt/universal`` once (written aside, then renamed, so a crash
leaves nothing half-made behind), and marks it with ``latest_universal`` as DeepSpeed's loader expects.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from ..checkpoint.state import DEEPSPEED_TAG, model_states_file

log = logging.getLogger(__name__)
UNIVERSAL_TAG = "universal"
LATEST_UNIVERSAL = "latest_universal"  # DeepSpeed reads the tag to load from this file


def saved_world_size(state: str | Path) -> int:
    """Data-parallel ranks that wrote a DeepSpeed ``state.ckpt`` folder."""
    states = torch.load(model_states_file(state), map_location="cpu", mmap=True, weights_only=False)
    return int(states["dp_world_size"])


def ensure_universal(state: str | Path) -> Path:
    """The universal form of a DeepSpeed ``state.ckpt`` folder, converting it the first time."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    state = Path(state)
    out = state / UNIVERSAL_TAG
    if (state / LATEST_UNIVERSAL).is_file() and out.is_dir():
        return out
    shards = state / DEEPSPEED_TAG
    with tempfile.TemporaryDirectory(dir=state, prefix=".universal-") as tmp:
        source, target = Path(tmp) / "source", Path(tmp) / UNIVERSAL_TAG
        source.mkdir()
        for f in shards.glob("*_optim_states.pt"):
            (source / f.name).symlink_to(f.resolve())
        for f in shards.glob("*_model_states.pt"):
            # The converter takes every module entry for a tensor; position-embedding metadata is not one.
            states = torch.load(f, map_location="cpu", weights_only=False)
            states["module"] = {k: v for k, v in states["module"].items() if isinstance(v, torch.Tensor)}
            torch.save(states, source / f.name)
        args = argparse.Namespace(input_folder=str(source), output_folder=str(target), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()):  # the converter prints progress for every tensor
            ds_to_universal(args)
        # The loader takes the module (and Lightning's own state) from these: put back the complete files.
        for f in target.glob("*_model_states.pt"):
            if (shards / f.name).is_file():
                shutil.copyfile(shards / f.name, f)
        shutil.rmtree(out, ignore_errors=True)
        target.rename(out)
    (state / LATEST_UNIVERSAL).write_text(UNIVERSAL_TAG)
    log.warning("converted %s (saved by %d ranks) to DeepSpeed's universal format in %s", state,
                saved_world_size(state), out)
    return out


def repair_stage3_universal_load(zero_optimizer, universal: Path) -> None:
    """Undo two slips of DeepSpeed 0.19's ZeRO-3 universal loader, which (1) hands every parameter group the
    *same* Adam step tensor, so torch's AdamW advances it once per group per step, and (2) gives every group
    group 0's hyper-parameters, so groups without weight decay (norms, biases, position tokens) get it."""
    saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu", weights_only=False)
    groups, saved_groups = zero_optimizer.optimizer.param_groups, saved["optimizer_state_dict"]["param_groups"]
    if len(groups) != len(saved_groups):
        raise ValueError(f"{universal}: {len(saved_groups)} optimizer parameter groups saved, {len(groups)} now")
    for group, saved_group in zip(groups, saved_groups):
        group.update({k: v for k, v in saved_group.items() if k != "params"})
    for state in zero_optimizer.optimizer.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()
