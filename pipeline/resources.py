"""Find recipes and job templates, in a source checkout or inside an installed wheel."""
from __future__ import annotations

from pathlib import Path

_PKG = Path(__file__).resolve().parent


def bundled(kind: str) -> Path:
    """Folder of ``recipes`` or ``jobs``: packaged copy in a wheel, else the repository's top level."""
    for candidate in (_PKG / "_bundled" / kind, _PKG.parent / kind):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"no {kind}/ folder found beside the vitpipe package")


def list_recipes() -> list[str]:
    root = bundled("recipes")
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def find_recipe(name_or_path: str) -> Path:
    """A file path, or a built-in name like ``mae/vit_large16`` (with or without ``.yaml``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    root = bundled("recipes")
    for candidate in (root / name_or_path, root / f"{name_or_path}.yaml"):
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"recipe {name_or_path!r} is neither a file nor a built-in recipe "
                            f"(built-in: {', '.join(list_recipes())})")
