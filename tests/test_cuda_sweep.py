"""The row sweep of the CUDA kernels (csrc/row_sweep.cuh) on the CPU: tests/csrc/sweep_check.cpp
compiles it with the host C++ compiler and runs it over every misalignment of the student, teacher and
gradient rows (bf16/fp16 and fp32, alone and mixed). Each pointer gets its own alignment: the body
is read and written 8 or 16 bytes at a time whatever the others' offsets, every entry once, and no
read leaves its row (see the program's header)."""

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("g++") is None, reason="needs a host C++ compiler (g++)")
def test_row_sweep_every_misalignment(tmp_path):
    binary = tmp_path / "sweep_check"
    flags = ["-std=c++17", "-O1", "-Wall", "-Werror", "-Wno-unknown-pragmas"]
    build = subprocess.run(["g++", *flags, "-o", str(binary), str(ROOT / "tests/csrc/sweep_check.cpp")],
                           capture_output=True, text=True)  # fmt: skip
    assert build.returncode == 0, build.stderr[-4000:]
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and run.stdout.startswith("ok "), run.stdout[-4000:]
