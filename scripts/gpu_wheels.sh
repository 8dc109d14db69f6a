#!/usr/bin/env bash
# The bench baselines and test references that the GPU machine's image lacks (it has torch, triton, numpy, scipy,
# pytest, pytest-xdist, pytest-timeout, hypothesis and matplotlib, and no network), as wheels for its Python 3.12 on
# x86-64, into .whl/ (git-ignored). Run here before a lease; the device call names .whl in carry, and
# scripts/gpu_session.sh installs them there:
#   liger-kernel       Liger-Kernel baselines (fused linear cross-entropy / JSD, chunked GRPO, JSD on logits)
#   cut-cross-entropy  Cut Cross-Entropy baseline of the fused-linear cases
#   pot                POT: the Sinkhorn baselines and the Sinkhorn tests' reference (33 MB of the 64 MiB a call carries)
# Each needs only packages the image has (torch, triton, numpy, scipy), so no dependency travels.
set -euo pipefail
cd "$(dirname "$0")/.."
platforms=()
for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
    platforms+=(--platform "$tag")
done
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1" "pot==0.9.7.post1"
ls -l .whl
