"""Loader workers start from a fork server where forking the trainer can hang (CPython gh-112275 with C++
threads entering Python): the server ignores the scheduler's signals, so neither it nor its workers die of
them, and a DataLoader's batches arrive as from forked workers; a trainer killed outright leaves neither
behind."""
from __future__ import annotations

import multiprocessing.forkserver
import os
import signal
import subprocess
import sys
import textwrap

import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.data.stream import _one_thread
from pipeline.data.worker_start import fork_may_hang, loader_options, needs_fork_server


class Numbers(IterableDataset):
    def __iter__(self):
        for i in range(40):
            yield torch.full((2,), float(i))


def test_the_versions_with_the_fork_bug():
    assert fork_may_hang((3, 11, 7)) and fork_may_hang((3, 12, 0))
    assert not any(fork_may_hang(v) for v in [(3, 11, 8), (3, 12, 1), (3, 13, 0)])


def test_a_single_cpu_process_forks_its_workers():
    assert not needs_fork_server(2) and not needs_fork_server(0)  # no process group, no CUDA here
    assert loader_options(2, _one_thread) == {"worker_init_fn": _one_thread}


def test_the_fork_server_and_its_workers_outlive_the_schedulers_signals():
    loader = DataLoader(Numbers(), batch_size=None, num_workers=1, **loader_options(1, _one_thread, server=True))
    got, batches = [], iter(loader)
    for i, x in enumerate(batches):
        if i == 5:
            server = multiprocessing.forkserver._forkserver._forkserver_pid
            for pid in (server, batches._workers[0].pid):
                for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):
                    os.kill(pid, sig)
        got.append(int(x[0]))
    assert got == list(range(40))


def test_a_killed_trainer_leaves_no_server_or_worker_behind(tmp_path):
    """They would hold its output open for ever: a caller waiting for it to end would wait for ever."""
    script = textwrap.dedent("""
        import os, signal, sys
        import torch
        from torch.utils.data import DataLoader, IterableDataset
        from pipeline.data.stream import _one_thread
        from pipeline.data.worker_start import loader_options

        class Forever(IterableDataset):
            def __iter__(self):
                while True:
                    yield torch.zeros(2)

        if __name__ == "__main__":
            for i, _ in enumerate(DataLoader(Forever(), batch_size=None, num_workers=2,
                                             **loader_options(2, _one_thread, server=True))):
                if i == 10:
                    print("workers", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
    """)
    (tmp_path / "killed.py").write_text(script)
    out = subprocess.run([sys.executable, str(tmp_path / "killed.py")], capture_output=True, text=True, timeout=60)
    assert out.returncode == -signal.SIGKILL and "workers" in out.stdout, out.stderr[-2000:]
