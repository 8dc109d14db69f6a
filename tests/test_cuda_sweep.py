"""Pieces of the CUDA kernels run on the CPU, compiled with the host C++ compiler:
- the row sweep (csrc/row_sweep.cuh): tests/csrc/sweep_check.cpp runs it over every misalignment of the
  student, teacher and gradient rows (bf16/fp16 and fp32, alone and mixed). Each pointer gets its own
  alignment: the body is read and written 8 or 16 bytes at a time whatever the others' offsets, every entry
  once, and no read leaves its row;
- the online accumulators (csrc/online_stats.cuh): tests/csrc/online_check.cpp runs log-sum-exp, entropy and
  KL as a thread block would (strided pushes, then block_reduce's butterflies) against float64, with -inf
  entries and probability-0 masks facing -inf;
- the divergence math (csrc/divergence_terms.cuh): tests/csrc/terms_check.cpp follows the forward and backward
  kernels of csrc/divergence.cu row by row, and its loss and gradient are compared here with the float64
  reference for every kind and teacher encoding.
See each program's header."""

import math
import pathlib
import shutil
import subprocess

import numpy as np
import pytest
import torch

from klops.divergence import DIVERGENCE_KINDS, TARGET_KINDS
from klops.kernels.kinds import infinite_where_p_is_0
from klops.reference import fused_kl_reference

from .conftest import COEF, GRAD_TOL, LOSS_TOL, assert_close

ROOT = pathlib.Path(__file__).resolve().parents[1]
FLAGS = ["-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas"]
needs_gxx = pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler (g++)")


def build(program: str, folder: pathlib.Path) -> pathlib.Path:
    binary = folder / program
    result = subprocess.run(["g++", *FLAGS, "-o", str(binary), str(ROOT / f"tests/csrc/{program}.cpp")],
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    return binary


@needs_gxx
@pytest.mark.parametrize("program", ["sweep_check", "online_check"])
def test_host_check(program, tmp_path):
    run = subprocess.run([str(build(program, tmp_path))], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout[-4000:]


@pytest.fixture(scope="module")
def terms_check(tmp_path_factory):
    return build("terms_check", tmp_path_factory.mktemp("terms_check"))


def cuda_divergence(binary, student, teacher, kind: str, target_is: str, temperature: float, coef: float):
    """(D per row, dD/dz, (max_t, logsum_t) per row) of the CUDA kernels' math run on the CPU by terms_check, for
    (N, V) fp32 rows."""
    N, V = student.shape
    header = np.array([N, V, DIVERGENCE_KINDS.index(kind), TARGET_KINDS.index(target_is)], np.int32).tobytes()
    data = np.concatenate([student.numpy().ravel(), teacher.numpy().ravel()]).astype(np.float32).tobytes()
    options = np.array([temperature, coef], np.float32).tobytes()
    run = subprocess.run([str(binary)], input=header + options + data, capture_output=True, timeout=60)
    assert run.returncode == 0, run.stderr[-2000:]
    out = torch.from_numpy(np.frombuffer(run.stdout, np.float32).copy())
    return out[:N], out[N : N + N * V].reshape(N, V), out[N + N * V :].reshape(2, N)


def terms_case(case: str, kind: str, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """(student, teacher logits): random (odd V); -inf in both (and teacher-only where D stays finite); masks of
    -1e30 (probability 0) facing -inf both ways; logits of 1e4."""
    scale = 1e4 if case == "large" else 2.0
    student, teacher = (torch.randn(6, 301, generator=gen, dtype=torch.float64).float() * scale for _ in range(2))
    if case == "neg_inf":
        student[:, 290:] = teacher[:, 290:] = -math.inf
        if not infinite_where_p_is_0(kind, *COEF.get(kind, {}).values()):  # as KL(q||p) is where p = 0 < q
            teacher[::2, 3:40:3] = -math.inf
    if case == "floored":
        student[:, 7::5], teacher[:, 7::5] = -math.inf, -1e30
        student[::2, 1:200:6], teacher[::2, 1:200:6] = -1e30, -math.inf
    return student, teacher


# Logits of 1e4 only as logits: as fp32 log-probs or probs they are 0 wherever the student is not (reverse KL inf).
TERMS_CASES = [(case, target) for case in ("random", "neg_inf", "floored", "large") for target in TARGET_KINDS
               if case != "large" or target == "logits"]  # fmt: skip


@needs_gxx
@pytest.mark.parametrize("case, target_is", TERMS_CASES)
@pytest.mark.parametrize("kind", DIVERGENCE_KINDS)
def test_cuda_divergence_math(kind, case, target_is, terms_check, gen):
    """The CUDA kernels' loss and gradient, their math run on the CPU, against the float64 reference."""
    student, teacher_logits = terms_case(case, kind, gen)
    teacher = {"logits": teacher_logits, "logprobs": torch.log_softmax(teacher_logits.double(), -1).float(),
               "probs": torch.softmax(teacher_logits.double(), -1).float()}[target_is]  # fmt: skip
    coef = COEF.get(kind, {})
    loss, grad, (top, log_mass) = cuda_divergence(
        terms_check, student, teacher, kind, target_is, 0.7, next(iter(coef.values()), 0.5)
    )
    if target_is != "logits":  # the statistics of the teacher's check: its largest log-prob or -prob, log of its mass
        p = teacher.double().exp() if target_is == "logprobs" else teacher.double()
        want = teacher.double().amax(-1) if target_is == "logprobs" else (-p).amax(-1)
        assert_close(top, want, (1e-6, 1e-7), "top")
        assert_close(log_mass, p.sum(-1).log(), (0, 1e-6), "log mass", floor=1e-6)
    leaf = student.double().requires_grad_()
    expected = fused_kl_reference(leaf, teacher, kind, temperature=0.7, reduction="none", target_is=target_is, **coef)
    expected.sum().backward()
    if case == "large":  # as test_divergence.test_large_logits
        assert_close(loss, expected.detach(), (1e-4, 1e-6), f"{kind} loss")
        assert_close(grad, leaf.grad, (1e-4, 1e-5), f"{kind} grad", floor=1e-6 * float(expected.abs().max()) / 0.7)
    else:
        assert_close(loss, expected.detach(), LOSS_TOL[torch.float32], f"{kind} loss")
        assert_close(grad, leaf.grad, GRAD_TOL[torch.float32], f"{kind} grad")
