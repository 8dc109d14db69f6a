#!/usr/bin/env bash
# Build a klops-kernels wheel with the CUDA extension klops._C for chosen GPU targets:
#
#   TORCH_CUDA_ARCH_LIST="8.0;9.0" scripts/build_wheel.sh [OUT_DIR]      (default OUT_DIR: dist/)
#
# Run it with the Python whose torch (a CUDA build) the wheel is for: the wheel's local version names that
# torch and the CUDA of nvcc (klops_kernels-0.1.0+cu130torch2.14-...whl), and klops loads klops._C only
# under the same torch major.minor and CUDA major. Needs nvcc: CUDA_HOME, else the newest /usr/local/cuda-*.
# TORCH_CUDA_ARCH_LIST defaults to setup.py's policy (8.0;8.9;9.0, and 10.0 with CUDA >= 12.8).
set -euo pipefail
cd "$(dirname "$0")/.."
out_dir=${1:-dist}
python=${PYTHON:-python}

if [ -z "${CUDA_HOME:-}" ]; then
    CUDA_HOME=$(ls -d /usr/local/cuda-* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$CUDA_HOME" ] || { echo "build_wheel.sh: set CUDA_HOME to the CUDA toolkit's prefix" >&2; exit 2; }
fi
export CUDA_HOME PATH="$CUDA_HOME/bin:$PATH" KLOPS_BUILD_CUDA=1
# torch's CUDA wheels ship the CUDA headers its own headers include (site-packages/nvidia/*/include).
nvidia_includes=$("$python" - <<'PY'
import glob, os, torch
root = os.path.join(os.path.dirname(os.path.dirname(torch.__file__)), "nvidia")
print(":".join(sorted(glob.glob(os.path.join(root, "*", "include")))))
PY
)
export CPATH="${nvidia_includes}${CPATH:+:$CPATH}"
"$python" -m pip wheel . --no-build-isolation --no-deps --wheel-dir "$out_dir"
ls "$out_dir"/klops_kernels-*.whl
