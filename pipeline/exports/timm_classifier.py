"""Export of a timm classifier (e.g. a CNN teacher the pipeline trained): ``model.safetensors`` plus the
metadata that rebuilds it offline (architecture, classes, channels, input size, normalisation)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import timm
import torch
from safetensors.torch import load_file

from .files import read_metadata, save_weights, write_metadata

WEIGHTS = "model.safetensors"


def write_timm_export(out: str | Path, arch: str, model: torch.nn.Module, num_classes: int, in_chans: int,
                      image_size: tuple[int, int], normalisation: dict[str, Any],
                      extra: dict[str, Any] | None = None) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_weights(model, out / WEIGHTS)
    meta = {"timm": {"arch": arch, "num_classes": num_classes, "in_chans": in_chans, "image_size": list(image_size)},
            "normalisation": normalisation, **(extra or {})}
    return write_metadata(out, "classify", meta)


def build_timm(arch: str, num_classes: int, in_chans: int) -> torch.nn.Module:
    """A timm architecture with fresh weights: never downloads (pretrained=False)."""
    try:
        return timm.create_model(arch, pretrained=False, num_classes=num_classes, in_chans=in_chans)
    except RuntimeError as err:  # timm's "Unknown model"
        raise ValueError(f"timm has no architecture {arch!r}: {err}") from None


def load_timm_classifier(folder: str | Path) -> torch.nn.Module:
    info = read_metadata(folder).get("timm")
    if info is None:
        raise ValueError(f"{folder}: not a timm classifier export (no 'timm' metadata)")
    model = build_timm(info["arch"], info["num_classes"], info["in_chans"])
    model.load_state_dict(load_file(str(Path(folder) / WEIGHTS)))
    return model
