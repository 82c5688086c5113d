#!/usr/bin/env bash
# The wheels `benchmarks/gpu_suite.sh --wheels DIR` installs on a GPU host that reaches no package index: what
# vitpipe needs there beyond torch (mlflow, webdataset, deepspeed, and what they need; lightning and timm, which a
# PyTorch image has in some version), at the versions the project's environment runs, built or downloaded for the
# host's Python on x86-64 Linux.
#   benchmarks/gpu_wheels.sh DIR [--python-version 3.12] [--with-science]
# The scientific stack every PyTorch image holds (numpy, scipy, pandas, pyarrow, scikit-learn, matplotlib, pillow
# and the libraries they draw in) is left out unless --with-science: it is three quarters of the bytes, and
# gpu_suite.sh installs against what the host has. DeepSpeed publishes no wheel; it is built here (pure Python:
# its CUDA ops are compiled where they run, and vitpipe uses none of them).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$root/.venv/bin/python}"
out="" pyver="3.12" science=0
while [ $# -gt 0 ]; do
  case "$1" in
    --python-version) pyver="$2"; shift 2 ;;
    --with-science) science=1; shift ;;
    -*) echo "gpu_wheels.sh: unknown option $1" >&2; exit 2 ;;
    *) out="$1"; shift ;;
  esac
done
[ -n "$out" ] || { echo "usage: benchmarks/gpu_wheels.sh DIR [--python-version 3.12] [--with-science]" >&2; exit 2; }
mkdir -p "$out"
# the versions this environment runs, so the GPU host trains with what the tests passed on
pins=$("$python" - <<'EOF'
from importlib.metadata import version
print(" ".join(f"{name}=={version(name)}" for name in ("mlflow", "webdataset", "deepspeed", "lightning", "timm")))
EOF
)
echo "gpu_wheels.sh: $pins for CPython $pyver (x86-64 Linux) into $out"
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 \
           manylinux2014_x86_64 manylinux_2_5_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$tag")
done
pip_quiet() {  # pip's output only when it fails
  local log; log=$(mktemp)
  if ! "$python" -m pip "$@" >"$log" 2>&1; then cat "$log" >&2; rm -f "$log"; return 1; fi
  rm -f "$log"
}
read -r mlflow webdataset deepspeed lightning timm <<<"$pins"
target=(--only-binary=:all: --python-version "$pyver" --implementation cp "${platforms[@]}" -d "$out")
pip_quiet download "${target[@]}" "$mlflow" "$webdataset"
# deepspeed and what it needs besides torch (resolving it would pull torch itself, gigabytes)
pip_quiet wheel --no-deps --no-build-isolation -w "$out" "$deepspeed"
pip_quiet download --no-deps "${target[@]}" hjson py-cpuinfo msgpack ninja nvidia-ml-py einops psutil
pip_quiet download --no-deps "${target[@]}" "$lightning" "$timm"  # pure Python; their dependencies the image has
if [ "$science" = 0 ]; then
  for name in numpy scipy pandas pyarrow scikit_learn matplotlib pillow fonttools kiwisolver contourpy cycler \
              pyparsing joblib threadpoolctl narwhals python_dateutil six packaging pyyaml; do
    rm -f "$out/$name"-[0-9]*.whl
  done
fi
count=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
echo "gpu_wheels.sh: $count wheels, $(du -sh "$out" | cut -f1); on the GPU host: benchmarks/gpu_suite.sh --wheels $out"
