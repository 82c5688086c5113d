"""Tracking URI precedence: recipe, then MLFLOW_TRACKING_URI, then the local SQLite default; credentials inside
a URI are used through MLflow's variables and never written down."""
from __future__ import annotations

import logging
import os

import pytest
import yaml

from pipeline.config import ConfigError
from pipeline.tracking import TrackingConfig, resolve_uri
from pipeline.tracking.credentials import PASSWORD, USERNAME
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


# ------------------------------------------------------------------------- credentials inside the URI


@pytest.fixture
def no_credentials(monkeypatch):
    """No MLflow credentials in the environment nor in ~/.mlflow/credentials; none left behind either.
    (setenv first, so that the undo also removes what the test itself sets.)"""
    for name in (USERNAME, PASSWORD):
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    monkeypatch.setenv("HOME", "/nonexistent")


def test_a_password_in_the_uri_moves_to_the_environment_with_one_warning(no_credentials, caplog):
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        cfg = TrackingConfig(uri="https://alice:s%40cret-1@mlflow.example:5443/base")
        again = TrackingConfig(uri="https://alice:s%40cret-1@mlflow.example:5443/base")
    assert cfg.uri == again.uri == "https://alice:***@mlflow.example:5443/base"  # what is written everywhere
    assert (os.environ[USERNAME], os.environ[PASSWORD]) == ("alice", "s@cret-1")  # percent-decoded
    assert resolve_uri(cfg) == "https://mlflow.example:5443/base"  # what MLflow is given
    [warning] = [r.getMessage() for r in caplog.records]
    assert "s%40cret" not in warning and "s@cret" not in warning
    assert f"pass credentials as {USERNAME} and {PASSWORD}" in warning and "Secret" in warning


def test_credentials_already_in_the_environment_win(no_credentials, monkeypatch, caplog):
    monkeypatch.setenv(USERNAME, "carol")
    monkeypatch.setenv(PASSWORD, "from-the-secret")
    with caplog.at_level(logging.WARNING, logger="pipeline.tracking"):
        cfg = TrackingConfig(uri="http://alice:stale-pw@mlflow.example:5000")
    assert (os.environ[USERNAME], os.environ[PASSWORD]) == ("carol", "from-the-secret")
    assert cfg.uri == "http://alice:***@mlflow.example:5000"
    assert "The credentials MLflow already has" in caplog.text and "stale-pw" not in caplog.text


def test_a_uri_read_back_needs_the_password_from_the_environment(no_credentials, monkeypatch):
    cfg = TrackingConfig(uri="http://alice:***@mlflow.example:5000")  # as a checkpoint's config.yaml has it
    with pytest.raises(ConfigError, match=f"http://alice:\\*\\*\\*@mlflow.example:5000 needs a password.*{PASSWORD}"):
        resolve_uri(cfg, where="ckpt/config.yaml: tracking.uri")
    monkeypatch.setenv(PASSWORD, "pw")
    assert resolve_uri(cfg) == "http://mlflow.example:5000"
    assert os.environ[USERNAME] == "alice"  # the user the URI names, as the environment had none


def test_uris_without_http_credentials_are_left_alone(no_credentials, monkeypatch):
    for uri in ("http://127.0.0.1:5000", "sqlite:////tmp/x.db", "postgresql://u:dbpw@db.example/mlflow"):
        assert TrackingConfig(uri=uri).uri == uri and resolve_uri(TrackingConfig(uri=uri)) == uri
    assert USERNAME not in os.environ and PASSWORD not in os.environ
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://dave:env-pw@mlflow.example")
    assert resolve_uri(TrackingConfig()) == "http://mlflow.example"
    assert os.environ[PASSWORD] == "env-pw"


def test_resuming_does_not_report_a_scrubbed_uri_as_a_change(no_credentials, tmp_path, caplog):
    from pipeline.recipe import load_recipe
    from pipeline.stages.run_record import _warn_changed_config

    old = load_recipe("mae/tiny_fmnist").to_dict()
    old["tracking"]["uri"] = "http://alice:pw@mlflow.example:5000"  # written before passwords were scrubbed
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    for uri in ("http://alice:***@mlflow.example:5000", "http://mlflow.example:5000"):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="pipeline.stages.train"):
            _warn_changed_config(tmp_path, load_recipe("mae/tiny_fmnist", {"tracking.uri": uri}))
        assert "recipe differs" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="pipeline.stages.train"):
        _warn_changed_config(tmp_path, load_recipe("mae/tiny_fmnist", {"tracking.uri": "http://other:5000"}))
    assert "recipe differs from the checkpoint's in: tracking.uri" in caplog.text
