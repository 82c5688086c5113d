#!/usr/bin/env bash
# Installs vitpipe (scripts/install.sh, with the Slurm packages the cluster-job tests use) and runs the test
# suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install.sh" --with-slurm
cd "$root"
exec "${VITPIPE_VENV:-$root/.venv}/bin/python" -m pytest -p no:cacheprovider "$@"
