"""Where runs are tracked: the tracking config and how its URI resolves. No MLflow or Lightning import, so a
recipe is checked before the training stack loads."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .credentials import client_uri, take_credentials

DEFAULT_DB = "mlflow/mlflow.db"


@dataclass
class TrackingConfig:
    """Where runs are tracked. URI precedence: this recipe's ``uri``, then $MLFLOW_TRACKING_URI, then a
    local SQLite store ``sqlite:///<cwd>/mlflow/mlflow.db`` with artifacts beside it."""

    uri: str | None = None
    """Credentials for a server come from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD. A password given
    in the URI (http://user:password@host) is used the same way, but the URI is kept as http://user:***@host."""
    experiment: str = "vitpipe"
    run_name: str | None = None
    recon_every_n_steps: int = 500
    """Log a grid of MAE reconstructions every this many steps (0 disables)."""
    system_metrics_every_n_steps: int = 50
    """Log CPU, memory and GPU memory under system/ every this many steps (0 disables)."""
    failure_cooldown_s: float = 30.0
    """After a logging call fails as if the server were unreachable, drop logging calls for this many seconds
    (counted, not attempted) before trying again; training never waits on a dead server."""

    def __post_init__(self) -> None:
        # Before anything writes the recipe down (checkpoints, params, job files): a password in the URI moves
        # to MLflow's credential variables and the URI keeps "***" in its place.
        self.uri = take_credentials(self.uri)


def resolve_uri(cfg: TrackingConfig, cwd: Path | None = None, where: str = "tracking.uri", create: bool = True,
                ) -> str:
    """The URI to hand MLflow: without userinfo, whose credentials MLflow reads from the environment
    (``where`` names the URI's origin in errors). ``create``: make the default store's folder (a stage that
    only reads a store passes False, and ``stores.require_store`` then says when there is none)."""
    if cfg.uri:
        return client_uri(cfg.uri, where)
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return client_uri(os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI")
    db = (cwd or Path.cwd()) / DEFAULT_DB
    if create:
        db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database rather than into ./mlruns."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "artifacts")
    return None


