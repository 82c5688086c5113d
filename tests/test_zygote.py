"""The test zygote (tests/zygote.py): a program started through ``PROGRAM`` runs as ``python`` would run it,
forked with the training stack already imported, and its starter sees it as its own process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import PROGRAM

from pipeline.data.worker_start import _start_time  # None once a process is gone (or a zombie)

SCRIPT = """
import json, os, signal, sys, time
if sys.argv[1] == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "name": __name__, "flag": os.environ.get("FLAG"),
                  "preloaded": "lightning" in sys.modules, "pid": os.getpid()}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
what = sys.argv[1]
if what == "kill":
    os.kill(os.getpid(), signal.SIGKILL)
if what == "raise":
    raise ValueError("boom")
if what == "wait":
    time.sleep(60)
sys.exit(int(what))
"""


@pytest.fixture
def script(tmp_path, child_env):
    path = tmp_path / "prog.py"
    path.write_text(SCRIPT)
    return path, child_env


def run(script, *args, **env) -> subprocess.CompletedProcess:
    path, base = script
    return subprocess.run([*PROGRAM, str(path), *args], env=dict(base, **env), cwd=path.parent,
                          capture_output=True, text=True, timeout=300)


def test_a_program_runs_forked_with_its_arguments_folder_environment_and_exit_code(script):
    if os.environ.get("VITPIPE_TEST_ZYGOTE", "off") == "off":
        pytest.skip("VITPIPE_TEST_ZYGOTE=off")
    out = run(script, "3", FLAG="x")
    assert out.returncode == 3, out.stderr
    got = json.loads(out.stdout)
    assert got == {"argv": [str(script[0]), "3"], "cwd": str(script[0].parent), "name": "__main__", "flag": "x",
                   "preloaded": True, "pid": got["pid"]}
    assert "to stderr" in out.stderr


def test_death_by_a_signal_and_an_uncaught_exception_reach_the_starter(script):
    assert run(script, "kill").returncode == -signal.SIGKILL
    raised = run(script, "raise")
    assert raised.returncode == 1 and "ValueError: boom" in raised.stderr


def test_another_start_up_environment_runs_in_a_process_of_its_own(script):
    out = run(script, "0", MALLOC_ARENA_MAX="2")  # glibc reads it as a process starts
    assert out.returncode == 0 and json.loads(out.stdout)["preloaded"] is False


def test_signals_to_the_stand_in_reach_the_program_and_killing_it_ends_the_program(script):
    for sig, code in ((signal.SIGTERM, 7), (signal.SIGKILL, -signal.SIGKILL)):
        proc = subprocess.Popen([*PROGRAM, str(script[0]), "wait"], env=script[1], stdout=subprocess.PIPE,
                                text=True)
        program = json.loads(proc.stdout.readline())["pid"]
        proc.send_signal(sig)
        assert proc.wait(timeout=60) == code
        deadline = time.monotonic() + 10
        while _start_time(program) is not None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _start_time(program) is None, f"the program outlived its stand-in after {sig!r}"
        proc.stdout.close()


def test_the_stand_in_starts_without_importing_torch():
    code = "import sys; sys.argv = ['zygote_client.py']; import zygote_client; print(sorted(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(PROGRAM[1]), capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "torch" not in out.stdout
