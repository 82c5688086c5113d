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
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.context
import sys

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


def forkserver_context() -> multiprocessing.context.BaseContext:
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)  # read when the server starts (once per process)
    return ctx


def worker_context(num_workers: int) -> multiprocessing.context.BaseContext | None:
    """The multiprocessing context a DataLoader's workers start in; None: the default (fork)."""
    if num_workers == 0 or not fork_may_hang() or not _threads_enter_python():
        return None
    return forkserver_context()
