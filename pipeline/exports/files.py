"""What every export folder has: safetensors weight files and ``metadata.json``, which names the format, the
objective that wrote it (its ``features`` hook reads the folder back for evaluation) and the input
normalisation, plus whatever the objective records to rebuild its network."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

FORMAT = "vitpipe.export/1"
METADATA = "metadata.json"


def tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's tensors as safetensors takes them: contiguous clones on the host (it refuses shared or
    strided storage)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()
            if isinstance(v, torch.Tensor)}


def save_weights(module: torch.nn.Module, path: str | Path) -> Path:
    save_file(tensors(module), str(path))
    return Path(path)


def write_metadata(out: str | Path, objective: str, meta: dict[str, Any]) -> Path:
    """``out/metadata.json`` = format, objective, then ``meta`` (which should hold ``normalisation``)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    full = {"format": FORMAT, "objective": objective, **meta}
    full.setdefault("normalisation", {"mean": None, "std": None})
    (out / METADATA).write_text(json.dumps(full, indent=1))
    return out


def read_metadata(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / METADATA
    meta = json.loads(path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r} is not {FORMAT!r}")
    return meta
