"""Every Triton kernel variant compiles for real GPUs (sm_80, sm_90), down to a cubin via ptxas.

The interpreter that runs the numeric tests on the CPU accepts code the GPU compiler rejects (e.g. a
non-constexpr global), so this ahead-of-time compile is the CPU-only check that the kernels build.
It runs in a subprocess without TRITON_INTERPRET (see tests/triton_aot.py).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from .triton_aot import VARIANTS

pytest.importorskip("triton")
pytest.importorskip("triton.compiler", reason="this Triton has no ahead-of-time compile API")

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compiled():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    run = subprocess.run(
        [sys.executable, "-m", "tests.triton_aot"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kernel_compiles(variant, compiled):
    assert compiled[variant] == "ok", compiled[variant]
