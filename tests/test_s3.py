"""Shards in a real S3 store (SeaweedFS): written by `vitpipe shard`, streamed by pretraining, and the
errors a user gets when the store refuses, all before any training step."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import PROGRAM, REPO, tiny_overrides
from s3_server import s3_server  # noqa: F401  (fixture)

pytestmark = pytest.mark.slow
SHARDS = "s3://vitpipe-shards/fmnist"


def vitpipe(args: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([*PROGRAM, "-m", "pipeline.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def env_for(server, identity: str = "admin", **kw) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), **server.env(identity, **kw)}


@pytest.fixture(scope="module")
def s3_shards(s3_server, tmp_path_factory) -> str:  # noqa: F811
    """All of Fashion-MNIST sharded into a new bucket through the CLI, as a user would."""
    out = vitpipe(["shard", "--fashion-mnist", "--out", SHARDS, "--shard-size", "5000"], env_for(s3_server),
                  tmp_path_factory.mktemp("shard"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"train: 60000 samples in 12 shards -> {SHARDS}/train/manifest.json" in out.stdout
    return SHARDS


def _pretrain_flags(work: Path, **extra) -> list[str]:
    o = tiny_overrides(Path("/unused"), work, **{"data.train": f"{SHARDS}/train", "data.val": f"{SHARDS}/val",
                                                 "trainer.max_steps": 4, "data.num_workers": 2,
                                                 "trainer.sample_trace": work / "trace.jsonl", **extra})
    return ["pretrain", "--config", "mae/tiny_fmnist", *(f"--{k}={v}" for k, v in o.items())]


def test_pretrain_streams_shards_from_s3(s3_server, s3_shards, tmp_path):  # noqa: F811
    out = vitpipe(_pretrain_flags(tmp_path), env_for(s3_server, "reader"), tmp_path)  # reading needs no more
    assert out.returncode == 0, out.stderr[-3000:]
    trace = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    assert [r["step"] for r in trace] == [1, 2, 3, 4]
    keys = [k for r in trace for k in r["keys"]]
    assert len(keys) == 4 * 16 == len(set(keys)) and all(k.startswith("train-0000") for k in keys)
    assert (tmp_path / "ckpt" / "step-00000004" / "COMPLETE").is_file()


def test_wrong_secret_is_named_before_training(s3_server, s3_shards, tmp_path):  # noqa: F811
    out = vitpipe(_pretrain_flags(tmp_path), env_for(s3_server, secret="not-the-secret"), tmp_path)
    assert out.returncode == 2
    msg = out.stderr.strip().splitlines()[-1]
    assert f"{SHARDS}/train/manifest.json: reading the shard manifest was denied by {s3_server.endpoint}" in msg
    assert "bucket 'vitpipe-shards'" in msg and "vitpipe-admin" in msg and "not-the-secret" not in out.stderr
    assert not (tmp_path / "ckpt").exists()


def test_missing_bucket_is_named(s3_server, s3_shards, tmp_path):  # noqa: F811
    flags = _pretrain_flags(tmp_path, **{"data.train": "s3://no-such-bucket/fmnist/train"})
    out = vitpipe(flags, env_for(s3_server), tmp_path)
    assert out.returncode == 2
    assert f"bucket 'no-such-bucket' does not exist at {s3_server.endpoint}" in out.stderr


def test_read_only_key_cannot_write_shards(s3_server, s3_shards, tmp_path):  # noqa: F811
    out = vitpipe(["shard", "--fashion-mnist", "--out", "s3://vitpipe-shards/again"],
                  env_for(s3_server, "reader"), tmp_path)
    assert out.returncode == 2
    assert ("s3://vitpipe-shards/again/train: writing shards was denied by "
            f"{s3_server.endpoint}, bucket 'vitpipe-shards' (credentials: vitpipe-reader)") in out.stderr


def test_read_only_key_reads_shards_but_cannot_mirror_checkpoints(s3_server, s3_shards, tmp_path):  # noqa: F811
    """The write probe refuses before the first step, not at the first checkpoint."""
    mirror = "s3://vitpipe-shards/checkpoints/run-a"
    out = vitpipe(_pretrain_flags(tmp_path, **{"checkpoint.mirror": mirror}), env_for(s3_server, "reader"), tmp_path)
    assert out.returncode == 2
    assert (f"{mirror}: writing checkpoints was denied by {s3_server.endpoint}, bucket 'vitpipe-shards' "
            "(credentials: vitpipe-reader)") in out.stderr
    assert not (tmp_path / "trace.jsonl").exists() and not (tmp_path / "ckpt").exists()


def test_recipe_storage_options_reference_the_environment(s3_server, s3_shards, tmp_path):  # noqa: F811
    """No AWS_* variables at all: endpoint and key come from the recipe, the secret through a reference."""
    aws = s3_server.env("reader")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(PYTHONPATH=str(REPO), TEAM_S3_SECRET=aws["AWS_SECRET_ACCESS_KEY"], NO_PROXY="127.0.0.1")
    storage = (f'{{endpoint_url: "{s3_server.endpoint}", key: {aws["AWS_ACCESS_KEY_ID"]}, '
               'secret: "${TEAM_S3_SECRET}", client_kwargs: {region_name: us-east-1}}')
    out = vitpipe([*_pretrain_flags(tmp_path, **{"trainer.max_steps": 2}), f"--storage.s3={storage}"], env, tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (tmp_path / "ckpt" / "step-00000002" / "COMPLETE").is_file()


def test_literal_secrets_and_unset_references_are_refused(monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.data.storage import StorageConfig, apply_storage
    from pipeline.recipe import load_recipe

    with pytest.raises(ConfigError, match=r"storage: s3.secret: a literal secret in a recipe is refused"):
        load_recipe("mae/tiny_fmnist", {"storage.s3": "{secret: hunter2}"})
    with pytest.raises(ConfigError, match=r"s3.client_kwargs.aws_session_token: a literal secret"):
        load_recipe("mae/tiny_fmnist", {"storage.s3": "{client_kwargs: {aws_session_token: abc}}"})
    monkeypatch.delenv("VITPIPE_UNSET_SECRET", raising=False)
    with pytest.raises(ValueError, match="storage.s3.secret: environment variable VITPIPE_UNSET_SECRET is not set"):
        apply_storage(StorageConfig(s3={"secret": "${VITPIPE_UNSET_SECRET}"}))


def test_stream_survives_the_store_going_away(s3_server, s3_shards, monkeypatch):  # noqa: F811
    """The server is stopped mid-stream and started again 10 s later: the stream retries, continues where it
    was inside the shard, and the epoch still holds every sample exactly once."""
    import threading

    from s3fs import S3FileSystem

    from pipeline.data.manifest import load_manifest
    from pipeline.data.stream import ShardStream, StreamConfig
    from pipeline.data.tar_io import ReadRetry
    from pipeline.data.transforms import TransformConfig

    for key, value in s3_server.env("reader").items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()
    manifest = load_manifest(f"{SHARDS}/val")  # 10,000 images in 2 shards
    # 64 KiB ranged reads: an outage lands inside a shard, not only between two
    cfg = StreamConfig(shuffle=False, num_workers=0, read=ReadRetry(retries=8, backoff_s=1.0, block_size=1 << 16),
                       transform=TransformConfig(image_size=(16, 16)))
    stream = ShardStream(manifest.shard_urls(), [s.num_samples for s in manifest.shards], cfg, 100, seed=0)
    batches = iter(stream)
    keys = [k for _ in range(20) for k in next(batches)["key"]]  # 2,000 samples into the first shard
    s3_server.stop()
    restart = threading.Timer(10.0, s3_server.start)
    restart.start()
    try:
        rest = list(batches)
    finally:
        restart.join()
    keys += [k for b in rest for k in b["key"]]
    assert sum(b["skipped"] for b in rest) == 0
    assert len(keys) == len(set(keys)) == manifest.num_samples


def test_truncated_shard_object_is_skipped_and_counted(s3_server, s3_shards, monkeypatch):  # noqa: F811
    """A shard object cut short in the bucket: its unreadable samples are skipped and counted, the rest flow."""
    from s3fs import S3FileSystem

    from pipeline.data.manifest import load_manifest
    from pipeline.data.stream import ShardStream, StreamConfig
    from pipeline.data.transforms import TransformConfig

    for key, value in s3_server.env("admin").items():
        monkeypatch.setenv(key, value)
    S3FileSystem.clear_instance_cache()
    fs = S3FileSystem()
    src = load_manifest(f"{SHARDS}/val")
    # a copy of the held-out split whose second shard is cut in half
    fs.copy(f"{SHARDS}/val/", "vitpipe-shards/cut/", recursive=True)
    second = f"vitpipe-shards/cut/{src.shards[1].url}"
    data = fs.cat(second)
    fs.pipe(second, data[: len(data) // 2])
    manifest = load_manifest("s3://vitpipe-shards/cut")
    cfg = StreamConfig(shuffle=False, num_workers=0, transform=TransformConfig(image_size=(16, 16)))
    stream = ShardStream(manifest.shard_urls(), [s.num_samples for s in manifest.shards], cfg, 500, seed=0)
    batches = list(stream)
    delivered = sum(len(b["key"]) for b in batches)
    skipped = sum(b["skipped"] for b in batches)
    assert delivered + skipped == manifest.num_samples and 0 < skipped < src.shards[1].num_samples
    assert delivered > src.shards[0].num_samples  # all of the first shard and part of the second


def test_killed_run_resumes_mid_epoch_from_s3_with_the_same_samples(s3_server, s3_shards, tmp_path):  # noqa: F811
    """kill -9 while writing a checkpoint, resume: the same per-step sample keys as an uninterrupted run."""
    runner = [*PROGRAM, str(REPO / "tests" / "run_pretrain.py")]
    env = env_for(s3_server, "reader")

    def overrides(work: Path) -> str:
        o = tiny_overrides(Path("/unused"), work, **{
            "data.train": f"{SHARDS}/train", "data.val": f"{SHARDS}/val", "trainer.max_steps": 12,
            "checkpoint.every_n_steps": 4, "data.num_workers": 2, "data.interleave": 3,
            "trainer.sample_trace": work / "trace.jsonl"})
        return json.dumps(o)

    def run(work: Path, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*runner, overrides(work), *extra], env=env, capture_output=True, text=True,
                              timeout=600)

    assert run(tmp_path / "ref").returncode == 0
    killed = tmp_path / "killed"
    assert run(killed, "--kill-in-checkpoint-at", "8").returncode == -9
    second = run(killed)
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {killed / 'ckpt' / 'step-00000004'}" in second.stderr

    def trace(work: Path) -> dict[int, list[str]]:
        return {r["step"]: r["keys"] for r in map(json.loads, (work / "trace.jsonl").read_text().splitlines())}

    want, got = trace(tmp_path / "ref"), trace(killed)
    assert sorted(want) == list(range(1, 13))
    assert all(got[step] == want[step] for step in range(1, 13))


def test_mlflow_server_keeps_artifacts_and_models_in_the_same_store(s3_server, s3_shards, tmp_path,  # noqa: F811
                                                                    monkeypatch):
    """A tracking server started with --artifacts-destination s3://: the run's recipe, reconstructions and
    registered export land in the bucket through the server, and the model loads back by alias. The training
    process holds read-only credentials: it never writes to the store itself."""
    import s3fs
    from mlflow_server import MlflowServer
    from safetensors.torch import load_file

    from pipeline.registry import resolve_model

    admin = s3_server.env("admin")
    fs = s3fs.S3FileSystem(endpoint_url=s3_server.endpoint, key=admin["AWS_ACCESS_KEY_ID"],
                           secret=admin["AWS_SECRET_ACCESS_KEY"])
    if not fs.exists("vitpipe-mlflow"):
        fs.mkdir("vitpipe-mlflow")
    server = MlflowServer(tmp_path / "mlflow", artifacts="s3://vitpipe-mlflow/artifacts",
                          env={**admin, "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint})
    with server:
        flags = _pretrain_flags(tmp_path, **{"tracking.uri": server.uri, "register.name": "s3-mae",
                                             "register.alias": "candidate"})
        out = vitpipe(flags, env_for(s3_server, "reader"), tmp_path)
        assert out.returncode == 0, out.stderr[-3000:] + server.log_tail()
        stored = {key.rsplit("/", 1)[-1] for key in fs.find("vitpipe-mlflow/artifacts")}
        assert {"recipe.yaml", "reconstruction_step00000004.png", "encoder.safetensors", "mae.safetensors",
                "metadata.json"} <= stored
        monkeypatch.setenv("VITPIPE_CACHE", str(tmp_path / "cache"))
        ref = resolve_model("models:/s3-mae@candidate", server.uri)
    assert not (tmp_path / "mlflow" / "artifacts").exists()  # nothing on the server's disk
    registered = load_file(ref.folder / "encoder.safetensors")
    local = load_file(next((tmp_path / "ckpt" / "exports").glob("step-*/encoder.safetensors")))
    assert registered.keys() == local.keys() and all(registered[k].equal(local[k]) for k in local)
