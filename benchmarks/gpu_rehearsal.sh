#!/usr/bin/env bash
# Rehearses benchmarks/gpu_suite.sh as the GPU host runs it, on this machine's CPU: the host's software, not its
# hardware. A CPython 3.12 venv gets the GPU image's torch, torchvision, lightning and timm and the scientific
# stack it holds, and none of vitpipe's other dependencies; gpu_wheels.sh writes the wheels; gpu_suite.sh
# --wheels installs them offline, as on the host, and runs its --cpu-smoke. What this catches and CI does not:
# an API of the image's older torch or Lightning the suite relies on, and a wheel set that does not install.
#   benchmarks/gpu_rehearsal.sh [--python PYTHON3.12] [--venv DIR] [--wheels DIR]
# Needs PyPI (torch's CUDA build: about 3 GB to download, 5 GB in the venv), a CPython 3.12 (default: python3.12;
# with pyenv, e.g. --python ~/.pyenv/versions/3.12.1/bin/python3.12) and the project's own environment
# (scripts/install.sh) for gpu_wheels.sh. Run again, it reuses the venv and the wheels.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${TMPDIR:-/tmp}/vitpipe-gpu-rehearsal" wheels="$root/.whl" python=python3.12
while [ $# -gt 0 ]; do
  case "$1" in
    --python) python="$2"; shift 2 ;;
    --venv) venv="$2"; shift 2 ;;
    --wheels) wheels="$2"; shift 2 ;;
    *) echo "gpu_rehearsal.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
# the GPU image's versions (the device tool's package list, 2026-11): what the suite meets there
image=(torch==2.11.0 torchvision==0.26.0 lightning==2.6.6 pytorch-lightning==2.6.6 numpy==2.5.2 timm
       pillow pyyaml psutil fsspec scipy scikit-learn pandas pyarrow matplotlib)
if [ ! -x "$venv/bin/python" ]; then
  "$python" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null ||
    { echo "gpu_rehearsal.sh: $python is not a CPython 3.12 that runs (--python PATH names one)" >&2; exit 1; }
  "$python" -m venv "$venv"
  echo "gpu_rehearsal.sh: installing the GPU image's packages into $venv (torch's CUDA build: minutes)"
  "$venv/bin/python" -m pip install -q "${image[@]}"
fi
"$venv/bin/python" -c "import deepspeed" 2>/dev/null && { echo "gpu_rehearsal.sh: $venv already has deepspeed:" \
  "the offline install would not be rehearsed; remove the venv" >&2; exit 1; }
[ -d "$wheels" ] || "$root/benchmarks/gpu_wheels.sh" "$wheels"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# a copy of the venv (hard links: seconds, no space), so every rehearsal starts without deepspeed, webdataset and
# mlflow, as the host does; pip replaces files, it does not write into them, so the original stays as it was
cp -al "$venv" "$work/venv"
PYTHON="$work/venv/bin/python" "$root/benchmarks/gpu_suite.sh" --wheels "$wheels" --cpu-smoke --workdir "$work/run"
echo "gpu_rehearsal.sh: the suite ran on the GPU image's software (Python 3.12, torch 2.11, Lightning 2.6.6)"
