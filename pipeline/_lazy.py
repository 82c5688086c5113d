"""Package namespaces that import their modules on first use.

``from pipeline.models import ViTConfig`` must not import torch: a recipe is checked before the training
stack loads, so errors in it appear at once. Each package ``__init__`` lists where its names live and
imports a module only when one of its names is asked for (PEP 562)."""
from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, where: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package``: ``where`` maps each exported name to its submodule."""

    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(where[name], package), name)

    return __getattr__
