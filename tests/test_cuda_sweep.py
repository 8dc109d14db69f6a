"""Pieces of the CUDA kernels run on the CPU, compiled with the host C++ compiler:
- the row sweep (csrc/row_sweep.cuh): tests/csrc/sweep_check.cpp runs it over every misalignment of the
  student, teacher and gradient rows (bf16/fp16 and fp32, alone and mixed). Each pointer gets its own
  alignment: the body is read and written 8 or 16 bytes at a time whatever the others' offsets, every entry
  once, and no read leaves its row;
- the online accumulators (csrc/online_stats.cuh): tests/csrc/online_check.cpp runs log-sum-exp, entropy and
  KL as a thread block would (strided pushes, then block_reduce's butterflies) against float64, with -inf
  entries and probability-0 masks facing -inf.
See each program's header."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler (g++)")
@pytest.mark.parametrize("program", ["sweep_check", "online_check"])
def test_host_check(program, tmp_path):
    binary = tmp_path / program
    flags = ["-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas"]
    build = subprocess.run(["g++", *flags, "-o", str(binary), str(ROOT / f"tests/csrc/{program}.cpp")],
                           capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout[-4000:]
