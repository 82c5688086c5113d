"""Export a committed checkpoint and register it in the MLflow model registry, linked to its run."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from mlflow import MlflowClient

from ..checkpoint.store import CONFIG, RUN_ID, committed_step
from ..config import build
from ..console import report
from ..objectives.trained import exports_dir
from ..registry import register_export
from ..tracking import TrackingConfig, resolve_uri
from ..tracking.final_status import settle as settle_final_status
from ..tracking.secrets import scrub_url
from ..tracking.stores import require_store
from .export import export_checkpoint


def register_checkpoint(checkpoint: str | Path, name: str, alias: str = "candidate",
                        tracking_uri: str | None = None) -> Any:
    """``checkpoint``: a step folder or a checkpoint directory (its newest complete step is used).
    The MLflow run is the one that wrote the checkpoints; the tracking URI is the recipe's unless given."""
    step = committed_step(checkpoint)
    run_file = step.parent / RUN_ID
    if not run_file.is_file():
        raise FileNotFoundError(f"{run_file}: missing; cannot tell which MLflow run trained {step}")
    run_id = json.loads(run_file.read_text())["run_id"]
    if tracking_uri is None:
        recipe = yaml.safe_load((step / CONFIG).read_text())
        tracking = build(TrackingConfig, recipe.get("tracking"), "tracking")
        tracking_uri = resolve_uri(tracking, where=f"{step / CONFIG}: tracking.uri", create=False)
    else:  # credentials in the given URI are taken like a recipe's, and never printed
        tracking_uri = resolve_uri(TrackingConfig(uri=tracking_uri), where="--tracking-uri", create=False)
    require_store(tracking_uri)  # the store holding the run that wrote the checkpoints
    settle_final_status(step.parent, tracking_uri)  # the training run's end, if the server missed it
    export_dir = exports_dir(step)
    if not (export_dir / "metadata.json").is_file():
        export_checkpoint(step, export_dir)
    version = register_export(MlflowClient(tracking_uri), export_dir, run_id, name, alias)
    report.info(f"registered models:/{name}/{version.version} (alias @{alias}) from run {run_id} "
                f"at {scrub_url(tracking_uri)}")
    return version
