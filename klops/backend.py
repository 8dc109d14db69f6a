"""Which backends exist on this machine, and which one an op call runs on.

backend   runs on                          needs
"cuda"    CUDA tensors                     the extension klops._C (KLOPS_BUILD_CUDA=1 at install)
"triton"  CUDA tensors; CPU tensors too    triton; on the CPU only under TRITON_INTERPRET=1
          under the interpreter (tests)
"torch"   any device                       nothing: chunked pure-torch fp32 math
"auto"    cuda if built and on a GPU, else triton on a GPU, else torch
"""

import importlib
import importlib.metadata
import importlib.util
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")


def _load_cuda_extension():
    try:
        return importlib.import_module("klops._C")
    except ImportError:  # not built, or built against another torch
        return None


def _triton_version() -> str | None:
    if importlib.util.find_spec("triton") is None:
        return None
    return importlib.metadata.version("triton")


# Looked up once at import (cheap: triton itself is imported only when a Triton op runs), so that
# torch.compile reads constants here instead of tracing imports.
CUDA_EXTENSION = _load_cuda_extension()
TRITON_VERSION = _triton_version()


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
        return "torch" if device.type != "cuda" else usable[0]
    if backend not in usable:
        raise ValueError(
            f"backend={backend!r} cannot run on {device} tensors here (usable: {', '.join(usable)}); see `klops info`"
        )
    return backend
