"""Local MLflow stores: where a SQLite store's database and artifacts are, and a clear error (naming the stores
that do exist nearby) when a stage that only reads asks for a store that is not there, instead of creating
an empty one and then reporting "no registered model"."""
from __future__ import annotations

from pathlib import Path

from ..config import ConfigError
from .config import DEFAULT_DB

STORE_DB = Path(DEFAULT_DB)
"""A workdir's store: ``<workdir>/mlflow/mlflow.db`` (the default store is the current folder's)."""


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (relative paths against the current folder); None otherwise."""
    if not uri.startswith("sqlite:///"):
        return None
    return Path(uri[len("sqlite:///"):])


def store_uri(workdir: str | Path) -> str:
    return f"sqlite:///{(Path(workdir) / STORE_DB).resolve()}"


def nearby_stores(root: Path | None = None) -> list[Path]:
    """Stores in ``root`` and its sub-folders one or two levels down (``./mlflow``, ``vitpipe-demo/mlflow``)."""
    root = root or Path.cwd()
    found = [root / STORE_DB, *root.glob(f"*/{STORE_DB}"), *root.glob(f"*/*/{STORE_DB}")]
    return sorted({p.resolve() for p in found if p.is_file()})


def require_store(uri: str) -> str:
    """``uri`` unchanged when it is not a local SQLite store or its database exists; else a ConfigError that
    says which stores exist nearby and how to pass one."""
    db = sqlite_path(uri)
    if db is None or db.is_file():
        return uri
    others = nearby_stores()
    hint = ("; stores found here: " + ", ".join(f"--tracking-uri {store_uri(p.parent.parent)}" for p in others)
            if others else "")
    raise ConfigError(f"no MLflow store at {db} (from {uri}): pass the store a run used with --tracking-uri, "
                      f"or set MLFLOW_TRACKING_URI{hint}")
