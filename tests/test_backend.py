"""Which backend runs, and when the CUDA extension is not used (built against another torch or CUDA)."""

import os
import subprocess
import sys
import types
import warnings

import pytest
import torch

from klops import backend


def fake_extension(torch_version: str, cuda_version: str):
    return types.SimpleNamespace(torch_version=lambda: torch_version, cuda_version=lambda: cuda_version)


@pytest.fixture
def extension_found(monkeypatch):
    """Pretend klops._C exists and imports as the module the test gives."""

    def use(module):
        monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object())
        monkeypatch.setattr(backend.importlib, "import_module", lambda name: module)

    return use


def test_not_built_is_no_problem(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    assert backend._load_cuda_extension() == (None, None)


def test_same_torch_and_cuda_is_used(monkeypatch, extension_found):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    module = fake_extension(torch.__version__.split("+")[0], "13.0")
    extension_found(module)
    assert backend._load_cuda_extension() == (module, None)


@pytest.mark.parametrize("built", [("2.0.1", "13.0"), (None, "12.8")])
def test_other_torch_or_cuda_is_not_used(built, monkeypatch, extension_found):
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    built_torch = built[0] or torch.__version__.split("+")[0]
    extension_found(fake_extension(built_torch, built[1]))
    extension, problem = backend._load_cuda_extension()
    assert extension is None
    assert f"built against torch {built_torch} with CUDA {built[1]}" in problem and "KLOPS_BUILD_CUDA=1" in problem


def test_failed_import_is_named(monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: object())

    def fail(name):
        raise ImportError("undefined symbol: _ZN3c10...")

    monkeypatch.setattr(backend.importlib, "import_module", fail)
    extension, problem = backend._load_cuda_extension()
    assert extension is None and "klops._C does not load (undefined symbol" in problem


def test_unusable_extension_errors_and_warns_once(monkeypatch):
    """backend='cuda' names the problem; 'auto' on a GPU tensor warns once and falls back."""
    monkeypatch.setattr(backend, "CUDA_EXTENSION_PROBLEM", "klops._C was built against torch 2.0.1")
    monkeypatch.setattr(backend, "_warned_fallback", False)
    with pytest.raises(ValueError, match="backend='cuda' is not available: klops._C was built against torch 2.0.1"):
        backend.resolve("divergence", "cuda", torch.device("cpu"))
    monkeypatch.setattr(backend, "available_backends", lambda device: ["triton", "torch"])
    with pytest.warns(UserWarning, match="built against torch 2.0.1. backend='auto' uses triton instead"):
        assert backend.resolve("divergence", "auto", torch.device("cuda")) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve("divergence", "auto", torch.device("cuda")) == "triton"


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    if backend.CUDA_EXTENSION_PROBLEM is not None:
        pytest.skip("klops._C is present but unusable here")
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu tensors here"):
        backend.resolve("divergence", "cuda", torch.device("cpu"))


@pytest.mark.parametrize("usable, expected", [(["cuda", "triton", "torch"], "triton"), (["cuda", "torch"], "cuda"),
                                              (["triton", "torch"], "triton")])  # fmt: skip
def test_fused_linear_auto_prefers_triton_on_a_gpu(monkeypatch, usable, expected):
    """The fused-linear ops' auto: their Triton kernels wherever Triton runs on a GPU, else the chunked CUDA path;
    an explicit backend is kept, and CPU tensors take the chunked path over the C++ row kernels, else torch."""
    monkeypatch.setattr(backend, "CUDA_EXTENSION_PROBLEM", None)
    on_cpu = ["cpu", "torch"]
    monkeypatch.setattr(backend, "available_backends", lambda device: usable if device.type == "cuda" else on_cpu)
    assert backend.resolve("linear", "auto", torch.device("cuda")) == expected
    assert backend.resolve("linear", usable[0], torch.device("cuda")) == usable[0]
    assert backend.resolve("linear", "auto", torch.device("cpu")) == "cpu"
    on_cpu.remove("cpu")
    monkeypatch.setattr(backend._cpu, "problem", lambda: "no C++ compiler")
    monkeypatch.setattr(backend, "_warned_cpu_fallback", False)
    with pytest.warns(UserWarning, match="not usable: no C\\+\\+ compiler. backend='auto' uses torch"):
        assert backend.resolve("linear", "auto", torch.device("cpu")) == "torch"


FIRST_CALLS = """
import sys
import torch
import klops

g = torch.Generator().manual_seed(0)
B, L, V, D = 2, 5, 48, 16
s = torch.randn(B, L, V, generator=g, requires_grad=True)
t = torch.randn(B, L, V, generator=g)
labels = torch.randint(0, V, (B, L), generator=g)
h = torch.randn(B, L, D, generator=g, requires_grad=True)
w = torch.randn(V, D, generator=g, requires_grad=True)
top = torch.log_softmax(t, -1).topk(4, -1)
teacher = klops.TopK(top.indices, top.values)
x, y = torch.randn(1, 6, 3, generator=g, requires_grad=True), torch.randn(1, 7, 3, generator=g)
klops.fused_kl(s, t, backend="torch").backward()
klops.logprobs(s, labels, return_entropy=True, backend="auto")[1].sum().backward()
klops.fused_linear_cross_entropy(h, w, labels, backend="torch").backward()
klops.fused_linear_kl(h, w, teacher_logits=t, backend="torch").backward()
klops.fused_linear_kl(h, w, teacher, backend="torch").backward()
klops.fused_kl(s, teacher, backend="torch").backward()
klops.grpo_loss_from_logits(s, labels, torch.randn(B, generator=g), torch.ones(B, L), ref_logits=t, backend="torch")[
    0
].backward()
klops.forward_reverse_kl(s, t, backend="torch")[0].sum().backward()
klops.sinkhorn(x=x, y=y, cost_fn="sqeuclidean", epsilon=0.5, backend="torch").cost.sum().backward()
klops.sinkhorn_distill_loss(s, t, backend="torch").backward()
klops.tdpo_loss(s, t, labels, None, torch.tensor([0]), torch.tensor([1]), backend="torch")[0].backward()
klops.dpo_loss(*torch.randn(4, 1, generator=g))
print(sorted({"triton", "torch._dynamo"} & set(sys.modules)))
"""


def test_torch_backend_imports_no_triton():
    """The first call of each family of ops on the torch backend (and on "auto" with CPU tensors), forward and
    backward, imports neither triton nor torch._dynamo, which imports triton whenever it is installed (together
    about 160 MiB resident and a second of start-up)."""
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", FIRST_CALLS], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[]", f"imported on the torch backend: {run.stdout.strip()}"
