"""A real ``mlflow server`` for tests: SQLite backend, proxied local artifacts, 127.0.0.1 on a free port.

Usage::

    from mlflow_server import mlflow_server      # the fixture (session scope, started on first use)

    def test_x(mlflow_server):
        client = MlflowClient(mlflow_server.uri)
        mlflow_server.stop()                      # the port now refuses connections
        mlflow_server.start()                     # same port, same database and artifacts

Starting takes about 5 s on a 2-core machine (creating the SQLite schema included); the server is one
uvicorn worker with job execution off, about 0.5 GB resident. A test that stops the shared server must start
it again (``with mlflow_server.stopped(): ...`` does), so the next test finds it running.
"""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

HOST = "127.0.0.1"
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # the health probe ignores $http_proxy


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _mlflow_command() -> list[str]:
    """The ``mlflow`` CLI of the interpreter running the tests (the venv's), not whatever is on PATH."""
    cli = Path(sys.executable).parent / "mlflow"
    return [str(cli)] if cli.is_file() else [sys.executable, "-m", "mlflow"]


class MlflowServer:
    """One ``mlflow server`` process group; ``start``/``stop`` may be repeated, always on the same port."""

    def __init__(self, root: str | Path, port: int | None = None, start_timeout_s: float = 90.0,
                 artifacts: str | None = None, env: dict[str, str] | None = None, app_name: str | None = None):
        """``artifacts``: where the server stores artifacts (default a folder under root; e.g. ``s3://b/p``,
        with the store's credentials in ``env``, added to the server's environment). ``app_name``: an MLflow
        server app, e.g. ``basic-auth`` (users in ``root/basic_auth.db``; the admin's password from
        ``MLFLOW_AUTH_ADMIN_PASSWORD`` in ``env``)."""
        self.root = Path(root)
        self.artifacts, self.extra_env = artifacts or str(self.root / "artifacts"), env or {}
        self.app_name = app_name
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.uri = f"http://{HOST}:{self.port}"
        self.log_file = self.root / "server.log"
        self.start_timeout_s = start_timeout_s
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> MlflowServer:
        if self.running:
            return self
        cmd = [*_mlflow_command(), "server",
               "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
               "--artifacts-destination", self.artifacts, "--serve-artifacts",
               "--host", HOST, "--port", str(self.port), "--workers", "1",
               *(["--app-name", self.app_name] if self.app_name else [])]
        env = {**os.environ, **self.extra_env}
        env.pop("MLFLOW_TRACKING_URI", None)
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # no huey job-runner process beside the server
        env["PYTHONUNBUFFERED"] = "1"
        with self.log_file.open("ab") as log:
            log.write(f"\n==== {' '.join(cmd)}\n".encode())
            log.flush()
            # A process group of its own: stop() kills the CLI and the uvicorn process it spawns together.
            self._proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.root,
                                          start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while not self._healthy():
            if self._proc.poll() is not None:
                self._proc = None
                raise RuntimeError(f"mlflow server on {self.uri} exited during start-up:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"mlflow server on {self.uri} not healthy after {self.start_timeout_s:.0f} s:\n"
                                   f"{self.log_tail()}")
            time.sleep(0.1)
        return self

    def stop(self, timeout_s: float = 30.0) -> None:
        """Kill the server abruptly (as a crash or a network cut would look) and wait until the port refuses."""
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._proc.pid, signal.SIGKILL)
        self._proc.wait(timeout=timeout_s)
        self._proc = None
        deadline = time.monotonic() + timeout_s
        while self._accepts_connections():
            if time.monotonic() > deadline:
                raise RuntimeError(f"port {self.port} still accepts connections {timeout_s:.0f} s after the kill")
            time.sleep(0.05)

    @contextlib.contextmanager
    def stopped(self) -> Iterator[MlflowServer]:
        """Stopped inside the block, running again after it (whatever the block raised)."""
        self.stop()
        try:
            yield self
        finally:
            self.start()

    def log_tail(self, n: int = 40) -> str:
        if not self.log_file.exists():
            return "(no server log)"
        return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])

    def _healthy(self) -> bool:
        try:
            with _NO_PROXY.open(f"{self.uri}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def _accepts_connections(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=1):
                return True
        except OSError:
            return False

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[MlflowServer]:
    """A running server shared by the session (started on first use, about 5 s)."""
    with MlflowServer(tmp_path_factory.mktemp("mlflow_server")) as server:
        yield server
