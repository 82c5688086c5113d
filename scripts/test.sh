#!/usr/bin/env bash
# Installs vitpipe (scripts/install.sh, with the Slurm packages the cluster-job tests use) and runs the test
# suite in VITPIPE_TEST_WORKERS (default 2) pytest-xdist worker processes, a test file to a worker (module
# fixtures such as test_zero's runs are made once), the longest files first (tests/conftest.py). Extra arguments
# go to pytest (`-n 0`: in this process).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install.sh" --with-slurm
cd "$root"
exec "${VITPIPE_VENV:-$root/.venv}/bin/python" -m pytest -p no:cacheprovider \
    -n "${VITPIPE_TEST_WORKERS:-2}" --dist loadfile --no-loadscope-reorder "$@"
