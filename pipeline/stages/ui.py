"""`vitpipe ui`: MLflow's UI on a local store (the demo's, a workdir's, or the default one), bound to
127.0.0.1, started with this environment's MLflow so it works without activating the virtual environment."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from ..config import ConfigError
from ..console import report, vitpipe_executable
from ..tracking.config import TrackingConfig, artifact_location, resolve_uri
from ..tracking.secrets import scrub_url
from ..tracking.stores import require_store, store_uri

DEFAULT_PORT = 5000


def ui_uri(workdir: str | None, tracking_uri: str | None) -> str:
    """The store to browse: ``--tracking-uri``, else ``WORKDIR/mlflow/mlflow.db``, else as every stage resolves
    it ($MLFLOW_TRACKING_URI, else ``./mlflow/mlflow.db``)."""
    uri = tracking_uri or (store_uri(workdir) if workdir else None)
    return resolve_uri(TrackingConfig(uri=uri), where="--tracking-uri", create=False)


def mlflow_ui(uri: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT) -> list[str]:
    """The ``mlflow ui`` command line for a local store, with its artifacts beside the database."""
    cmd = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri, "--host", host, "--port", str(port),
           "--workers", "1"]
    if (artifacts := artifact_location(uri)) is not None:
        cmd += ["--default-artifact-root", artifacts]
    return cmd


def browse_command(uri: str) -> str:
    """What to run (or open) to browse the runs of ``uri``, ready to paste."""
    if uri.startswith(("http://", "https://")):
        return scrub_url(uri)  # a tracking server serves its own UI
    return f"{vitpipe_executable()} ui --tracking-uri {uri}"


def serve_ui(workdir: str | None = None, tracking_uri: str | None = None, host: str = "127.0.0.1",
             port: int = DEFAULT_PORT) -> int:
    """Run the UI in the foreground until Ctrl-C; returns its exit code."""
    uri = ui_uri(workdir, tracking_uri)
    if uri.startswith(("http://", "https://")):
        report.info(f"{scrub_url(uri)} is a tracking server: it serves its own UI, open it in a browser")
        return 0
    require_store(uri)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex((host, port)) == 0:
            raise ConfigError(f"port {port} on {host} is already in use (another UI?): choose one with --port")
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}  # no job-runner process beside the UI
    report.info(f"MLflow UI for {uri}\n  open http://{host}:{port} in a browser; Ctrl-C stops it")
    proc = subprocess.Popen(mlflow_ui(uri, host, port), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(timeout=30)
        return 0
