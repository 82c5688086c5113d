#!/usr/bin/env bash
# The GPU efficiency suite (benchmarks/gpu_suite.py) as one prepared script for a GPU host.
#   benchmarks/gpu_suite.sh [--wheels DIR] [--cpu-smoke] [other gpu_suite.py options]
# --wheels DIR: install what the host's Python lacks of deepspeed, webdataset and mlflow from wheels in DIR,
#   offline (pip --no-index), before running; torch, lightning and timm must be there already, and the host's
#   lightning and timm are replaced by the project's versions (pure Python, from DIR) where they differ.
#   benchmarks/gpu_wheels.sh DIR writes DIR, on a machine that reaches PyPI.
# Runs with .venv/bin/python when the project's environment exists, else python3 (PYTHON overrides), with the
# checkout on PYTHONPATH, so nothing else needs installing.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-}"
[ -n "$python" ] || { [ -x "$root/.venv/bin/python" ] && python="$root/.venv/bin/python" || python=python3; }
wheels="" args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  missing=()
  for mod in deepspeed webdataset mlflow; do
    "$python" -c "import $mod" 2>/dev/null || missing+=("$mod")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "gpu_suite.sh: installing ${missing[*]} from $wheels (offline)"
    if ! "$python" -m pip install -q --no-index --find-links "$wheels" "${missing[@]}"; then
      # the host's versions do not meet some requirement: keep every package the host has and add, without
      # resolving, each one it lacks
      lacking=$("$python" - "$wheels" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path
for wheel in sorted(Path(sys.argv[1]).glob("*.whl")):
    try:
        distribution(wheel.name.split("-")[0])
    except PackageNotFoundError:
        print(wheel)
EOF
)
      echo "gpu_suite.sh: resolving failed (above); adding what the host lacks without resolving:" $lacking
      # shellcheck disable=SC2086
      "$python" -m pip install -q --no-index --no-deps $lacking
    fi
    "$python" -c "import deepspeed, mlflow, webdataset" || { echo "gpu_suite.sh: still not importable" >&2; exit 1; }
  fi
  # the versions the tests passed on, for the two libraries vitpipe reaches into (timm's layers, Lightning's loops)
  # (only replaced: their dependencies are not in DIR, a host without them lacks those too)
  for name in lightning timm; do
    wheel=$(ls "$wheels/$name"-[0-9]*.whl 2>/dev/null | sort -V | tail -n 1 || true)
    [ -n "$wheel" ] || continue
    want=$(basename "$wheel" | cut -d- -f2)
    have=$("$python" -c "from importlib.metadata import version; print(version('$name'))" 2>/dev/null || true)
    if [ -n "$have" ] && [ "$have" != "$want" ]; then
      echo "gpu_suite.sh: $name $have -> $want (from $wheels, without its dependencies)"
      "$python" -m pip install -q --no-index --no-deps "$wheel"
    fi
  done
fi
export PYTHONUNBUFFERED=1  # each row's line reaches the log as it ends
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" "$root/benchmarks/gpu_suite.py" ${args[@]+"${args[@]}"}
