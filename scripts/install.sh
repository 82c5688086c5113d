#!/usr/bin/env bash
# Installs what vitpipe needs on a fresh Debian machine with Python 3.11:
#   - the Debian package dataset-fashion-mnist (the Fashion-MNIST IDX files the demo and the tests shard),
#   - g++ when no C++ compiler is there (trainer.compile on CPU builds its kernels with it),
#   - with --with-slurm, also slurmctld, slurmd, slurm-client and munge (only the cluster-job tests use them;
#     tests/slurm_cluster.py starts the daemons itself, nothing is enabled as a service),
#   - a virtual environment in .venv with torch/torchvision installed *first*, pinned by
#     scripts/constraints.txt so no later install swaps the build,
#   - vitpipe itself (editable) with the test extras.
# Idempotent: a second run only checks what is already there. Long steps print a line every 10 s.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${VITPIPE_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
with_slurm=0
for arg in "$@"; do
  case "$arg" in
    --with-slurm) with_slurm=1 ;;
    *) echo "install.sh: unknown option $arg (known: --with-slurm)" >&2; exit 2 ;;
  esac
done

say() { echo "install.sh: $*"; }

# Runs "$@", printing "<what>: still running (N s)" every 10 s so a long step never looks hung.
with_ticker() {
  local what="$1"; shift
  local start=$SECONDS
  "$@" &
  local pid=$! next=10
  while kill -0 "$pid" 2>/dev/null; do
    sleep 1
    if (( SECONDS - start >= next )) && kill -0 "$pid" 2>/dev/null; then
      say "$what: still running ($((SECONDS - start)) s)"
      next=$((next + 10))
    fi
  done
  wait "$pid"
}

required=() optional=()
[ -d /usr/share/datasets/fashion-mnist ] || required+=(dataset-fashion-mnist)
command -v g++ >/dev/null 2>&1 || optional+=(g++)
if [ "$with_slurm" = 1 ]; then
  for pkg in slurmctld slurmd slurm-client munge; do
    dpkg -s "$pkg" >/dev/null 2>&1 || optional+=("$pkg")
  done
fi
debs=("${required[@]}" "${optional[@]}")
if [ ${#debs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    say "Debian packages: ${debs[*]}"
    apt_get() { DEBIAN_FRONTEND=noninteractive apt-get -qq -o=Dpkg::Use-Pty=0 "$@" >/dev/null; }
    with_ticker "apt-get update" apt_get update
    with_ticker "apt-get install ${debs[*]}" apt_get install -y --no-install-recommends "${debs[@]}"
  elif [ ${#required[@]} -gt 0 ]; then
    say "missing Debian package: ${required[*]} (the Fashion-MNIST files); run as root or" \
        "'sudo apt-get install --no-install-recommends ${required[*]}'" >&2
    exit 1
  else
    say "not root: ${optional[*]} not installed (Slurm: the cluster-job tests are skipped; g++:" \
        "trainer.compile cannot build CPU kernels);" \
        "'sudo apt-get install --no-install-recommends ${optional[*]}' adds them"
  fi
fi

[ -x "$venv/bin/python" ] || { say "creating $venv"; "$python" -m venv "$venv"; }
pip=("$venv/bin/python" -m pip --disable-pip-version-check -q)
quiet() { grep -v "^WARNING: Location '.*' is ignored" >&2 || true; }  # noise from this machine's pip.conf
# torch/torchvision first, so nothing later pulls another build; the constraints keep them pinned after.
say "torch and torchvision (a few GB on a fresh machine: minutes)"
with_ticker "installing torch" "${pip[@]}" install -c "$root/scripts/constraints.txt" torch torchvision 2> >(quiet)
say "vitpipe and its dependencies (Lightning, timm, DeepSpeed, WebDataset, MLflow, ...)"
# uv (from PyPI, into the venv) resolves and installs these ~150 packages in seconds where pip takes minutes.
# It reads no pip configuration, which is fine here: torch, the only package this machine's pip settings
# constrain, is installed above, and constraints.txt pins it. Without uv, pip does the same.
if [ -x "$venv/bin/uv" ] || "${pip[@]}" install "uv==0.13.9" 2> >(quiet); then
  with_ticker "installing vitpipe" "$venv/bin/uv" pip install -q --compile-bytecode --python "$venv/bin/python" \
    -c "$root/scripts/constraints.txt" -e "$root[test]"
else
  with_ticker "installing vitpipe" "${pip[@]}" install -c "$root/scripts/constraints.txt" -e "$root[test]" 2> >(quiet)
fi
say "vitpipe installed in $venv; run $venv/bin/vitpipe --help"
