"""The fault table's rows that belong in every run of the suite (benchmarks/faults.py runs them all)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


def test_fault_rows_recover_without_losing_or_repeating_samples(tmp_path, child_env):
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "faults.py"), "--rows",
                          "nan,damaged,enospc,mlflow", "--work", str(tmp_path), "--json", str(tmp_path / "rows.json")],
                         env=child_env, capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stdout + out.stderr[-4000:]
    rows = {r["fault"].split(" ")[0]: r for r in json.loads((tmp_path / "rows.json").read_text())}
    assert all(r["recovered"] and r["lost"] == 0 and r["repeated"] == 0 for r in rows.values()), rows
    assert rows["NaN"]["by_design"] == 16 and rows["NaN"]["redone"] == 0  # one skipped batch, nothing redone
    assert rows["newest"]["redone"] == 8  # killed writing step 12, step 8 damaged: steps 5..12 again from 4
    assert rows["no"]["redone"] == 4 and rows["MLflow"]["recovered"]
    assert "| fault | recovered |" in out.stdout
