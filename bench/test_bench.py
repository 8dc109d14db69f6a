"""pytest-benchmark suite: forward + backward of each op and its PyTorch baselines.

    pytest bench/ --benchmark-only                 # the quick cases on this machine's device
    KLOPS_BENCH_FULL=1 pytest bench/ --benchmark-only

Not part of the test suite (``testpaths`` is ``tests``); ``klops bench`` prints the same cases with
peak memory and bandwidth fractions. Each pair's first call (``first_call_ms`` in its extra_info) is timed
before the warm-ups, as ``klops bench`` times it.
"""

import os

import pytest
import torch

from klops import bench

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
CASES = bench.cases(DEVICE, quick=os.environ.get("KLOPS_BENCH_FULL") != "1")
PAIRS = [(case, name) for case in CASES for name in bench.implementations(case, DEVICE)]


@pytest.mark.parametrize("case, impl_name", PAIRS, ids=[f"{c.name} | {n}" for c, n in PAIRS])
def test_forward_backward(benchmark, case, impl_name):
    impl = bench.implementations(case, DEVICE)[impl_name]
    z, y = bench.make_inputs(case, DEVICE, torch.Generator().manual_seed(0))
    z.requires_grad_()

    def step():
        impl(z, y).backward()
        z.grad = None
        if DEVICE.type == "cuda":
            torch.cuda.synchronize()

    benchmark.extra_info["min_bytes"] = case.min_bytes()
    # The pair's first call, before the warm-ups: in the first pair of an op, its imports and compiles.
    benchmark.extra_info["first_call_ms"] = bench.call_ms(step, DEVICE)
    benchmark.pedantic(step, rounds=10, warmup_rounds=2)
