"""MLflow logger set-up: tracking URI resolution, experiment with a local artifact store, run naming."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import MLFlowLogger

DEFAULT_DB = "mlflow/mlflow.db"


@dataclass
class TrackingConfig:
    """Where runs are tracked. URI precedence: this recipe's ``uri``, then $MLFLOW_TRACKING_URI, then a
    local SQLite store ``sqlite:///<cwd>/mlflow/mlflow.db`` with artifacts beside it."""

    uri: str | None = None
    experiment: str = "vitpipe"
    run_name: str | None = None
    recon_every_n_steps: int = 500
    """Log a grid of MAE reconstructions every this many steps (0 disables)."""


def resolve_uri(cfg: TrackingConfig, cwd: Path | None = None) -> str:
    if cfg.uri:
        return cfg.uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    db = (cwd or Path.cwd()) / DEFAULT_DB
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database rather than into ./mlruns."""
    if uri.startswith("sqlite:///"):
        return str(Path(uri[len("sqlite:///"):]).parent / "artifacts")
    return None


def make_logger(cfg: TrackingConfig, run_name: str, run_id: str | None = None) -> MLFlowLogger:
    uri = resolve_uri(cfg)
    return MLFlowLogger(experiment_name=cfg.experiment, run_name=cfg.run_name or run_name, tracking_uri=uri,
                        artifact_location=artifact_location(uri), run_id=run_id, log_model=False)


def ui_command(uri: str) -> str:
    return f"mlflow ui --backend-store-uri {uri}" + (
        f" --default-artifact-root {artifact_location(uri)}" if artifact_location(uri) else "")
