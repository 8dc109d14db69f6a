#!/usr/bin/env bash
# One lease of a GPU machine (issue 21), in calls of under 10 minutes each, run from the repository root there:
#
#   scripts/gpu_session.sh test                      build klops._C for sm_90, then the test suite on the GPU
#                                                    (cuda and triton backends, every dtype; ~6 min budget)
#   scripts/gpu_session.sh bench [klops bench args]  klops bench (default: the full GPU preset) with --out
#   scripts/gpu_session.sh sanitize                  compute-sanitizer memcheck and racecheck over the CUDA tests
#
# Each stage installs klops (with klops._C, built once per machine: a warm machine keeps it between calls) and
# writes its log and results under $OUT (the device tool returns at most 8 files: the bench's files come back
# as one archive). Copy what matters into bench/results/<device>/ and bench/NOTES.md afterwards.
set -uo pipefail
stage=${1:?usage: scripts/gpu_session.sh test|bench|sanitize [klops bench args]}
shift
out=${OUT:-/tmp/klops-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee "$out/$stage.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', triton.__version__)"
if ! python3 -c "import klops._C" 2>/dev/null; then
    start=$SECONDS
    if ! KLOPS_BUILD_CUDA=1 TORCH_CUDA_ARCH_LIST=9.0 MAX_JOBS=16 python3 -m pip install -q --no-build-isolation \
        --no-deps -e .; then
        echo "klops._C BUILD FAILED: installing the pure-Python package (triton and torch backends only)"
        python3 -m pip install -q --no-build-isolation --no-deps -e .
    fi
    echo "install took $((SECONDS - start)) s"
fi
python3 -m klops.cli info

case $stage in
test)
    # The AOT compile test already runs in CI; everything else runs on the GPU, 8 workers sharing it.
    timeout 480 python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 300 --durations 15 \
        --junitxml "$out/tests.xml" tests --ignore tests/test_triton_compile.py
    echo "pytest exit: $?"
    ;;
bench)
    python3 -m klops.cli bench "$@" --out "$out/bench"
    echo "klops bench exit: $?"
    tar czf "$out/bench.tar.gz" -C "$out" bench && rm -rf "$out/bench"
    ;;
sanitize)
    for tool in memcheck racecheck; do
        timeout 240 compute-sanitizer --tool "$tool" --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider \
            tests/test_cuda_sweep.py tests/test_divergence.py tests/test_logprobs.py tests/test_topk.py -k cuda
        echo "compute-sanitizer $tool exit: $?"
    done
    ;;
*)
    echo "unknown stage $stage: test, bench or sanitize"
    exit 2
    ;;
esac
