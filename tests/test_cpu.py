"""The C++ CPU kernels (klops/_cpu.py, csrc/cpu/): built on first use and never at import, cached under a key of the
torch version, the CPU capability, the flags and the sources; a missing or failing compiler makes backend="auto" take
"torch" with one warning that says why and backend="cpu" a ValueError; KLOPS_CPU_KERNELS=0 turns them off; the rows
are spread over torch's threads. Their numbers are checked with every other backend's (the `backend` fixture)."""

import json
import math
import os
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch

from klops import _cpu, backend

ROOT = pathlib.Path(__file__).resolve().parents[1]
needs_cpu_kernels = pytest.mark.skipif(_cpu.problem() is not None, reason=f"no CPU kernels: {_cpu.problem()}")

# In a fresh process: the warnings of backend="auto", the usable backends and the error of backend="cpu" on CPU tensors.
PROBE = """
import json, warnings, torch, klops
z, y = torch.randn(3, 50), torch.randn(3, 50)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(2):
        klops.fused_kl(z, y)
try:
    klops.logprobs(z, torch.tensor([1, 2, 3]), backend="cpu")
    error = None
except ValueError as e:
    error = str(e)
print(json.dumps({"warnings": [str(w.message) for w in caught], "error": error,
                  "usable": klops.available_backends(torch.device("cpu"))}))
"""


def probe(tmp_path, **env) -> dict:
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, cwd=ROOT, timeout=600,
                         env={**os.environ, "KLOPS_CACHE_DIR": str(tmp_path / "cache"), **env})  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("cxx, reason", [("/nonexistent/c++", "no C++ compiler: '/nonexistent/c++' (CXX) is not found"),
                                         ("false", "the build of the CPU kernels in ")])  # fmt: skip
def test_no_compiler_falls_back_to_torch(cxx, reason, tmp_path):
    """A missing compiler, or one that fails: "auto" warns once, saying why, and runs on torch; "cpu" raises."""
    if cxx == "false" and shutil.which("ninja") is None:
        pytest.skip("the failing build needs ninja")
    result = probe(tmp_path, CXX=cxx)
    assert len(result["warnings"]) == 1, result["warnings"]
    assert reason in result["warnings"][0] and "backend='auto' uses torch instead" in result["warnings"][0]
    assert result["error"].startswith("backend='cpu' is not available: ") and reason in result["error"]
    assert "use backend='torch'" in result["error"]
    assert "cpu" not in result["usable"]


def test_switched_off(tmp_path):
    """KLOPS_CPU_KERNELS=0: no build, no warning, "auto" takes torch and "cpu" says it is turned off."""
    result = probe(tmp_path, KLOPS_CPU_KERNELS="0")
    assert result["warnings"] == [] and "cpu" not in result["usable"]
    assert "turned off (KLOPS_CPU_KERNELS=0)" in result["error"]
    assert not (tmp_path / "cache").exists()


