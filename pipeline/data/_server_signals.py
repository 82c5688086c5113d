"""Imported only by the loader workers' fork server (``worker_start.PRELOAD``), before anything else: the
server ignores the signals its trainer handles (SIGUSR1, SIGTERM: checkpoint and stop; SIGUSR2: print stacks).
A scheduler sends them to every process of a job step, and the server must outlive them: the workers it
started stop when it does. It ends when its trainer does (multiprocessing closes its pipe)."""
import signal

for _sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):
    signal.signal(_sig, signal.SIG_IGN)
