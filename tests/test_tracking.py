"""Tracking URI precedence: recipe, then MLFLOW_TRACKING_URI, then the local SQLite default."""
from __future__ import annotations

from pipeline.tracking import TrackingConfig, resolve_uri
from pipeline.tracking.mlflow_setup import artifact_location


def test_uri_precedence(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    default = resolve_uri(TrackingConfig(), cwd=tmp_path)
    assert default == f"sqlite:///{tmp_path / 'mlflow' / 'mlflow.db'}"
    assert (tmp_path / "mlflow").is_dir()
    assert artifact_location(default) == str(tmp_path / "mlflow" / "artifacts")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    assert resolve_uri(TrackingConfig(), cwd=tmp_path) == "http://127.0.0.1:5999"
    assert artifact_location("http://127.0.0.1:5999") is None
    assert resolve_uri(TrackingConfig(uri="sqlite:////x/y.db"), cwd=tmp_path) == "sqlite:////x/y.db"
