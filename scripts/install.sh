#!/usr/bin/env bash
# Installs everything vitpipe needs on a fresh Debian machine with Python 3.11:
#   - Debian packages (the Fashion-MNIST IDX files the demo shards; Slurm and munge for the job tests),
#   - a virtual environment in .venv with torch/torchvision installed *first*, pinned by
#     scripts/constraints.txt so no later install swaps the build,
#   - vitpipe itself (editable) with the test extras.
# Idempotent: a second run only checks what is already there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VITPIPE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"

# Debian packages: the Fashion-MNIST files, and Slurm + munge for the cluster-job tests (tests/slurm_cluster.py
# starts the daemons itself; nothing is enabled as a service).
debs=()
[ -d /usr/share/datasets/fashion-mnist ] || debs+=(dataset-fashion-mnist)
for pkg in slurmctld slurmd slurm-client munge; do
  dpkg -s "$pkg" >/dev/null 2>&1 || debs+=("$pkg")
done
if [ ${#debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${debs[@]}" >/dev/null
  else
    echo "install.sh: missing Debian packages: ${debs[*]}; run as root or 'sudo apt-get install ${debs[*]}'" >&2
    exit 1
  fi
fi

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
quiet() { grep -v "^WARNING: Location '.*' is ignored" >&2 || true; }  # noise from this machine's pip.conf
# torch/torchvision first, so nothing later pulls another build; the constraints keep them pinned after.
"${pip[@]}" install -c "$root/scripts/constraints.txt" torch torchvision 2> >(quiet)
"${pip[@]}" install -c "$root/scripts/constraints.txt" -e "$root[test]" 2> >(quiet)
echo "install.sh: vitpipe installed in $venv"
