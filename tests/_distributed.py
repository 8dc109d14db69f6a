"""Multi-process test plumbing shared by the vocabulary-parallel tests: a gloo group of CPU processes that run
check functions one after the other, the rank's slice of an uneven vocabulary, and dtype-aware comparisons."""

import faulthandler
import importlib
import os
import sys
import warnings

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessExitedException


def spawn(tmp_path, world: int, *checks) -> None:
    """Runs ``check(rank, world)`` for each check, in order, in one gloo group of ``world`` processes (a spawn costs
    seconds, so a test runs many checks in one group). Checks are module-level functions, found again by name.

    A rank killed by SIGABRT ("terminate called without an active exception": about 1 spawn in 30 on a loaded
    2-core machine, on torch 2.11 and 2.14, before the workers skipped the interpreter's finalization) runs the
    whole group again, once, with a warning; a second abort, or any failed check, fails the test."""
    names = [(check.__module__, check.__name__) for check in checks]
    for attempt in range(2):
        try:
            mp.spawn(_worker, args=(world, f"file://{tmp_path}/store{attempt}", names), nprocs=world, join=True)
            return
        except ProcessExitedException as error:
            if error.signal_name != "SIGABRT" or attempt:
                raise
            warnings.warn(f"a gloo rank aborted ({error}); the checks run again once", stacklevel=2)


def _worker(rank: int, world: int, init: str, names) -> None:
    faulthandler.enable()  # a rank that aborts (SIGABRT, SIGSEGV) prints where its threads were
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for module, name in names:
            getattr(importlib.import_module(module), name)(rank, world)
        dist.barrier()  # no rank tears gloo's connections down while another still uses them
    finally:
        dist.destroy_process_group()
    # Leave without the interpreter's finalization, where gloo's worker threads can still hold work objects (from
    # the functional collectives, a DeviceMesh's groups) whose tensors reach for the GIL: a SIGABRT (pytorch#179291).
    sys.stdout.flush(), sys.stderr.flush()
    os._exit(0)


def shard_slice(rank: int, sizes) -> slice:
    """The slice of the vocabulary rank ``rank`` holds when the shards have the given sizes, in rank order."""
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def close(actual, expected, what: str) -> None:
    """fp32 / fp64: torch's default tolerances; bf16 / fp16: those of the kernels (tests/conftest.py's GRAD_TOL)."""
    if expected.dtype in (torch.bfloat16, torch.float16):
        scale = expected.float().abs().nan_to_num(posinf=0.0).max().item() if expected.numel() else 0.0
        rtol, atol = (1.6e-2, 4e-3 * scale) if expected.dtype == torch.bfloat16 else (2e-3, 1e-3 * scale)
        torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, msg=lambda m: f"{what}: {m}")
    else:
        torch.testing.assert_close(actual, expected, msg=lambda m: f"{what}: {m}")


def traffic_of(calls) -> dict:
    """{name: (forward, backward)} for ``calls`` {name: function returning a scalar loss}: the collectives (name,
    bytes sent by this rank) klops records over the call and over its backward, each held to CommDebugMode's count,
    so that no collective goes unrecorded."""
    from torch.distributed.tensor.debug import CommDebugMode

    from klops import vocab_parallel

    traffic = {}
    for name, call in calls.items():
        with vocab_parallel.record_traffic() as forward, CommDebugMode() as debug:
            loss = call()
        assert debug.get_total_counts() == len(forward), (name, debug.get_comm_counts(), forward)
        with vocab_parallel.record_traffic() as backward, CommDebugMode() as debug:
            loss.backward()
        assert debug.get_total_counts() == len(backward), (name, debug.get_comm_counts(), backward)
        traffic[name] = (forward, backward)
    return traffic
