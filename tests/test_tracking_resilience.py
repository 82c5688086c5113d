"""Tracking against a real ``mlflow server``, and training that outlives the server going away mid-run."""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lightning as L
import pytest
from conftest import tiny_overrides
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.tracking import MlflowClient
from mlflow_server import mlflow_server  # noqa: F401 - the fixture

from pipeline.stages.ui import browse_command
from pipeline.tracking import TrackingConfig, make_logger
from pipeline.tracking.mlflow_setup import ResilientMLFlowLogger, tracking_failures
from pipeline.tracking.resilient import TRAINING_HTTP_DEFAULTS, ResilientClient, http_defaults

RESILIENT_LOG = "pipeline.tracking.resilient"


def _metric_values(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


# --- the wrapper on its own: exact accounting with a fake clock and a fake client --------------------------

class FakeClient:
    """Stands in for MlflowClient: ``down`` makes logging raise as a refused connection does."""

    tracking_uri = "http://fake:5000"

    def __init__(self):
        self.down, self.logged, self.env_seen = False, [], {}

    def log_metric(self, run_id, key, value, step=0):
        self.env_seen = {name: os.environ.get(name) for name in TRAINING_HTTP_DEFAULTS}
        if self.down:
            raise MlflowException("API request failed with exception Connection refused")  # INTERNAL_ERROR
        self.logged.append((key, value, step))

    def log_param(self, run_id, key, value):
        raise MlflowException("Changing param values is not allowed", INVALID_PARAMETER_VALUE)

    def get_run(self, run_id):
        raise MlflowException(f"Run '{run_id}' not found")


def test_breaker_counts_drops_and_retries_after_cooldown(caplog):
    now = [100.0]
    fake = FakeClient()
    client = ResilientClient(fake, cooldown_s=10, warn_every_s=60, clock=lambda: now[0])
    client.log_metric("r", "loss", 1.0, step=1)
    fake.down = True
    with caplog.at_level(logging.WARNING, logger=RESILIENT_LOG):
        for step in range(2, 7):  # one attempt fails, the next four fall in its cool-down
            assert client.log_metric("r", "loss", 1.0, step=step) is None
            now[0] += 1
    assert (client.failed_calls, client.dropped_calls, client.failures) == (1, 4, 5)
    warnings = [r for r in caplog.records if r.name == RESILIENT_LOG]
    assert len(warnings) == 1 and "http://fake:5000" in warnings[0].getMessage()
    assert "Connection refused" in warnings[0].getMessage()

    now[0] = 110.0  # cool-down over: the next call is attempted again, fails, opens a new cool-down
    client.log_metric("r", "loss", 1.0, step=7)
    client.log_metric("r", "loss", 1.0, step=8)
    assert (client.failed_calls, client.dropped_calls) == (2, 5)

    fake.down = False
    now[0] = 121.0
    client.log_metric("r", "loss", 9.0, step=9)  # back: logged, breaker closed, counts kept
    client.log_metric("r", "loss", 10.0, step=10)
    assert fake.logged[-2:] == [("loss", 9.0, 9), ("loss", 10.0, 10)]
    assert client.failures == 7 and isinstance(client.last_error, MlflowException)
    assert client.summary().startswith("tracking: 7 logging calls failed (2 raised, 5 dropped")


def test_rejected_call_is_counted_but_does_not_open_the_breaker():
    fake = FakeClient()
    client = ResilientClient(fake, cooldown_s=1000)
    assert client.log_param("r", "lr", "0.1") is None  # the server answered 400: it is up
    client.log_metric("r", "loss", 1.0)
    assert fake.logged == [("loss", 1.0, 0)]
    assert (client.failed_calls, client.dropped_calls) == (1, 0)


def test_other_calls_pass_through_and_raise():
    client = ResilientClient(FakeClient())
    with pytest.raises(MlflowException, match="not found"):
        client.get_run("nope")
    assert client.tracking_uri == "http://fake:5000"
    with pytest.raises(AttributeError):
        client.no_such_method  # noqa: B018


def test_short_http_policy_only_where_the_user_set_none(monkeypatch):
    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    monkeypatch.delenv("MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER", raising=False)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    fake = FakeClient()
    ResilientClient(fake).log_metric("r", "loss", 1.0)
    assert fake.env_seen == {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
                             "MLFLOW_HTTP_RESPECT_RETRY_AFTER_HEADER": "false"}
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # only for the duration of the call
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
    # MLflow reads the variables per request: this is the value http_request will use
    from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_TIMEOUT

    with http_defaults(TRAINING_HTTP_DEFAULTS):
        assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 10
    assert MLFLOW_HTTP_REQUEST_TIMEOUT.get() == 120


class UnreachableWithPassword(FakeClient):
    tracking_uri = "https://bob:s3cret@mlflow.example:443"

    def log_metric(self, *args, **kwargs):
        raise OSError(f"API request to {self.tracking_uri}/api/2.0/mlflow/runs/log-metric failed")


def test_reports_hide_url_passwords(caplog):
    client = ResilientClient(UnreachableWithPassword())
    with caplog.at_level(logging.WARNING, logger=RESILIENT_LOG):
        client.log_metric("r", "loss", 1.0)
    assert "s3cret" not in caplog.text and "s3cret" not in client.summary()
    assert "bob:***@mlflow.example" in client.summary()


def test_sqlite_default_store_is_wrapped_too(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = make_logger(TrackingConfig(uri=uri), "sqlite-run")
    assert isinstance(logger, ResilientMLFlowLogger) and isinstance(logger.experiment, ResilientClient)
    logger.log_metrics({"train/loss": 0.5}, step=1)
    logger.experiment.log_param(logger.run_id, "p", "a")
    logger.experiment.log_param(logger.run_id, "p", "b")  # rejected by the store: counted, not raised
    logger.finalize("success")
    run = MlflowClient(uri).get_run(logger.run_id)
    assert run.data.metrics["train/loss"] == 0.5 and run.data.params["p"] == "a"
    assert run.info.status == "FINISHED"
    assert tracking_failures(logger) == 1 and tracking_failures(None) == 0


# --- a real server --------------------------------------------------------------------------------------

def test_logs_to_a_real_server(mlflow_server, tmp_path):  # noqa: F811
    logger = make_logger(TrackingConfig(uri=mlflow_server.uri, experiment="server-roundtrip"), "roundtrip")
    logger.log_hyperparams({"optim": {"lr": 0.001}, "seed": 3})
    for step in range(1, 4):
        logger.log_metrics({"train/loss": 1.0 / step}, step=step)
    (tmp_path / "grid.png").write_bytes(b"\x89PNG not really")
    logger.experiment.log_artifact(logger.run_id, str(tmp_path / "grid.png"), artifact_path="reconstructions")
    logger.experiment.log_text(logger.run_id, "name: x\n", "recipe.yaml")
    logger.experiment.set_tag(logger.run_id, "vitpipe.recipe_hash", "abc")
    logger.finalize("success")
    assert tracking_failures(logger) == 0, logger.tracking.summary()

    client = MlflowClient(mlflow_server.uri)
    run = client.get_run(logger.run_id)
    assert run.info.status == "FINISHED" and run.data.tags["vitpipe.recipe_hash"] == "abc"
    assert run.data.params == {"optim/lr": "0.001", "seed": "3"}
    assert _metric_values(client, logger.run_id, "train/loss") == {1: 1.0, 2: 0.5, 3: pytest.approx(1 / 3)}
    assert {a.path for a in client.list_artifacts(logger.run_id)} == {"recipe.yaml", "reconstructions"}
    assert [a.path for a in client.list_artifacts(logger.run_id, "reconstructions")] == ["reconstructions/grid.png"]
    assert run.info.artifact_uri.startswith("mlflow-artifacts:")  # proxied by the server, stored under its root
    assert list((mlflow_server.root / "artifacts").rglob("grid.png"))
    assert browse_command(mlflow_server.uri) == mlflow_server.uri  # the server serves the UI itself


def test_server_down_costs_counts_not_time_and_logging_recovers(mlflow_server, tmp_path, caplog):  # noqa: F811
    cooldown = 2.0
    logger = make_logger(TrackingConfig(uri=mlflow_server.uri, experiment="server-outage",
                                        failure_cooldown_s=cooldown), "outage")
    logger.log_metrics({"train/loss": 1.0}, step=1)
    n = 30
    with mlflow_server.stopped(), caplog.at_level(logging.WARNING, logger=RESILIENT_LOG):
        start = time.monotonic()
        for step in range(2, 2 + n):
            logger.log_metrics({"train/loss": float(step)}, step=step)
            logger.experiment.log_artifact(logger.run_id, __file__, artifact_path="src")
        elapsed = time.monotonic() - start
        # No stall: one refused attempt (with one immediate retry), every other call dropped without trying.
        assert elapsed < cooldown, f"{2 * n} logging calls against a dead server took {elapsed:.1f} s"
        assert (logger.tracking.failed_calls, logger.tracking.dropped_calls) == (1, 2 * n - 1)
        assert tracking_failures(logger) == 2 * n
        (warning,) = [r.getMessage() for r in caplog.records if r.name == RESILIENT_LOG]
        assert mlflow_server.uri in warning and "Training goes on" in warning
    time.sleep(max(0.0, cooldown - (time.monotonic() - start)))  # (a restart takes longer anyway)
    # the cool-down is over: the next call is attempted and arrives
    logger.log_metrics({"train/loss": 99.0}, step=99)
    logger.experiment.log_artifact(logger.run_id, __file__, artifact_path="src")
    assert tracking_failures(logger) == 2 * n
    assert f"{2 * n} logging calls failed (1 raised, {2 * n - 1} dropped" in logger.tracking.summary()
    client = MlflowClient(mlflow_server.uri)
    assert _metric_values(client, logger.run_id, "train/loss") == {1: 1.0, 99: 99.0}
    assert [a.path for a in client.list_artifacts(logger.run_id, "src")] == [f"src/{Path(__file__).name}"]


class StopServerAt(L.Callback):
    """Stops the tracking server after the batch of ``step`` and keeps the logger for the test to inspect."""

    def __init__(self, server, step: int):
        self.server, self.step, self.logger = server, step, None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.logger = trainer.logger
        if trainer.global_step == self.step and self.server.running:
            self.server.stop()


@pytest.mark.slow
def test_training_outlives_the_tracking_server(mlflow_server, fmnist_shards, tmp_path):  # noqa: F811
    from pipeline.recipe import load_recipe
    from pipeline.stages.train import train as pretrain

    o = tiny_overrides(fmnist_shards, tmp_path, **{
        "trainer.max_steps": 20, "trainer.global_batch": 8, "trainer.log_every_n_steps": 1,
        "checkpoint.every_n_steps": 10, "data.num_workers": 0, "tracking.uri": mlflow_server.uri,
        "tracking.experiment": "server-dies-mid-run", "tracking.recon_every_n_steps": 3,
        "tracking.failure_cooldown_s": 1.0})
    stopper = StopServerAt(mlflow_server, step=5)
    try:
        result = pretrain(load_recipe("mae/tiny_fmnist", o), resume="never", extra_callbacks=[stopper])
    finally:
        mlflow_server.start()  # the fixture is shared: leave it running

    assert result.global_step == 20
    assert result.checkpoint is not None and result.checkpoint.name == "step-00000020"
    assert (result.checkpoint / "COMPLETE").is_file()
    lost = tracking_failures(stopper.logger)
    assert lost > 0 and stopper.logger.tracking.failed_calls >= 1, stopper.logger.tracking.summary()

    # what was logged before the server died is there; steps 6..20 (metrics, step-6+ images) are not
    client = MlflowClient(mlflow_server.uri)
    losses = _metric_values(client, result.run_id, "train/loss")
    assert losses and max(losses) <= 5
    recon = [a.path for a in client.list_artifacts(result.run_id, "reconstructions")]
    assert recon == ["reconstructions/reconstruction_step00000003.png"]

    assert result.tracking_failures == lost

    # the server was away when the run ended: not left RUNNING for ever, the status waits beside the checkpoints
    kept = tmp_path / "ckpt" / "mlflow_final_status.json"
    assert kept.is_file() and f"its final status FINISHED is kept in {kept}" in str(result.summary)
    assert client.get_run(result.run_id).info.status == "RUNNING"
    ended = json.loads(kept.read_text())["end_time"]
    from pipeline.stages.register import register_checkpoint

    register_checkpoint(result.checkpoint, "outlived-the-server", tracking_uri=mlflow_server.uri)
    run = client.get_run(result.run_id)  # the next command that touches the run wrote it
    assert run.info.status == "FINISHED" and run.info.end_time == ended and not kept.exists()
