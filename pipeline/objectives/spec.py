"""What vitpipe knows of a training objective, declared once, in the objective's own module.

An objective is a recipe type plus hooks: how to build its Lightning task from the recipe and the run's plan,
how to rebuild its trained network and write it as an export folder, what happens after training (held-out
top-1, registration) and how ``vitpipe evaluate`` turns one of its exports into frozen features. The stages
(train, export, register, evaluate) call these hooks and nothing else that depends on the objective.

A declaration imports no torch: recipes are checked, listed and rendered into job files before the training
stack loads, so the hooks import what they use when they run.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    import lightning as L
    import torch
    from torch import nn

    from ..evaluation.config import EvalConfig
    from ..recipe import RunRecipe
    from ..registry.models import ModelRef
    from ..stages.run_record import TrainResult
    from ..stages.train import RunPlan


@dataclass
class Training:
    """What an objective trains, built from its recipe and the run's plan.

    ``task`` keeps the trained network as ``task.model``: checkpoints hold its weights under ``model.``, and
    exports rebuild it with the objective's ``build_model``."""

    task: L.LightningModule
    callbacks: Sequence[L.Callback] = ()
    tags: Mapping[str, str] = field(default_factory=dict)
    """Tags of the run's MLflow run (lineage: the model it starts from, its teacher)."""
    params: Mapping[str, str] = field(default_factory=dict)
    """Params of the run beyond the recipe's own (what the stage decided, e.g. a position resample)."""
    flops_per_image: int | None = None
    """Model FLOPs of one training step per image (``pipeline.models.flops``), for MFU; None: not counted."""


@dataclass
class Embedding:
    """Frozen features of an exported model, as ``vitpipe evaluate`` uses them."""

    embed: Callable[[torch.Tensor], torch.Tensor]
    """Normalised images [b, C, H, W] -> features [b, D]."""
    image_size: tuple[int, int]
    normalisation: Mapping[str, Any]
    """{"mean": [...], "std": [...]} the model was trained with."""
    notes: Sequence[str] = ()
    """Lines to show (e.g. the position table resampled to another resolution)."""
    params: Mapping[str, str] = field(default_factory=dict)
    """Params of the evaluation run beyond the evaluation config."""


@dataclass(frozen=True)
class Objective:
    """One training objective. ``name`` is the recipe's ``task:``."""

    name: str
    recipe: type[RunRecipe]
    summary: str
    """One line for ``vitpipe recipes`` and error messages."""
    build: Callable[[RunRecipe, RunPlan], Training]
    build_model: Callable[[RunRecipe], nn.Module]
    """The untrained network ``task.model`` is (architecture from the recipe): a checkpoint's weights load into it."""
    write_export: Callable[[Any, nn.Module, RunRecipe, dict[str, Any]], Any]
    """``(out, model, recipe, meta)`` -> the export folder; ``meta`` (normalisation, recipe name and hash, step,
    source) goes into its ``metadata.json`` with the objective's name."""
    after_training: Callable[[Objective, RunRecipe, TrainResult], None] | None = None
    """Runs on global rank 0 after the last checkpoint of a run that reached its end; adds lines to
    ``result.summary``."""
    features: Callable[[ModelRef, EvalConfig], Embedding] | None = None
    """Frozen features of one of this objective's exports; None: ``vitpipe evaluate`` refuses its models."""
    verb: Literal["pretrain", "finetune"] = "pretrain"
    """The CLI verb that trains it (finetune: it starts from a model given with ``--model``)."""
    stage: str = ""
    """The word a run's closing lines start with (empty: the name)."""

    def __post_init__(self) -> None:
        declared = getattr(self.recipe, "__dataclass_fields__", {}).get("task")
        if declared is None or declared.default != self.name:
            raise ValueError(f"objective {self.name!r}: its recipe type {self.recipe.__name__} must declare "
                             f"task: Literal[{self.name!r}] = {self.name!r}")
        if not self.stage:
            object.__setattr__(self, "stage", self.name)
