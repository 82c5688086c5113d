"""MLflow logger set-up: experiment with a local artifact store, run naming, and a logger whose logging during training survives an unreachable tracking server."""
from __future__ import annotations

import time

from lightning.pytorch.loggers import Logger, MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from .config import TrackingConfig, artifact_location, resolve_uri
from .resilient import ResilientClient


class ResilientMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger whose ``experiment`` is a ``ResilientClient``: logging calls during training
    never raise, they are counted (``tracking.failures``) and warned about. Creating or finding the
    experiment and the run still fails fast, before training starts."""

    def __init__(self, *, experiment_name: str, run_name: str | None, tracking_uri: str,
                 artifact_location: str | None, run_id: str | None, cooldown_s: float):
        super().__init__(experiment_name=experiment_name, run_name=run_name, tracking_uri=tracking_uri,
                         artifact_location=artifact_location, run_id=run_id, log_model=False)
        self._mlflow_client = ResilientClient(self._mlflow_client, cooldown_s=cooldown_s)
        self.unsettled: dict | None = None  # the final status, when the server did not take it
        self.stopped_by: str | None = None  # a signal that stopped the run before its end (``mark_stopped``)

    @property
    def tracking(self) -> ResilientClient:
        """The wrapped client, with its counts (``failed_calls``, ``dropped_calls``) and ``summary()``."""
        return self._mlflow_client

    @rank_zero_only
    def mark_stopped(self, signal_name: str, step: int) -> None:
        """The run stops early for ``signal_name`` (a preemption): MLflow shows it KILLED, with a tag saying
        where, until a resume continues it (``mark_resumed``) and ends it FINISHED."""
        self.stopped_by = signal_name
        self.experiment.set_tag(self.run_id, "vitpipe.stopped_by", f"{signal_name} at step {step}")

    @rank_zero_only
    def mark_resumed(self) -> None:
        """A resume continues this run: RUNNING again while it trains (a stop had ended it KILLED)."""
        self.experiment.update_run(self.run_id, status="RUNNING")

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        # Lightning's version reads the run back (get_run) before set_terminated: with the server gone that
        # read raises at the very end of a run that otherwise succeeded. set_terminated alone is guarded.
        if not self._initialized:
            return
        if self._checkpoint_callback:
            self._scan_and_log_checkpoints(self._checkpoint_callback)
        status = {"success": "FINISHED", "finished": "FINISHED", "failed": "FAILED"}.get(status, status)
        if status == "FINISHED" and self.stopped_by is not None:  # Lightning ends a stopped fit as a success
            status = "KILLED"
        before, end_time = self.tracking.failures, int(time.time() * 1000)
        self.experiment.set_terminated(self.run_id, status, end_time=end_time)
        if self.tracking.failures > before:  # the server did not take it: the training stage keeps it
            self.unsettled = {"run_id": self.run_id, "status": status, "end_time": end_time}


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
