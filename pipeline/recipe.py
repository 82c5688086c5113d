"""A recipe: everything one run needs, as typed sections. Loaded from YAML plus dotted overrides."""
from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_type_hints

import yaml

from .checkpoint.store import CheckpointConfig
from .config import ConfigError, apply_overrides, build, digest, read_mapping, to_dict
from .data.config import StorageConfig, StreamConfig
from .distributed.strategy import ZeroConfig
from .evaluation.config import MonitorConfig
from .guard.config import GuardConfig
from .objectives.registry import DEFAULT_TASK, objective
from .resources import find_recipe
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
    activation_checkpointing: bool | int = False
    """Recompute transformer blocks' activations in the backward: true (or 1) every block, least memory for one
    more forward; k > 1 blocks 0, k, 2k, ... only (selective: less recomputation, more memory); false none."""
    compile: bool = False
    """Compile each transformer block (regional ``torch.compile``; the rest of the model stays eager). Not under
    ZeRO-3, where it is refused with a warning and training runs eager."""
    log_every_n_steps: int = 10
    """Also the window of optimizer steps that images/s and MFU are measured over."""
    peak_tflops: float | None = None
    """The device's dense peak TFLOP/s for MFU at this precision; None: from the GPU's name (A100, H100 SXM or
    PCIe, H200, B200), and no MFU where unknown (the CPU)."""
    sample_trace: str | None = None
    """Write one JSON line per batch (step, loss, sample keys) to this file."""
    guard: GuardConfig = field(default_factory=GuardConfig)
    """Skip non-finite steps; roll back to the newest sound checkpoint on a loss spike (README: the guard)."""

    def __post_init__(self) -> None:
        if self.max_epochs is None and self.max_steps is None:
            raise ValueError("set trainer.max_epochs or trainer.max_steps")
        if self.activation_checkpointing < 0:
            raise ValueError(f"trainer.activation_checkpointing {self.activation_checkpointing} must be true, "
                             "false or a block interval k >= 1")


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
    """Sections every training recipe has; each objective's recipe type (``pipeline.objectives``) adds its
    ``task``, ``model`` and ``optim``."""

    image_size_key: ClassVar[str] = "model.image_size"
    """Where the recipe keeps the input size (the transform follows it); not a recipe key."""
    labelled: ClassVar[bool] = False
    """The task learns from labels: samples without a usable one are skipped and counted as bad; an unlabelled
    task (MAE) takes every decodable sample. Not a recipe key."""

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
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def input_size(self) -> tuple[int, int]:
        value: Any = self
        for part in self.image_size_key.split("."):
            value = getattr(value, part)
        return tuple(value)

    def label_classes(self) -> int | None:
        """Classes a labelled task's labels must fall in (``model.num_classes``); None for an unlabelled task."""
        return self.model.num_classes if self.labelled else None

    def normalisation(self) -> dict[str, list[float]]:
        """The input statistics the model is trained with, as exports record them."""
        t = self.data.transform
        return {"mean": list(t.mean), "std": list(t.std)}

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


# The built-in recipe types, declared with their objectives; these names are kept for code that imports them.
_ALIASES = {"Recipe": ("mae", "MAERecipe"), "FinetuneRecipe": ("finetune", "FinetuneRecipe"),
            "DeiTRecipe": ("deit", "DeiTRecipe"), "ClassifyRecipe": ("classify", "ClassifyRecipe")}


def __getattr__(name: str) -> Any:
    if name not in _ALIASES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    module, attr = _ALIASES[name]
    return getattr(importlib.import_module(f".objectives.{module}", __package__), attr)


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
    recipe_type = objective(raw.get("task", DEFAULT_TASK), where=blame(path, "task", overrides)).recipe
    # The transform size follows the model's (given, else its default) unless the recipe sets it.
    *section, last = recipe_type.image_size_key.split(".")
    sized = raw
    for part in section:
        sized = sized.get(part) or {} if isinstance(sized, dict) else {}
    size = sized.get(last) if isinstance(sized, dict) else None
    if size is None:
        size = list(_field_default(recipe_type, recipe_type.image_size_key))
    elif isinstance(size, int):
        size = sized[last] = [size, size]
    if isinstance(size, list) and len(size) == 2 and all(isinstance(v, int) for v in size):
        # (a malformed size is left for the model's section to report, under its own key)
        raw.setdefault("data", {}).setdefault("transform", {}).setdefault("image_size", size)
    try:
        return build(recipe_type, raw)
    except ConfigError as err:
        raise ConfigError(f"{blame(path, err.key, overrides)}: {err}", err.key) from None


def _field_default(cls: type, dotted: str) -> Any:
    """The default of a dotted key of a config dataclass (``model.encoder.image_size`` of a recipe type),
    following the sections' declared types."""
    *sections, last = dotted.split(".")
    for part in sections:
        cls = get_type_hints(cls)[part]
    f = cls.__dataclass_fields__[last]
    return f.default_factory() if f.default is MISSING else f.default


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
