"""Shared fixtures: tiny Fashion-MNIST shards and a tiny recipe built on the fly."""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
FMNIST = "/usr/share/datasets/fashion-mnist"


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory) -> Path:
    """2,000 training + 500 held-out Fashion-MNIST images in shards of 300 (uneven last shard on purpose)."""
    if not Path(FMNIST).is_dir():
        pytest.fail(f"{FMNIST} missing: scripts/install.sh installs the Debian package dataset-fashion-mnist")
    from pipeline.data.sharding import write_split
    from pipeline.data.sources import FashionMNISTSource

    out = tmp_path_factory.mktemp("fmnist")
    for split, n in (("train", 2000), ("val", 500)):
        source = FashionMNISTSource(FMNIST, split, limit=n)
        write_split(source, source.items(), str(out / split), split, shard_size=300, workers=2, log=lambda _: None)
    return out


# The files that take longest (a `--durations=0` run of the whole suite), first: scripts/test.sh hands whole
# files to its workers in collection order, and a long file handed out last would keep one worker busy alone
# at the end. The other files follow in their usual order.
LONGEST_FIRST = ("test_zero.py", "test_s3.py", "test_slurm.py", "test_guard.py", "test_jobs.py",
                 "test_preemption.py", "test_tracking_credentials.py", "test_demo.py", "test_resume.py",
                 "test_faults.py", "test_gpu_suite.py", "test_deit_train.py", "test_pretrain.py", "test_monitor.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: each file keeps its order


@functools.cache
def _store_template() -> Path:
    """An empty MLflow SQLite store, made once per test session (per pytest process)."""
    from mlflow import MlflowClient

    folder = Path(tempfile.mkdtemp(prefix="vitpipe-mlflow-template-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    MlflowClient(f"sqlite:///{folder / 'mlflow.db'}").search_experiments()  # creates the schema
    return folder / "mlflow.db"


def mlflow_store(folder: Path) -> str:
    """The URI of an MLflow SQLite store at ``folder/mlflow.db``, copied from the session's empty store when
    there is none yet. MLflow makes a new store by running every one of its schema migrations (2-3 s on a CI
    machine, most of a tiny run's tracking cost); a copy holds the same schema and opens in a tenth of a second.
    The template is made in the tests' working directory, as a run's store would be, so even its unused Default
    experiment is the same. The demo and CLI tests still have their stores made by the run."""
    db = folder / "mlflow.db"
    if not db.exists():
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(_store_template(), db)
    return f"sqlite:///{db}"


def tiny_overrides(shards: Path, work: Path, **extra) -> dict[str, str]:
    """Overrides that shrink the demo recipe to a model and run that take seconds on CPU; without a
    ``tracking.uri`` of the caller's, the run tracks to a store in ``work`` (``mlflow_store``)."""
    base = {
        "model.encoder.size": "tiny", "model.encoder.depth": "2", "model.encoder.embed_dim": "64",
        "model.encoder.num_heads": "4", "model.encoder.image_size": "[16, 16]", "model.encoder.patch_size": "4",
        "model.decoder.depth": "1", "model.decoder.dim": "32", "model.decoder.num_heads": "4",
        "data.train": str(shards / "train"), "data.val": str(shards / "val"),
        "trainer.global_batch": "16", "trainer.max_steps": "8", "optim.warmup_steps": "2",
        "checkpoint.dir": str(work / "ckpt"), "checkpoint.every_n_steps": "4",
        # a store of the caller's (a server, a shared file) is used as given: nothing copied into work
        "tracking.uri": extra["tracking.uri"] if "tracking.uri" in extra else mlflow_store(work),
        "tracking.recon_every_n_steps": "4",
    }
    base.update({k: str(v) for k, v in extra.items()})
    return base


def child_environ() -> dict[str, str]:
    """This process's environment with the repository first on PYTHONPATH: what a child program runs with."""
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.fixture
def child_env() -> dict[str, str]:
    return child_environ()


PYTHON = sys.executable
# ``[*PROGRAM, "script.py" | "-m", "module", args...]`` runs like ``[PYTHON, ...]``, forked from the session's
# zygote (tests/zygote.py) with torch, Lightning, DeepSpeed, timm and MLflow already imported.
PROGRAM = (PYTHON, str(REPO / "tests" / "zygote_client.py"))


@pytest.fixture(scope="session", autouse=True)
def zygote():
    """Starts the zygote for this pytest process and names it in ``VITPIPE_TEST_ZYGOTE``, which every child
    environment copies. It imports in the background; a client waits for it. ``VITPIPE_TEST_ZYGOTE=off``:
    each program starts as a process of its own."""
    if os.environ.get("VITPIPE_TEST_ZYGOTE") == "off":
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="vz-"))  # a short path: a socket's is at most 107 bytes
    log = open(folder / "zygote.log", "w")
    proc = subprocess.Popen([PYTHON, "-u", str(REPO / "tests" / "zygote.py"), str(folder / "socket")],
                            env=child_environ(),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    os.environ["VITPIPE_TEST_ZYGOTE"] = f"{proc.pid}:{folder / 'socket'}"
    yield proc
    os.environ.pop("VITPIPE_TEST_ZYGOTE", None)
    proc.kill()
    proc.wait()
    log.close()
    shutil.rmtree(folder, ignore_errors=True)


def run_process_tree(cmd: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """``cmd`` with its output captured. On timeout it and every process it started are killed before
    ``TimeoutExpired`` propagates: torchrun starts each rank in a session of its own, and ranks stuck in a
    collective would outlive the caller."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        for child in psutil.Process(proc.pid).children(recursive=True):
            child.kill()
        proc.kill()
        proc.communicate()
        raise
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)
