"""MLflow logger set-up: tracking URI resolution, experiment with a local artifact store, run naming,
and a logger whose logging during training survives an unreachable tracking server."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from .resilient import ResilientClient

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
    system_metrics_every_n_steps: int = 50
    """Log CPU, memory and GPU memory under system/ every this many steps (0 disables)."""
    failure_cooldown_s: float = 30.0
    """After a logging call fails as if the server were unreachable, drop logging calls for this many seconds
    (counted, not attempted) before trying again; training never waits on a dead server."""


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


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger whose ``experiment`` is a ``ResilientClient``: logging calls during training
    never raise, they are counted (``tracking.failures``) and warned about. Creating or finding the
    experiment and the run still fails fast, before training starts."""

    def __init__(self, *, experiment_name: str, run_name: str | None, tracking_uri: str,
                 artifact_location: str | None, run_id: str | None, cooldown_s: float):
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, run_id=run_id, log_model=False)
        self._mlflow_client = ResilientClient(self._mlflow_client, cooldown_s=cooldown_s)

    @property
    def tracking(self) -> ResilientClient:
        """The wrapped client, with its counts (``failed_calls``, ``dropped_calls``) and ``summary()``."""
        return self._mlflow_client

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Lightning's version reads the run back (get_run) before set_terminated: with the server gone that
        # read raises at the very end of a run that otherwise succeeded. set_terminated alone is guarded.
        if not self._initialized:
            return
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        self.experiment.set_terminated(self.run_id, status)


def make_logger(cfg: TrackingConfig, run_name: str, run_id: str | None = None) -> ResilientMLFlowLogger:
    uri = resolve_uri(cfg)
    return ResilientMLFlowLogger(experiment_name=cfg.experiment, run_name=cfg.run_name or run_name,
                                 tracking_uri=uri, artifact_location=artifact_location(uri), run_id=run_id,
                                 cooldown_s=cfg.failure_cooldown_s)


def run_exists(uri: str, run_id: str) -> bool:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        MlflowClient(uri).get_run(run_id)
    except MlflowException as err:
        if err.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise
    return True


def tracking_failures(logger: Logger | None) -> int:
    """Logging calls of this run that did not reach the tracking store (0 for a logger without the wrapper)."""
    return logger.tracking.failures if isinstance(logger, ResilientMLFlowLogger) else 0


def ui_command(uri: str) -> str:
    """How to browse the runs: a tracking server already serves the UI at its URI; a store needs ``mlflow ui``."""
    if uri.startswith(("http://", "https://")):
        return uri
    return f"mlflow ui --backend-store-uri {uri}" + (
        f" --default-artifact-root {artifact_location(uri)}" if artifact_location(uri) else "")