def test_import_builds_nothing(tmp_path):
    code = "import klops, klops.backend, torch; klops.fused_kl(torch.randn(2, 5), torch.randn(2, 5), backend='torch')"
    env = {**os.environ, "KLOPS_CACHE_DIR": str(tmp_path / "cache"), "CXX": "/nonexistent/c++"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert not (tmp_path / "cache").exists()


def test_cache_key_changes_with_sources_and_torch(tmp_path, monkeypatch):
    """Another source, another torch or another capability: another key, so a stale library is never loaded."""
    sources = tmp_path / "csrc"
    shutil.copytree(_cpu.csrc(), sources)
    monkeypatch.setattr(_cpu, "csrc", lambda: sources)
    key = _cpu.cache_key()
    assert _cpu.cache_key() == key
    with open(sources / "math.cuh", "a") as header:
        header.write("\n")
    edited = _cpu.cache_key()
    assert edited != key
    monkeypatch.setattr(torch, "__version__", "2.99.0")
    assert _cpu.cache_key() not in (key, edited)


def test_sources_are_the_packaged_ones():
    """Every source and header the build reads exists, and setup.py ships them (its package_data patterns)."""
    root = _cpu.csrc()
    for name in _cpu.HEADERS + _cpu.SOURCES:
        assert (root / name).is_file(), name
    assert sorted(str(p.relative_to(root)) for p in root.glob("cpu/*")) == sorted(
        n for n in _cpu.HEADERS + _cpu.SOURCES if n.startswith("cpu/")
    )


@needs_cpu_kernels
def test_rows_run_in_parallel():
    """at::parallel_for inside the library uses torch's threads (the libgomp torch loaded): every thread takes rows
    when there are enough of them, one thread for a single row."""
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("one intra-op thread")
    assert _cpu.parallel_threads(64, 32000) == threads
    assert _cpu.parallel_threads(1, 32000) == 1
    torch.set_num_threads(1)
    try:
        assert _cpu.parallel_threads(64, 32000) == 1
    finally:
        torch.set_num_threads(threads)


@needs_cpu_kernels
def test_auto_on_the_cpu_takes_the_cpu_kernels_where_an_op_has_them():
    cpu = torch.device("cpu")
    for op in backend.PREFERENCES:
        expected = "cpu" if "cpu" in backend.PREFERENCES[op][1] else "torch"
        assert backend.resolve(op, "auto", cpu, vocab=10, dtype=torch.float32) == expected, op
    assert backend.available_backends(cpu)[0] == "cpu"


def test_op_without_cpu_kernels_is_a_clear_error():
    with pytest.raises(ValueError, match=r"backend='cpu': sinkhorn has no C\+\+ CPU kernels \(csrc/cpu/\); use "):
        backend.resolve("sinkhorn", "cpu", torch.device("cpu"))


@needs_cpu_kernels
def test_cpu_kernels_check_their_inputs():
    """The C++ checks are a second line behind the Python ones: wrong shapes and dtypes raise, not crash."""
    z = torch.randn(1, 3, 10)
    with pytest.raises(RuntimeError, match="labels must have shape"):
        torch.ops.klops_cpu.logprobs_forward(z, torch.zeros(1, 2, dtype=torch.long), 1.0, False, False, -100)
    valid = torch.ones(1, 3, dtype=torch.bool)
    with pytest.raises(RuntimeError, match="must be float32, bfloat16 or float16"):
        torch.ops.klops_cpu.divergence_forward(z.double(), z.double(), valid, 0, 0, 1.0, 0.0)


@needs_cpu_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_written_over_the_logits_equal_the_new_tensors(dtype):
    """logprobs_backward_over_logits / divergence_backward_over_student (the chunked fused-linear path's in-place
    gradients) write exactly what logprobs_backward / divergence_backward return, the label's entry included
    wherever it falls (first, last, inside a block, past the first block of 1024), and refuse non-contiguous logits."""
    torch.manual_seed(0)
    V = 2500
    z = torch.randn(1, 6, V).mul_(3).to(dtype)
    z[0, 1, :700] = -math.inf
    labels = torch.tensor([[0, 1500, V - 1, 1023, 1024, -100]])
    y = torch.randn(1, 6, V).to(dtype)
    valid = labels != -100
    g, g_entropy = torch.randn(1, 6), torch.randn(1, 6)
    ops = torch.ops.klops_cpu
    _, entropy, max_z, logsum, *_ = ops.logprobs_forward(z, labels, 2.0, True, False, -100)
    args = (g, g_entropy, z, labels, max_z, logsum, entropy, 2.0, True, -100)
    expected = ops.logprobs_backward(*args)
    over = z.clone()
    ops.logprobs_backward_over_logits(*args[:2], over, *args[3:])
    assert torch.equal(over, expected)
    _, *stats = ops.divergence_forward(z, y, valid, 1, 0, 2.0, 0.0)
    args = (g, g_entropy, z, y, valid, labels.clamp(min=0), *stats[:5], 1, 0, 2.0, 0.0)
    expected = ops.divergence_backward(*args)
    over = z.clone()
    ops.divergence_backward_over_student(*args[:2], over, *args[3:])
    assert torch.equal(over, expected)
    strided = torch.randn(1, 6, 2 * V, dtype=dtype)[..., :V]  # unit stride within rows, rows 2 V apart
    with pytest.raises(RuntimeError, match="needs contiguous logits"):
        ops.logprobs_backward_over_logits(g, g_entropy, strided, labels, max_z, logsum, entropy, 2.0, True, -100)
