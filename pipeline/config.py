"""Typed configuration: dataclasses filled from YAML mappings, with errors that name the key.

Each component declares its own small dataclass (``ViTConfig``, ``StreamConfig``, ...). ``build`` turns a
plain mapping into such a dataclass, checking every key and type on the way, so a typo in a recipe or an
override fails before anything is built. Defaults live on the dataclass fields and nowhere else.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

SCIENTIFIC = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")

T = TypeVar("T")

# The input normalisation of ImageNet-trained weights: the default of transforms, teachers and imports.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGENET_NORMALISATION = {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


class ConfigError(ValueError):
    """A recipe or override does not fit the typed configuration; the message names the key.

    ``key`` is the dotted key at fault (``trainer.max_steps``; a section for a check across its keys), so the
    caller can tell whether the value came from the recipe file or from a command-line override."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


def build(cls: type[T], data: Mapping[str, Any] | None, where: str = "") -> T:
    """Build dataclass ``cls`` from ``data``; ``where`` is the dotted path used in error messages."""
    data = {} if data is None else data
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where or 'recipe'}: expected a mapping, got {type(data).__name__}", where)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        names = ", ".join(_join(where, k) for k in unknown)
        raise ConfigError(f"unknown key {names}; valid keys here: {', '.join(sorted(fields))}",
                          _join(where, unknown[0]))
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], _join(where, name))
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"missing required key {_join(where, name)}", _join(where, name))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as err:  # __post_init__ validation
        raise ConfigError(f"{where or 'recipe'}: {err}", where) from err


def read_mapping(path: Path, what: str) -> dict[str, Any]:
    """A YAML file holding a mapping (``what`` describes it for the error), with its name as default ``name``."""
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: {what}")
    raw.setdefault("name", path.stem)
    return raw


def to_dict(obj: Any) -> Any:
    """Plain, YAML-safe form of a (nested) config dataclass."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def digest(d: Mapping[str, Any]) -> str:
    """Short stable hash of a plain config mapping (the recipe hash used for lineage)."""
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}`` (for MLflow params)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = _join(prefix, k)
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def apply_overrides(data: dict[str, Any], overrides: Mapping[str, str]) -> dict[str, Any]:
    """Set dotted keys (``trainer.max_steps=10``) in a nested mapping; values are parsed as YAML scalars."""
    for dotted, raw in overrides.items():
        node = data
        parts = dotted.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override --{dotted}: {part} is not a section", dotted)
            node = child
        node[parts[-1]] = yaml.safe_load(raw) if isinstance(raw, str) else raw
    return data


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else str(key)


def _coerce(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {tp}", where)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{where}: {value!r} is not one of {list(get_args(tp))}", where)
        return value
    if dataclasses.is_dataclass(tp):
        return build(tp, value, where)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}", where)
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}", where)
            return tuple(_coerce(a, v, f"{where}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
        item = args[0] if args else Any
        items = [_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}", where)
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}", where)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}", where)
        return value
    if tp is float:
        if isinstance(value, str) and SCIENTIFIC.fullmatch(value.strip()):
            return float(value)  # 4e-3: YAML 1.1 reads an exponent without a dot in the mantissa as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}", where)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}", where)
        return value
    raise ConfigError(f"{where}: unsupported config type {tp}", where)
