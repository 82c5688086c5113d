"""``python zygote_client.py ARGS...`` behaves as ``python ARGS...`` (a script or ``-m module``), run by the
test zygote (tests/zygote.py) when ``VITPIPE_TEST_ZYGOTE`` names one, with the Python stack already imported.

This process stays as the program's stand-in for whoever started it (a test, torchrun): it passes on the
signals it gets, and it ends as the program ended, with its exit code or by its signal. Without a zygote, or
where it declines, it becomes ``python ARGS...`` itself (exec). Imports only the standard library: it must
start in milliseconds.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import sys
import time

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP, signal.SIGQUIT)


def _exec_plain(args: list[str]) -> None:
    # the interpreter options this process was started with (e.g. torchrun's -u), then the program
    options = sys.orig_argv[1:sys.orig_argv.index(sys.argv[0])] if sys.argv[0] in sys.orig_argv else []
    os.execv(sys.executable, [sys.executable, *options, *args])


def _connect(spec: str, wait_s: float = 300.0) -> socket.socket | None:
    """The zygote's socket, waiting while its server is still importing; None once it has gone."""
    pid, path = spec.split(":", 1)
    deadline = time.monotonic() + wait_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except (FileNotFoundError, ConnectionRefusedError):
            sock.close()
            try:
                os.kill(int(pid), 0)
            except ProcessLookupError:
                return None
            if time.monotonic() > deadline:
                return None
            time.sleep(0.1)


def main() -> None:
    args = sys.argv[1:]
    spec = os.environ.get("VITPIPE_TEST_ZYGOTE", "")
    sock = _connect(spec) if ":" in spec else None  # "PID:SOCKET"; unset or "off": none
    if sock is None:
        _exec_plain(args)
    # Signals from now on are the program's. Until it runs they wait here; should it run as a process of its
    # own after all, they are delivered to this one, as they would have been to that process while it started.
    pending: list[int] = []
    started: list[socket.socket] = []

    def forward(num: int, _frame) -> None:
        if started:
            started[0].sendall(f"signal {num}\n".encode())
        else:
            pending.append(num)

    for sig in FORWARDED:
        signal.signal(sig, forward)

    def run_plain() -> None:
        sock.close()
        for sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        for num in pending:
            os.kill(os.getpid(), num)
        _exec_plain(args)

    payload = json.dumps({"args": args, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    try:
        socket.send_fds(sock, [struct.pack("!I", len(payload)) + payload], [0, 1, 2])
    except OSError:  # e.g. a standard stream is closed: nothing to hand on
        run_plain()
    replies = sock.makefile("rb")
    first = replies.readline().decode()
    if not first.startswith("pid "):
        run_plain()
    started.append(sock)
    for num in pending:
        sock.sendall(f"signal {num}\n".encode())
    line = replies.readline().decode()
    if not line.startswith("exit "):
        sys.exit("zygote_client: the zygote went away while the program ran")
    status = int(line.split()[1])
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        if sig in FORWARDED:
            signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    sys.exit(os.waitstatus_to_exitcode(status))


if __name__ == "__main__":
    main()
