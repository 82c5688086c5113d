"""Read someone else's weights file into a flat state dict, and check it against a model before loading.

Kept apart from the format mapping in ``convert`` so the checks (every key present, nothing extra, every
shape right, all errors naming the file) are written once for any importer.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import Tensor

CONTAINERS = ("model", "state_dict", "module")  # wrappers around a state dict in training checkpoints


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A local ``.pth/.pt/.bin`` (torch.load, weights only) or ``.safetensors`` file -> {name: tensor},
    with ``model`` / ``state_dict`` / ``module`` containers and ``module.`` (DDP) prefixes removed.
    Non-tensor entries (epoch counters and the like) are dropped."""
    path = Path(path)
    if path.suffix == ".safetensors":
        obj: Any = load_file(str(path))
    elif path.suffix in (".pth", ".pt", ".bin"):
        obj = torch.load(path, map_location="cpu", weights_only=True)  # no arbitrary unpickling
    else:
        raise ValueError(f"{path}: expected a .pth, .pt, .bin or .safetensors file")
    while isinstance(obj, dict) and (inner := [obj[k] for k in CONTAINERS if isinstance(obj.get(k), dict)]):
        obj = inner[0]
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    return {re.sub(r"^(module\.)+", "", k): v for k, v in obj.items() if isinstance(v, Tensor)}


def shapes(module: torch.nn.Module) -> dict[str, torch.Size]:
    """The tensors ``module.load_state_dict`` wants, by name (extra state, not a tensor, left out)."""
    return {k: v.shape for k, v in module.state_dict().items() if not k.endswith("_extra_state")}


def check_keys(path: str | Path, got: dict[str, Tensor], want: dict[str, torch.Size]) -> None:
    """Exactly the wanted keys, each with its shape; else ValueError naming the file and the keys."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or unexpected:
        raise ValueError(f"{path}: missing keys {missing}, unexpected keys {unexpected}")
    for k, shape in want.items():
        if got[k].shape != shape:
            raise ValueError(f"{path}: {k} has shape {list(got[k].shape)}, the model needs {list(shape)}")


__all__ = ["check_keys", "read_state_dict", "shapes"]
