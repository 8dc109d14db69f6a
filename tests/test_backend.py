"""Which backend runs, and when the CUDA extension is not used (built against another torch or CUDA)."""

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
        backend.resolve_backend("cuda", torch.device("cpu"))
    monkeypatch.setattr(backend, "available_backends", lambda device: ["triton", "torch"])
    with pytest.warns(UserWarning, match="built against torch 2.0.1. backend='auto' uses triton instead"):
        assert backend.resolve_backend("auto", torch.device("cuda")) == "triton"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert backend.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_cuda_backend_on_cpu_tensors_is_a_clear_error():
    if backend.CUDA_EXTENSION_PROBLEM is not None:
        pytest.skip("klops._C is present but unusable here")
    with pytest.raises(ValueError, match="backend='cuda' cannot run on cpu tensors here"):
        backend.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize("usable, expected", [(["cuda", "triton", "torch"], "triton"), (["cuda", "torch"], "cuda"),
                                              (["triton", "torch"], "triton")])  # fmt: skip
def test_fused_linear_auto_prefers_triton_on_a_gpu(monkeypatch, usable, expected):
    """The fused-linear ops' auto: their Triton kernels wherever Triton runs on a GPU, else the chunked CUDA path;
    an explicit backend is kept, and CPU tensors take torch."""
    monkeypatch.setattr(backend, "CUDA_EXTENSION_PROBLEM", None)
    monkeypatch.setattr(backend, "available_backends", lambda device: usable if device.type == "cuda" else ["torch"])
    assert backend.resolve_preferring_triton("auto", torch.device("cuda")) == expected
    assert backend.resolve_preferring_triton(usable[0], torch.device("cuda")) == usable[0]
    assert backend.resolve_preferring_triton("auto", torch.device("cpu")) == "torch"
