"""A process that imports the training stack once and forks the tests' Python programs from itself.

A test that trains starts its program (``tests/run_pretrain.py``, ``python -m pipeline.cli``) as a new
process, under torchrun once per rank, and each of them used to import torch, Lightning, DeepSpeed, timm and
MLflow again: 12-15 s of CPU, most of a tiny run. ``tests/zygote_client.py`` stands in for ``python`` in such
a command: it hands its arguments, environment, working folder and standard streams to this server, which
forks a copy of itself to run the program, so a launch starts with those modules already imported. The
program and its arguments are unchanged, and the launcher still has a child of its own that takes signals and
ends as the program ends (its pid is the client's; the program runs in a process group of its own).

Protocol, one connection per program: the client sends a length-prefixed JSON request ``{"args", "env",
"cwd"}`` with its stdin, stdout and stderr as ancillary file descriptors. A *monitor*, forked per connection,
answers ``fallback`` (the client then runs the program itself: see ``mismatch``) or forks the program and
answers ``pid N``; it forwards ``signal N`` lines to the program, sends ``exit STATUS`` (the raw wait status)
when it ends, and kills the program's process group if the client goes away first (the client was killed).

Usage: python -u zygote.py SOCKET   (prints ``ready`` once it listens)
"""
from __future__ import annotations

import gc
import importlib
import json
import os
import select
import signal
import socket
import struct
import sys

# What the tests' programs import, heaviest first; imported once, here.
PRELOAD = (
    "torch", "lightning.pytorch", "deepspeed", "deepspeed.runtime.zero.muon.muon_optimizer", "timm", "mlflow",
    "mlflow.store.tracking.sqlalchemy_store", "s3fs", "pipeline.cli", "pipeline.stages.train",
    "pipeline.data.stream", "pipeline.evaluation.features", "fault_injection",
)
# Environment read when a process starts or when these modules load (the C runtime, OpenMP, Python's own
# start-up): a program asking for other values than this server started with runs in a process of its own.
STARTUP_PREFIXES = ("PYTHON", "OMP_", "KMP_", "GOMP_", "MKL_", "MALLOC_", "LD_", "CUDA_", "DS_")
PER_PROGRAM = {"PYTHONUNBUFFERED"}
# OpenMP reads it as torch loads; a program may bring it where this server has none (torchrun sets it to 1 for
# several ranks a node), and then takes it as torch.set_num_threads.
THREADS = "OMP_NUM_THREADS"


def startup_env(env: dict[str, str]) -> dict[str, str]:
    """The part of ``env`` that must equal the server's; PYTHONPATH compared by its entries."""
    out = {k: v for k, v in env.items() if k.startswith(STARTUP_PREFIXES) and k not in PER_PROGRAM}
    if "PYTHONPATH" in out:
        out["PYTHONPATH"] = os.pathsep.join(p for p in out["PYTHONPATH"].split(os.pathsep) if p)
    return {k: v for k, v in out.items() if v}


def mismatch(request: dict) -> str | None:
    """Why ``request`` cannot run in a fork of this process; None when it can."""
    want, have = startup_env(request["env"]), startup_env(dict(os.environ))
    if THREADS not in have:
        want.pop(THREADS, None)
    diff = sorted(k for k in want.keys() | have.keys() if want.get(k) != have.get(k))
    return f"start-up environment differs: {', '.join(diff)}" if diff else None


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    size = struct.unpack("!I", data[:4])[0]
    data = data[4:]
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            raise ConnectionError("the client closed the connection mid-request")
        data += chunk
    return json.loads(data), fds


def _monitor(conn: socket.socket) -> dict | None:
    """Runs in a fork per connection. Returns the request in the program's process; never returns in the
    monitor itself."""
    try:
        request, fds = _receive(conn)
        if (why := mismatch(request)) is not None:
            conn.sendall(f"fallback {why}\n".encode())
            os._exit(0)
        pid = os.fork()
        if pid == 0:
            conn.close()
            os.setpgid(0, 0)  # the monitor kills the program and everything it started as one group
            for target, fd in enumerate(fds):
                os.dup2(fd, target)
                os.close(fd)
            return request
        for fd in fds:
            os.close(fd)
        conn.sendall(f"pid {pid}\n".encode())
        _watch(conn, pid)
    except BaseException:  # noqa: BLE001 - the monitor must never fall through into the server's loop
        os._exit(1)
    os._exit(0)


def _watch(conn: socket.socket, pid: int) -> None:
    ended = os.pidfd_open(pid)
    pending = b""
    while True:
        ready, _, _ = select.select([conn, ended], [], [])
        if ended in ready:
            _, status = os.waitpid(pid, 0)
            conn.sendall(f"exit {status}\n".encode())
            return
        chunk = conn.recv(256)
        if not chunk:  # the client is gone (killed): so goes its program, as a process of its own would not,
            try:       # but a test's timeout must not leave ranks behind in a collective
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            os.waitpid(pid, 0)
            return
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.startswith(b"signal "):
                try:
                    os.kill(pid, int(line.split()[1]))
                except ProcessLookupError:
                    pass


def serve(path: str) -> dict:
    """Listens on ``path`` while the test session lives; returns a request only in a program's process."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps finished monitors
    print("ready", flush=True)
    owner = os.getppid()
    while True:
        if not select.select([server], [], [], 5.0)[0]:
            if os.getppid() != owner:  # the test session is gone (killed): so is the need for this server
                os._exit(0)
            continue
        conn, _ = server.accept()
        if os.fork() == 0:
            server.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the monitor waits for its program
            request = _monitor(conn)
            if request is not None:
                return request
        conn.close()


def run(request: dict) -> None:
    """Becomes ``python *args`` as started in ``request['cwd']`` with ``request['env']``."""
    import runpy

    signal.signal(signal.SIGINT, signal.default_int_handler)
    os.environ.clear()
    os.environ.update(request["env"])
    if THREADS in os.environ:
        import torch

        torch.set_num_threads(int(os.environ[THREADS]))
    os.chdir(request["cwd"])
    args = request["args"]
    if args[0] == "-m":
        sys.path[0] = os.getcwd()
        sys.argv = [args[1], *args[2:]]  # runpy puts the module's file in argv[0]
        sys.modules.pop(args[1], None)  # as in a new process, where __main__ is its only copy so far
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    else:
        script = os.path.abspath(args[0])
        sys.path[0] = os.path.dirname(script)
        sys.argv = [args[0], *args[1:]]
        runpy.run_path(script, run_name="__main__")


def main() -> None:
    path = sys.argv[1]
    for name in PRELOAD:
        importlib.import_module(name)
    import threading

    import torch

    # A fork copies only the calling thread: a Python thread would be missing in the programs, and CUDA cannot
    # be forked. (Native pools that handle fork themselves, as OpenBLAS's and jemalloc's, are there in every
    # loader worker forked from a trainer too.)
    if threading.active_count() != 1 or torch.cuda.is_initialized():
        sys.exit(f"zygote: not forking: {threading.active_count()} Python threads, "
                 f"CUDA initialised: {torch.cuda.is_initialized()}")
    # Into the permanent generation: no collection in a program traverses them (and so copies their pages).
    gc.freeze()
    request = serve(path)
    run(request)


if __name__ == "__main__":
    main()
