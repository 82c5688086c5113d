"""A recipe: everything one run needs, as typed sections. Loaded from YAML plus dotted overrides."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .checkpoint.store import CheckpointConfig
from .config import ConfigError, apply_overrides, build, digest, read_mapping, to_dict
from .data.config import StorageConfig, StreamConfig
from .distributed.strategy import ZeroConfig
from .models.config import MAEConfig
from .resources import find_recipe
from .tasks.config import DeiTConfig, FinetuneConfig, FinetuneOptimConfig, OptimConfig, TimmClassifierConfig
from .tracking import TrackingConfig


@dataclass
class TrainerConfig:
    """Batch, length, hardware and strategy of a run."""

    global_batch: int = 4096
    """Samples per optimizer step over all devices; per-device batch and accumulation are derived."""
    micro_batch: int | None = None
    """Largest per-device batch that fits in memory; None means global_batch / world_size."""
    max_epochs: int | None = 800
    max_steps: int | None = None
    """Stops after this many optimizer steps; overrides max_epochs for the length of the schedule."""
    accelerator: Literal["auto", "cpu", "gpu"] = "auto"
    devices: int = 1
    num_nodes: int = 1
    strategy: Literal["auto", "ddp", "deepspeed"] = "auto"
    precision: Literal["32-true", "bf16-mixed", "16-mixed", "bf16-true"] = "32-true"
    activation_checkpointing: bool = False
    """Recompute each transformer block's activations in the backward: less memory, one more forward."""
    log_every_n_steps: int = 10
    sample_trace: str | None = None
    """Write one JSON line per batch (step, loss, sample keys) to this file."""

    def __post_init__(self) -> None:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("set trainer.max_epochs or trainer.max_steps")


@dataclass
class RegisterConfig:
    """Register the exported model in the MLflow model registry when the run ends (``name`` unset: don't)."""

    name: str | None = None
    alias: str = "candidate"
    """Alias set on the new version (MLflow reserves ``latest``: ``models:/<name>/latest`` is the newest)."""

    def __post_init__(self) -> None:
        if self.alias.lower() == "latest" or not self.alias:
            raise ValueError(f"alias {self.alias!r} is reserved by MLflow; models:/<name>/latest already "
                             "names the newest version")


@dataclass
class RunRecipe:
    """Sections every training recipe has; the task-specific ones are added by the subclasses below."""

    name: str
    task: str = ""
    seed: int = 0
    data: StreamConfig = field(default_factory=StreamConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    register: RegisterConfig = field(default_factory=RegisterConfig)

    def input_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def __post_init__(self) -> None:
        # One truth for the input size: the model's. The transform follows it.
        if tuple(self.data.transform.image_size) != tuple(self.input_size()):
            raise ValueError(f"data.transform.image_size {list(self.data.transform.image_size)} differs from "
                             f"the model's image_size {list(self.input_size())}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def digest(self) -> str:
        return digest(self.to_dict())


@dataclass
class Recipe(RunRecipe):
    """MAE pretraining."""

    task: Literal["mae"] = "mae"
    labelled = False  # class attribute, not a recipe key: MAE ignores labels: samples without one train too
    model: MAEConfig = field(default_factory=MAEConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)

    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.encoder.image_size)


@dataclass
class FinetuneRecipe(RunRecipe):
    """Supervised fine-tuning of a registered encoder with a classification head."""

    task: Literal["finetune"] = "finetune"
    labelled = True  # class attribute, not a recipe key: samples without a usable label are skipped and counted
    model: FinetuneConfig = field(default_factory=FinetuneConfig)
    optim: FinetuneOptimConfig = field(default_factory=FinetuneOptimConfig)

    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.image_size)


@dataclass
class DeiTRecipe(RunRecipe):
    """DeiT-style supervised pretraining, with or without a teacher. DeiT's lr is 5e-4 x batch / 512, i.e.
    base_lr 2.5e-4 under the batch / 256 rule."""

    task: Literal["deit"] = "deit"
    labelled = True  # class attribute, not a recipe key: samples without a usable label are skipped and counted
    model: DeiTConfig = field(default_factory=DeiTConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=2.5e-4, betas=(0.9, 0.999),
                                                                   warmup_epochs=5.0, min_lr=1e-5))

    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.encoder.image_size)


@dataclass
class ClassifyRecipe(RunRecipe):
    """A timm classifier trained from scratch on labelled shards, e.g. the CNN teacher of a DeiT student."""

    task: Literal["classify"] = "classify"
    labelled = True  # class attribute, not a recipe key: samples without a usable label are skipped and counted
    model: TimmClassifierConfig = field(default_factory=TimmClassifierConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(base_lr=5e-4, betas=(0.9, 0.999),
                                                                   warmup_epochs=5.0, min_lr=1e-5))

    def input_size(self) -> tuple[int, int]:
        return tuple(self.model.image_size)


RECIPE_TYPES: dict[str, type[RunRecipe]] = {"mae": Recipe, "finetune": FinetuneRecipe, "deit": DeiTRecipe,
                                            "classify": ClassifyRecipe}


def parse_overrides(args: list[str]) -> dict[str, str]:
    """``["--trainer.max_steps", "10", "--data.train=x"]`` -> {"trainer.max_steps": "10", "data.train": "x"}."""
    out, i = {}, 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) < 3:
            raise ConfigError(f"override {arg!r}: expected --section.key VALUE")
        key = arg[2:]
        if "=" in key:
            key, value = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override --{key} has no value")
            value, i = args[i + 1], i + 2
        out[key] = value
    return out


def load_recipe(name_or_path: str, overrides: Mapping[str, Any] | None = None) -> RunRecipe:
    """Read a recipe file (or a built-in recipe name such as ``mae/tiny_fmnist``) and apply overrides."""
    path = find_recipe(name_or_path)
    raw = read_mapping(path, "a recipe is a mapping of sections")
    overrides = dict(overrides or {})
    apply_overrides(raw, overrides)
    task = raw.get("task", "mae")
    if task not in RECIPE_TYPES:
        raise ConfigError(f"{blame(path, 'task', overrides)}: task {task!r} is not one of {sorted(RECIPE_TYPES)}",
                          "task")
    # The transform size follows the model unless the recipe sets it.
    model = raw.get("model") or {}
    sized = model.get("encoder") or {} if task in ("mae", "deit") else model
    if "image_size" in sized:
        size = sized["image_size"]
        size = sized["image_size"] = [size, size] if isinstance(size, int) else size
        if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
            # (a malformed size is left for the model's section to report, under its own key)
            transform = raw.setdefault("data", {}).setdefault("transform", {})
            transform.setdefault("image_size", size)
    try:
        return build(RECIPE_TYPES[task], raw)
    except ConfigError as err:
        raise ConfigError(f"{blame(path, err.key, overrides)}: {err}", err.key) from None


def blame(path: Path, key: str | None, overrides: Mapping[str, Any]) -> str:
    """Where a bad value came from: the override that set ``key`` (or a key under it, or the section it is
    in), else the recipe file, which is also named when overrides only touched part of a failing section."""
    if key:
        hits = [k for k in overrides if k == key or k.startswith(key + ".") or key.startswith(k + ".")]
        if len(hits) == 1 and (hits[0] == key or key.startswith(hits[0] + ".")):
            return f"override --{hits[0]} {overrides[hits[0]]}"
        if hits:
            return f"{path} with " + ", ".join(f"--{k} {overrides[k]}" for k in hits)
    return str(path)


def save_recipe(recipe: RunRecipe, path: str | Path) -> None:
    Path(path).write_text(recipe.to_yaml())
