"""A password inside the tracking URI is used but never written down, against a real MLflow server with basic
auth: a pretrain given ``http://admin:<password>@host`` reaches the server, while nothing it writes (checkpoint
folders and their config.yaml, run id, trace, exports, the S3 mirror), nothing it prints and nothing the server
stores (params, tags, recipe.yaml) holds the password. `vitpipe register` of that checkpoint then takes the
credentials from the environment, and says which variables are missing without them. `vitpipe submit
--dry-run` prints no password for either target."""
from __future__ import annotations

import json
import os
import secrets
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from conftest import PROGRAM, REPO, tiny_overrides
from mlflow_server import MlflowServer
from s3_server import s3_server  # noqa: F401  (fixture)

from pipeline.checkpoint.store import RUN_ID

PASSWORD = f"Pw-{secrets.token_hex(8)}"
"""The admin's password: distinctive, so finding it anywhere is a leak, never a coincidence."""
USER = "admin"
CREDENTIALS = {"MLFLOW_TRACKING_USERNAME": USER, "MLFLOW_TRACKING_PASSWORD": PASSWORD}
PROFILE = str(REPO / "tests" / "data" / "cluster_local.yaml")


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any MLflow credentials or tracking URI (an earlier test's may linger)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_TRACKING_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return {**env, **extra}


def vitpipe(args: list[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, "-m", "pipeline.cli", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def files_holding(root: Path, secret: str) -> list[str]:
    return sorted(str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes())


def bucket_of(server):
    """The S3 server as its admin sees it."""
    import s3fs

    aws = server.env("admin")
    return s3fs.S3FileSystem(key=aws["AWS_ACCESS_KEY_ID"], secret=aws["AWS_SECRET_ACCESS_KEY"],
                             client_kwargs={"endpoint_url": server.endpoint})


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory) -> Iterator[MlflowServer]:
    env = {"MLFLOW_AUTH_ADMIN_PASSWORD": PASSWORD, "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
    with MlflowServer(tmp_path_factory.mktemp("mlflow_auth"), app_name="basic-auth", env=env) as server:
        yield server


def uri_with_password(server: MlflowServer) -> str:
    return server.uri.replace("http://", f"http://{USER}:{PASSWORD}@")


def scrubbed(server: MlflowServer) -> str:
    return server.uri.replace("http://", f"http://{USER}:***@")


@pytest.fixture(scope="module")
def trained(auth_server, s3_server, fmnist_shards, tmp_path_factory):  # noqa: F811
    """A tiny pretrain through the CLI with the password in tracking.uri, checkpoints mirrored to S3."""
    work = tmp_path_factory.mktemp("credentials_run")
    bucket = f"mirror-{secrets.token_hex(4)}"
    bucket_of(s3_server).mkdir(bucket)
    over = tiny_overrides(fmnist_shards, work, **{
        "tracking.uri": uri_with_password(auth_server), "tracking.experiment": "credentials",
        "trainer.max_steps": 4, "checkpoint.every_n_steps": 2, "tracking.recon_every_n_steps": 2,
        "tracking.system_metrics_every_n_steps": 2, "trainer.log_every_n_steps": 2,
        "trainer.sample_trace": str(work / "trace.jsonl"), "checkpoint.mirror": f"s3://{bucket}/run"})
    aws = s3_server.env("admin")
    out = vitpipe(["pretrain", "--config", "mae/tiny_fmnist", *(f"--{k}={v}" for k, v in over.items())],
                  clean_env(**aws), cwd=work)
    assert out.returncode == 0, out.stderr[-4000:]
    return {"work": work, "out": out, "bucket": bucket, "aws": aws}


@pytest.mark.slow
def test_the_password_reaches_the_server_and_nothing_else(trained, auth_server, s3_server, monkeypatch):  # noqa: F811
    from mlflow import MlflowClient

    work, out = trained["work"], trained["out"]
    assert PASSWORD not in out.stdout and PASSWORD not in out.stderr
    assert out.stderr.count("contains a password") == 1, out.stderr[-4000:]  # one warning, saying what to do
    assert "MLFLOW_TRACKING_PASSWORD" in out.stderr
    assert f"at {auth_server.uri}" in out.stdout  # the printed run line: the server, no userinfo

    # every file of the run's folders: root and step config.yaml, run id, trace, checkpoints
    ckpt = work / "ckpt"
    assert {"step-00000002", "step-00000004"} <= {p.name for p in ckpt.glob("step-*")}
    assert (work / "trace.jsonl").is_file()
    assert files_holding(work, PASSWORD) == []
    for config in (ckpt / "config.yaml", ckpt / "step-00000004" / "config.yaml"):
        assert yaml.safe_load(config.read_text())["tracking"]["uri"] == scrubbed(auth_server)

    # the S3 mirror's objects
    fs = bucket_of(s3_server)
    mirrored = fs.find(f"{trained['bucket']}/run")
    assert f"{trained['bucket']}/run/config.yaml" in mirrored and len(mirrored) > 4
    assert [key for key in mirrored if PASSWORD.encode() in fs.cat_file(key)] == []

    # the run reached the server, which refuses requests without credentials
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with pytest.raises(urllib.error.HTTPError, match="401"):
        opener.open(f"{auth_server.uri}/api/2.0/mlflow/experiments/search?max_results=1")
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    client = MlflowClient(auth_server.uri)
    run = client.get_run(json.loads((ckpt / RUN_ID).read_text())["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["tracking.uri"] == scrubbed(auth_server) and "train/loss" in run.data.metrics
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"recipe.yaml", "reconstructions"}
    # nor did the server store it: params, tags, the recipe artifact (users' passwords are hashed)
    assert files_holding(auth_server.root, PASSWORD) == []


@pytest.mark.slow
def test_register_reads_credentials_from_the_environment(trained, auth_server, monkeypatch):
    from mlflow import MlflowClient

    work = trained["work"]
    args = ["register", "--checkpoint", str(work / "ckpt"), "--name", "credentials-mae"]
    refused = vitpipe(args, clean_env(), cwd=work)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "vitpipe register: error:" in refused.stderr and "MLFLOW_TRACKING_PASSWORD" in refused.stderr
    assert scrubbed(auth_server) in refused.stderr

    done = vitpipe(args, clean_env(**CREDENTIALS), cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "registered models:/credentials-mae/1 (alias @candidate)" in done.stdout
    for text in (refused.stdout, refused.stderr, done.stdout, done.stderr):
        assert PASSWORD not in text
    newest = max(p.name for p in (work / "ckpt").glob("step-*"))
    assert (work / "ckpt" / "exports" / newest / "metadata.json").is_file()
    assert files_holding(work, PASSWORD) == []

    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    version = MlflowClient(auth_server.uri).get_model_version_by_alias("credentials-mae", "candidate")
    assert version.version == "1"


@pytest.mark.slow
def test_resuming_from_the_written_recipe_takes_credentials_from_the_environment(trained, auth_server):
    """As a requeued job or a restarted pod does: the recipe read back has ``admin:***@``."""
    work, aws = trained["work"], trained["aws"]
    run_file = (work / "ckpt" / RUN_ID).read_text()
    args = ["pretrain", "--config", str(work / "ckpt" / "config.yaml"), "--trainer.max_steps=6"]
    refused = vitpipe(args, clean_env(**aws), cwd=work)
    assert refused.returncode == 2 and "MLFLOW_TRACKING_PASSWORD" in refused.stderr, refused.stderr[-3000:]

    resumed = vitpipe(args, clean_env(**aws, **CREDENTIALS), cwd=work)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "contains a password" not in resumed.stderr
    differs = [line for line in resumed.stderr.splitlines() if "recipe differs" in line]
    assert differs and "tracking.uri" not in differs[0]  # max_steps did change; the server did not
    assert (work / "ckpt" / "step-00000006" / "COMPLETE").is_file()
    assert (work / "ckpt" / RUN_ID).read_text() == run_file  # the same MLflow run goes on
    for text in (refused.stdout, refused.stderr, resumed.stdout, resumed.stderr):
        assert PASSWORD not in text
    assert files_holding(work, PASSWORD) == []


@pytest.mark.parametrize("target", ["slurm", "k8s"])
@pytest.mark.parametrize("given_as", ["override", "recipe file"])
def test_submit_dry_run_prints_no_password(target, given_as, tmp_path):
    uri = f"https://{USER}:{PASSWORD}@mlflow.example.org:5443"
    over = {"register.name": "tiny-mae"}
    config = "mae/tiny_fmnist"
    if given_as == "override":
        over["tracking.uri"] = uri
    else:
        from pipeline.resources import find_recipe

        recipe = yaml.safe_load(find_recipe(config).read_text())
        recipe.setdefault("tracking", {})["uri"] = uri
        config = str(tmp_path / "recipe.yaml")
        Path(config).write_text(yaml.safe_dump(recipe))
    args = ["submit", "--target", target, "--cluster", PROFILE, "--config", config, "--dry-run", "--nodes", "2",
            *(["--chain"] if target == "slurm" else []), *(f"--{k}={v}" for k, v in over.items())]
    out = vitpipe(args, clean_env(), cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert PASSWORD not in out.stdout and PASSWORD not in out.stderr
    assert out.stderr.count("contains a password") == 1
    if target == "k8s":
        config_map, _ = yaml.safe_load_all(out.stdout)  # stdout is the manifest and nothing else
        assert yaml.safe_load(config_map["data"]["recipe.yaml"])["tracking"]["uri"] == \
            f"https://{USER}:***@mlflow.example.org:5443"
    elif given_as == "override":  # register and evaluate are told the URI, scrubbed
        assert out.stdout.count(f"https://{USER}:***@mlflow.example.org:5443") >= 3
