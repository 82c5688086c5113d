"""A recipe's sections, keys, types, values, defaults and documentation, as ``vitpipe recipes show`` prints them.

The documentation is the string under each config field (``x: int = 1`` followed by ``\"\"\"What x is.\"\"\"``),
read from the class's source: the typed configs stay the one place where a key is defined and described."""
from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin


@functools.cache
def field_docs(cls: type) -> dict[str, str]:
    """{field: its docstring} for a dataclass and its dataclass bases (a base's doc is kept unless redefined)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (a frozen build): keys still show, undocumented
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for stmt, nxt in zip(body, body[1:] + [None]):
            if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name) and _is_doc(nxt):
                docs[stmt.target.id] = " ".join(inspect.cleandoc(nxt.value.value).split())
    return docs


def _is_doc(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)


def type_name(tp: Any) -> str:
    """``int | None``, ``'auto' | 'cpu'``, ``list[str]``, ``tuple[int, int]``: how a key's type reads in YAML."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in get_args(tp))
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (list, tuple, dict):
        args = get_args(tp)
        if origin is tuple and len(args) == 2 and args[1] is Ellipsis:
            return f"list[{type_name(args[0])}]"
        return f"{origin.__name__}[{', '.join(type_name(a) for a in args)}]" if args else origin.__name__
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _plain(value: Any) -> Any:
    from .config import to_dict

    return to_dict(value)


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(_plain(value), default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


def describe(config: Any, where: str = "") -> list[str]:
    """Lines describing ``config`` (a recipe or one of its sections): one header per section, then each key
    with its type, its value here, the default when different, and its documentation."""
    cls = type(config)
    hints = typing.get_type_hints(cls)
    docs = field_docs(cls)
    lines: list[str] = []
    nested: list[tuple[str, Any]] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            nested.append((f.name, value))
            continue
        default = _default(f)
        shown = f"  {f.name}: {type_name(hints[f.name])} = {_yaml_value(value)}"
        if default is not dataclasses.MISSING and _plain(default) != _plain(value):
            shown += f"  (default {_yaml_value(default)})"
        lines.append(shown)
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    out = []
    if lines:
        doc = " ".join(inspect.cleandoc(cls.__doc__ or "").split()) if where else ""
        out.append(f"[{where}]" + (f"  {doc}" if doc and not doc.startswith(cls.__name__ + "(") else "")
                   if where else "[top level]")
        out.extend(lines)
    for name, value in nested:
        out.extend(describe(value, f"{where}.{name}" if where else name))
    return out
