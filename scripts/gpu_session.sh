#!/usr/bin/env bash
# One lease of a GPU machine (issue 21), run from the repository root there, its stages in the order given:
#
#   scripts/gpu_session.sh STAGE [STAGE ...]
#     test      the test suite on the GPU (cuda and triton backends, every dtype), 8 xdist workers sharing it,
#               interrupted after TEST_BUDGET seconds (default 300; the summary still prints)
#     bench     klops bench --out (BENCH_ARGS, default: the full GPU preset), starting no case after BENCH_BUDGET
#               seconds (default 240); its files come back as one archive
#     sanitize  compute-sanitizer memcheck, then racecheck, over the CUDA tests, SANITIZE_BUDGET seconds each
#               (default 120)
#
# Before the lease, here: scripts/gpu_wheels.sh (the baselines' wheels into .whl/). A lease has 15 minutes of
# device time, the machine's start included, and a call at most 10, so the plan is two calls:
#   run(command="scripts/gpu_session.sh test bench", carry=[".whl"], timeout_s=600)
#   run(command="BENCH_ARGS='...' scripts/gpu_session.sh sanitize bench", carry=[".whl"], timeout_s=...)
# (the second for the cases the first bench listed as not run), then give_back.
#
# Each call installs the wheels, then klops with klops._C (built for sm_90 when missing; a warm machine keeps the
# build), and writes its logs under $OUT. Copy what matters into bench/results/<device>/ and bench/NOTES.md.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: scripts/gpu_session.sh test|bench|sanitize [...]"; exit 2; }
out=${OUT:-/tmp/klops-gpu}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
exec > >(tee -a "$out/session.log") 2>&1

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site
fi
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

for stage in "$@"; do
    start=$SECONDS
    echo "=== $stage"
    case $stage in
    test)
        # The AOT compile test already runs in CI; everything else runs on the GPU. SIGINT lets pytest print its
        # summary and write the XML when the budget runs out.
        timeout -s INT "${TEST_BUDGET:-300}" python3 -m pytest -q -n 8 -p no:cacheprovider --timeout 240 -rfE \
            --tb=short --durations 10 --junitxml "$out/tests.xml" tests --ignore tests/test_triton_compile.py \
            >"$out/tests.log" 2>&1
        echo "pytest exit: $?"
        grep -E "^(FAILED|ERROR) |passed|failed" "$out/tests.log" | tail -40
        ;;
    bench)
        # shellcheck disable=SC2086  # BENCH_ARGS is a list of arguments
        python3 -m klops.cli bench ${BENCH_ARGS:-} --time-limit "${BENCH_BUDGET:-240}" --out "$out/bench"
        echo "klops bench exit: $?"
        tar czf "$out/bench.tar.gz" -C "$out" bench && rm -rf "$out/bench"
        ;;
    sanitize)
        for tool in memcheck racecheck; do
            timeout -s INT "${SANITIZE_BUDGET:-120}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
                python3 -m pytest -q -x -p no:cacheprovider tests/test_divergence.py tests/test_logprobs.py \
                tests/test_topk.py -k cuda >"$out/$tool.log" 2>&1
            echo "compute-sanitizer $tool exit: $?"
            grep -E "ERROR SUMMARY|passed|failed" "$out/$tool.log" | tail -5
        done
        ;;
    *)
        echo "unknown stage $stage: test, bench or sanitize"
        exit 2
        ;;
    esac
    echo "=== $stage took $((SECONDS - start)) s"
done
