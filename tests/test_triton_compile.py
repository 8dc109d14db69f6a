"""Every Triton kernel variant compiles for real GPUs (sm_80, sm_90), down to a cubin via ptxas.

The interpreter that runs the numeric tests on the CPU accepts code the GPU compiler rejects (e.g. a
non-constexpr global), so this ahead-of-time compile is the CPU-only check that the kernels build.
It runs in a subprocess without TRITON_INTERPRET (see tests/triton_aot.py). The same compile checks
what the interpreter cannot see: no kernel spills registers at its launch config, and the online
sweeps cost one exponential per entry read.
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
    assert compiled[variant]["status"] == "ok", compiled[variant]["status"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_no_register_spills(variant, compiled):
    for kernel in compiled[variant]["kernels"]:
        if "local" not in kernel:
            pytest.skip("cuobjdump is not in this triton wheel")
        assert kernel["local"] == 0, kernel


# The first loop of each forward kernel is its online sweep: one exp per entry of each logit row it
# reads (student and teacher logits: 2; the student only: 1; Sinkhorn's soft-min: 1 per cost entry). The online
# updates once took two per entry.
SWEEP_EXPS = {"divergence-forward-logits-bf16-bf16-fwd": 2, "divergence-reverse-logits-bf16-bf16-fwd": 2,
              "divergence-jsd-logits-bf16-bf16-fwd": 2, "divergence-forward-logprobs-bf16-fp32-fwd": 1,
              "logprobs-entropy1-sm90": 1, "logprobs-entropy0-sm90": 1,
              "logprobs-entropy1-stats-sm90": 1, "logprobs-entropy0-stats-sm90": 1,
              "topk-forward-bin-bf16-fp32-k64": 1, "topk-backward-bf16-sm90": 1,
              "sinkhorn-softmin-cost-fp32-sm90": 1, "sinkhorn-softmin-cost-fp32-transposed-sm90": 1,
              "sinkhorn-points-l1-sm90": 1, "akl-loss-bf16-sm90": 2,
              "akl-kl-pair-bf16-sm90": 2}  # fmt: skip


@pytest.mark.parametrize("variant", sorted(SWEEP_EXPS))
def test_online_sweep_one_exp_per_entry(variant, compiled):
    forward = compiled[variant]["kernels"][0]
    assert forward["loop_exps_per_entry"][0] == SWEEP_EXPS[variant], forward
