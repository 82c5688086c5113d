"""How loader worker processes start: forked from the trainer, or from a fork server where forking the
trainer can hang.

CPython before 3.11.8 and 3.12.1 can leave a forked child blocked for ever on a lock the fork copied while
another thread held it (gh-112275: the child takes the interpreter's thread-list lock before resetting it).
A thread holds that lock while it creates or deletes its Python thread state, which C++ threads do without
the GIL whenever they enter Python: the process group's run loops (gloo, NCCL) releasing tensors, the autograd
engine's device threads running hooks. A loader worker forked at that moment never starts, and its rank waits
for its first batch for ever while the other ranks wait for it in a collective.

There, the workers start from multiprocessing's fork server instead: a fresh single-threaded process (fork +
exec) that forks each worker. It imports the loaders' modules once, and ``_server_signals`` (imported there
first) makes it ignore the signals its trainer handles: a scheduler signals every process of a job step, and
a server that died of SIGUSR1 would take the workers it started with it. A single CPU process has no such
threads and keeps forking itself, the fastest start.

A fork server's workers are not their trainer's children, so torch's check that a worker's parent lives
watches the server; and the server lives while any worker holds its pipe, which each does. A trainer that is
killed (SIGKILL, the OOM killer) would leave both behind for ever, holding the job's output open. Each such
worker watches its trainer instead (``watch_owner``) and exits when it is gone.
"""
from __future__ import annotations

import functools
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

FIXED = ((3, 11, 8), (3, 12, 1))  # the first releases of each line with gh-112275 fixed
PRELOAD = ["pipeline.data._server_signals", "pipeline.data.stream", "pipeline.evaluation.features"]


def fork_may_hang(version: tuple[int, ...] = tuple(sys.version_info[:3])) -> bool:
    """Whether this CPython has gh-112275."""
    return version < FIXED[0] or (3, 12) <= version < FIXED[1]


def _threads_enter_python() -> bool:
    """Whether C++ threads of this process may enter Python: a process group of several ranks, or CUDA."""
    group = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    return group or torch.cuda.is_initialized()


def needs_fork_server(num_workers: int) -> bool:
    """Whether a DataLoader's workers here start from the fork server rather than a fork of this process."""
    return num_workers > 0 and fork_may_hang() and _threads_enter_python()


def loader_options(num_workers: int, init: Callable[[int], None] | None = None,
                   server: bool | None = None) -> dict[str, Any]:
    """``DataLoader`` keywords for its workers: how they start (``server``: the fork server; None: where a fork
    can hang) and ``init``, run in each, after the watch of its trainer when a fork server started it."""
    if server is None:
        server = needs_fork_server(num_workers)
    if not server or num_workers == 0:
        return {"worker_init_fn": init}
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (once per process)
    return {"multiprocessing_context": ctx,
            "worker_init_fn": functools.partial(_watched_init, os.getpid(), _start_time(os.getpid()), init)}


def _start_time(pid: int) -> str | None:
    """When ``pid`` started (clock ticks since boot), which tells it from a later process given the same pid;
    None once it has ended, also while it waits to be reaped (a zombie: its parent may be waiting for the very
    output its workers hold open)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if len(fields) < 20 or fields[0] in "ZX" else fields[19]


def _watched_init(owner: int, started: str | None, init: Callable[[int], None] | None, worker_id: int) -> None:
    threading.Thread(target=watch_owner, args=(owner, started), name="owner-watch", daemon=True).start()
    if init is not None:
        init(worker_id)


def watch_owner(owner: int, started: str | None, every_s: float = 1.0) -> None:
    """Ends this process once ``owner`` (which started at ``started``) is gone."""
    while _start_time(owner) == started:
        time.sleep(every_s)
    os._exit(0)
