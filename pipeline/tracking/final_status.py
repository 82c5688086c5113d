"""A run's final MLflow status that the tracking server did not take when training ended: kept in the run's
checkpoint folder and written by the next vitpipe command that touches the run (a resume, ``register``), so
the run is not left RUNNING for ever."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ..console import report
from .secrets import scrub_url

log = logging.getLogger(__name__)
FINAL_STATUS = "mlflow_final_status.json"


def keep(root: Path, unsettled: dict[str, Any]) -> Path:
    """Write ``{"run_id", "status", "end_time"}`` beside the checkpoints; returns the file."""
    root.mkdir(parents=True, exist_ok=True)
    path = root / FINAL_STATUS
    path.write_text(json.dumps(unsettled))
    return path


def settle(root: Path, tracking_uri: str) -> str | None:
    """Write a kept final status to the run, once the server answers; the status written, or None (nothing
    kept, or the server still away: the file stays for the next command)."""
    path = Path(root) / FINAL_STATUS
    if not path.is_file():
        return None
    from mlflow import MlflowClient

    kept = json.loads(path.read_text())
    try:
        MlflowClient(tracking_uri).set_terminated(kept["run_id"], kept["status"], end_time=kept["end_time"])
    except Exception as err:  # the server is still away: keep the file, say so, go on
        log.warning("MLflow run %s: its final status %s (kept in %s) could not be written to %s yet: %s",
                    kept["run_id"], kept["status"], path, scrub_url(tracking_uri), err)
        return None
    path.unlink()
    report.info(f"MLflow run {kept['run_id']}: final status {kept['status']} written (kept in {path} since "
                f"the server did not answer when training ended)")
    return kept["status"]
