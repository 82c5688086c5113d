#!/usr/bin/env bash
# Installs vitpipe (scripts/install.sh) and runs the test suite. Extra arguments go to pytest.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/install.sh"
cd "$root"
exec "${VITPIPE_VENV:-$root/.venv}/bin/python" -m pytest -p no:cacheprovider "$@"
