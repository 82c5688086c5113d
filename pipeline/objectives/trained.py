"""An objective's trained network, rebuilt from a committed checkpoint, and its export folder: what
``vitpipe export`` and ``register`` do for any objective, and the built-in objectives' end-of-run steps."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from ..checkpoint.store import CONFIG, MARKER, STATE
from ..config import digest
from .spec import Objective

if TYPE_CHECKING:
    from torch import nn

    from ..recipe import RunRecipe


def trained_model(objective: Objective, recipe: RunRecipe, step: Path) -> nn.Module:
    """The objective's network with the weights of checkpoint ``step`` (read from its saved state, which under
    ZeRO-3 is the only place every weight is whole)."""
    from ..checkpoint.state import read_module_state, submodule_state

    model = objective.build_model(recipe)
    model.load_state_dict(submodule_state(read_module_state(step / STATE)))
    return model


def export_meta(recipe: RunRecipe, step: Path, **extra: Any) -> dict[str, Any]:
    """The metadata every export of a checkpoint records: normalisation, recipe name and hash (of the recipe
    as the checkpoint saved it, which the run's lineage tag also names), step and source."""
    saved = yaml.safe_load((step / CONFIG).read_text())
    return {"normalisation": recipe.normalisation(), "recipe_name": recipe.name, "recipe_hash": digest(saved),
            "step": json.loads((step / MARKER).read_text())["step"], "source_checkpoint": str(step.resolve()),
            **extra}


def export_trained(objective: Objective, recipe: RunRecipe, step: Path, out: str | Path,
                   model: nn.Module | None = None, **extra: Any) -> Path:
    """Write checkpoint ``step`` (or ``model``, its network already loaded) as an export folder ``out``."""
    if model is None:
        model = trained_model(objective, recipe, step)
    return Path(objective.write_export(Path(out), model, recipe, export_meta(recipe, step, **extra)))


def exports_dir(step: Path) -> Path:
    """Where a checkpoint's export goes when it is registered: beside the checkpoints, by step."""
    return step.parent / "exports" / step.name
