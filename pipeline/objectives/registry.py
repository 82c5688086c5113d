"""The one map from a recipe's ``task:`` to its objective: the built-in ones (``pipeline.objectives.<name>``)
and those other distributions declare under the ``vitpipe.objectives`` entry-point group, each naming an
``Objective`` (or a module holding one as ``OBJECTIVE``).

This is the only module that decides anything by the kind of task; everything else asks it.
"""
from __future__ import annotations

import importlib
import logging
from importlib.metadata import entry_points
from typing import Any

from ..config import ConfigError
from .spec import Objective

log = logging.getLogger(__name__)

BUILT_IN = ("mae", "deit", "finetune", "classify")
DEFAULT_TASK = "mae"  # a recipe without task:
ENTRY_POINT_GROUP = "vitpipe.objectives"

_objectives: dict[str, Objective] = {}
_plugins_loaded = False


def register(objective: Objective) -> Objective:
    """Make ``objective`` known by its name (a test's or a notebook's own objective; plugins come through the
    entry-point group). Registering another objective under a taken name is an error."""
    known = _objectives.get(objective.name)
    if known is not None and known is not objective:
        raise ValueError(f"objective {objective.name!r} is already registered ({known.recipe.__module__})")
    _objectives[objective.name] = objective
    return objective


def unregister(name: str) -> None:
    _objectives.pop(name, None)


def _built_in(name: str) -> Objective:
    if name not in _objectives:
        register(importlib.import_module(f".{name}", __package__).OBJECTIVE)
    return _objectives[name]


def _load_plugins() -> None:
    """Register every objective of the entry-point group, once; a plugin that fails to load is named and
    skipped, so one broken distribution does not take the CLI down."""
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            found: Any = ep.load()
            objective = getattr(found, "OBJECTIVE", found)
            if not isinstance(objective, Objective):
                raise TypeError(f"{ep.value} is {type(objective).__name__}, not an Objective")
            if objective.name != ep.name:
                raise ValueError(f"entry point {ep.name!r} names objective {objective.name!r}")
            if objective.name in BUILT_IN:
                raise ValueError(f"{objective.name!r} is a built-in objective")
            register(objective)
        except Exception as err:  # a plugin's own error: say whose, go on without it
            log.warning("objective plugin %s = %s (%s) not loaded: %s", ep.name, ep.value,
                        getattr(ep.dist, "name", "?"), err)


def names() -> list[str]:
    """Every objective a recipe can name: built-in, registered and from plugins."""
    for name in BUILT_IN:
        _built_in(name)
    _load_plugins()
    return sorted(_objectives)


def objective(name: str, where: str = "task") -> Objective:
    """The objective a recipe's ``task:`` names; an unknown name is an error listing the known ones."""
    if name in BUILT_IN:
        return _built_in(name)
    if name not in _objectives:
        _load_plugins()
    if name not in _objectives:
        raise ConfigError(f"{where}: task {name!r} is not one of {names()} (objectives outside vitpipe register "
                          f"through the {ENTRY_POINT_GROUP!r} entry-point group)", "task")
    return _objectives[name]


def objective_of(recipe: Any) -> Objective:
    """The objective of a loaded recipe (by its type's ``task``)."""
    return objective(recipe.task)


def objective_of_export(meta: dict[str, Any], where: str) -> Objective:
    """The objective that wrote an export folder (``metadata.json``). Exports written before the objective was
    recorded are told apart by their contents: a timm classifier's or a ViT encoder's (any ViT objective reads
    those the same way)."""
    name = meta.get("objective")
    if name is None:
        name = "classify" if "timm" in meta else "mae" if "encoder" in meta else None
    if name is None:
        raise ValueError(f"{where}: metadata.json names no objective and describes no model")
    return objective(name, where)
