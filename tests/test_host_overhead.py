"""benchmarks/host_overhead.py runs its rows (bare loop; vitpipe under auto, DDP and ZeRO-2) and its ZeRO loop
comparison, short and eager, on the CPU: the benchmark keeps working as the GPU suite it borrows from changes."""
from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import REPO
from mlflow_server import free_port

pytestmark = pytest.mark.slow
SCRIPT = str(REPO / "benchmarks" / "host_overhead.py")


def table_rows(stdout: str) -> list[list[str]]:
    lines = [line for line in stdout.splitlines() if line.startswith("| ") and "---" not in line]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_host_overhead_rows_and_zero_loops_run(tmp_path, child_env):
    out = subprocess.run([sys.executable, SCRIPT, "--rounds", "1", "--steps", "20", "--no-compile", "--workdir",
                          str(tmp_path)], env=child_env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    rows = table_rows(out.stdout)
    assert [r[0] for r in rows] == ["bare loop", "vitpipe, auto", "vitpipe, DDP", "vitpipe, ZeRO-2, contiguous_gradients on",
                                    "vitpipe, ZeRO-2 (recipe: contiguous_gradients off)"]
    assert rows[0][2] == "1.00x" and all(float(r[1]) > 0 and int(r[3]) > 0 for r in rows), rows

    out = subprocess.run([sys.executable, SCRIPT, "--zero"], env={**child_env, "MASTER_PORT": str(free_port())},
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert [r[0] for r in table_rows(out.stdout)] == ["gradient norm", "weights re-pointed", "used-parameter count"]
    norms, counts = out.stdout.split("(gradient norm: DeepSpeed's ")[1].split(")")[0].split("; ")
    ours, theirs = norms.split(", zero_host's ")  # "X, zero_host's Y"
    assert float(ours) == pytest.approx(float(theirs), rel=1e-6)
    assert counts.split(", ") == ["parameters counted: DeepSpeed 396", "zero_host 396"]
