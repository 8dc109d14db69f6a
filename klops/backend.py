"""Which backends exist on this machine, and which one an op call runs on.

backend   runs on                          needs
"cuda"    CUDA tensors                     the extension klops._C (KLOPS_BUILD_CUDA=1 at install)
"triton"  CUDA tensors; CPU tensors too    triton; on the CPU only under TRITON_INTERPRET=1
          under the interpreter (tests)
"torch"   any device                       nothing: chunked pure-torch fp32 math
"auto"    cuda if built and on a GPU, else triton on a GPU, else torch

klops._C is used only when it was built against this torch (major.minor) and CUDA (major): otherwise
"auto" warns once and falls back, and "cuda" raises an error that says why and how to rebuild.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import warnings

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")


REBUILD = (
    "rebuild it for this torch: KLOPS_BUILD_CUDA=1 pip install --no-build-isolation klops-kernels (or "
    "scripts/build_wheel.sh in a checkout), or install the klops-kernels wheel built for it"
)


def _load_cuda_extension():
    """(klops._C or None, why it is not used or None). Not built: (None, None). It is not used when it fails
    to import or was built against another torch (major.minor: its C++ ABI) or CUDA major version."""
    if importlib.util.find_spec("klops._C") is None:
        return None, None
    try:
        extension = importlib.import_module("klops._C")
    except ImportError as error:
        return None, f"klops._C does not load ({str(error).splitlines()[0]}); {REBUILD}"
    built_torch, running_torch = extension.torch_version(), torch.__version__.split("+")[0]
    built_cuda, running_cuda = extension.cuda_version(), torch.version.cuda or "none"
    if (
        built_torch.split(".")[:2] != running_torch.split(".")[:2]
        or built_cuda.split(".")[0] != running_cuda.split(".")[0]
    ):
        return None, (
            f"klops._C was built against torch {built_torch} with CUDA {built_cuda}, but this is torch "
            f"{running_torch} with CUDA {running_cuda}; {REBUILD}"
        )
    return extension, None


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.metadata.version("triton")


# Looked up once at import (cheap: triton itself is imported only when a Triton op runs), so that
# torch.compile reads constants here instead of tracing imports.
CUDA_EXTENSION, CUDA_EXTENSION_PROBLEM = _load_cuda_extension()
TRITON_VERSION = _triton_version()
_warned_fallback = False


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device) -> list[str]:
    """The concrete backends that can run on tensors of ``device`` here."""
    names = []
    if device.type == "cuda" and CUDA_EXTENSION is not None:
        names.append("cuda")
    if TRITON_VERSION is not None and (device.type == "cuda" or triton_interpreter()):
        names.append("triton")
    names.append("torch")
    return names


def resolve_backend(backend: str, device: torch.device) -> str:
    """Map ``backend`` (one of BACKENDS) to a concrete backend for tensors on ``device``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    usable = available_backends(device)
    if backend == "auto":
        if device.type == "cuda" and CUDA_EXTENSION_PROBLEM is not None:
            _warn_fallback_once(usable[0])
        return "torch" if device.type != "cuda" else usable[0]
    if backend == "cuda" and CUDA_EXTENSION_PROBLEM is not None:
        raise ValueError(f"backend='cuda' is not available: {CUDA_EXTENSION_PROBLEM}")
    if backend not in usable:
        raise ValueError(
            f"backend={backend!r} cannot run on {device} tensors here (usable: {', '.join(usable)}); see `klops info`"
        )
    return backend


def _warn_fallback_once(fallback: str) -> None:
    global _warned_fallback
    if not _warned_fallback and not torch.compiler.is_compiling():
        _warned_fallback = True
        warnings.warn(f"{CUDA_EXTENSION_PROBLEM}. backend='auto' uses {fallback} instead.", stacklevel=3)


def resolve_preferring_triton(backend: str, device: torch.device) -> str:
    """resolve_backend for an op whose preferred GPU path is its Triton kernels: "auto" takes Triton on a GPU
    wherever Triton is usable (the fused-linear ops, whose "cuda" form is the chunked path)."""
    resolved = resolve_backend(backend, device)
    if backend == "auto" and resolved == "cuda" and "triton" in available_backends(device):
        return "triton"
    return resolved


def resolve_triton_or_torch(backend: str, device: torch.device, op: str) -> str:
    """resolve_backend for an op with Triton and torch kernels only: "auto" takes Triton on a GPU (the CUDA
    extension has none of this op), and "cuda" is an error that says so."""
    if backend == "cuda":
        raise ValueError(f"backend='cuda': {op} has no CUDA kernels in klops._C; use 'triton' or 'torch'")
    resolved = resolve_preferring_triton(backend, device)
    return "torch" if resolved == "cuda" else resolved
