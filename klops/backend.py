"""Which backends exist on this machine, and which one an op call runs on.

backend   runs on                          needs
"cuda"    CUDA tensors                     the extension klops._C (KLOPS_BUILD_CUDA=1 at install)
"triton"  CUDA tensors; CPU tensors too    triton; on the CPU only under TRITON_INTERPRET=1
          under the interpreter (tests)
"cpu"     CPU tensors                      a C++ compiler and ninja: the C++ kernels of csrc/cpu/, built on first
                                           use and cached (klops/_cpu.py); KLOPS_CPU_KERNELS=0 turns them off
"torch"   any device                       nothing: chunked pure-torch fp32 math
"auto"    the op's first usable backend in PREFERENCES whose LIMITS hold: its GPU column on a GPU, its CPU
          column on the CPU ("cpu" where the op has C++ CPU kernels, else "torch")

resolve(op, backend, device) is the one rule that maps a call's backend to a concrete one, and
launcher_table(...) the one way an op names its launchers per backend.

klops._C is used only when it was built against this torch (major.minor) and CUDA (major): otherwise
"auto" warns once and falls back, and "cuda" raises an error that says why and how to rebuild. Likewise where the
CPU kernels do not build (no compiler, a compiler error): "auto" warns once and takes "torch", and "cpu" raises an
error that says why.
"""

import importlib
import importlib.metadata
import importlib.util
import os
import pkgutil
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch

from . import _cpu

BACKENDS = ("auto", "cuda", "triton", "cpu", "torch")


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
_warned_cpu_fallback = False


def triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: torch.device) -> list[str]:
    """The concrete backends that can run on tensors of ``device`` here."""
    names = []
    if device.type == "cuda" and CUDA_EXTENSION is not None:
        names.append("cuda")
    if device.type == "cpu" and _cpu.problem() is None:  # the first call builds or loads the kernels
        names.append("cpu")
    if TRITON_VERSION is not None and (device.type == "cuda" or triton_interpreter()):
        names.append("triton")
    names.append("torch")
    return names


# The backends of each op family, in the order backend="auto" takes them: the first one usable here
# (available_backends) whose limit holds, from the first column on a GPU and from the second on the CPU. A backend in
# neither column of an op is an error when asked for ("cuda" and "cpu" are the ones an op can lack). The fused-linear
# ops' chunked path runs the row kernels of the backend it resolves to: on the CPU, "cpu" (the C++ row kernels).
PREFERENCES = {
    #             on a GPU                     on the CPU
    "divergence": (("cuda", "triton", "torch"), ("cpu", "torch")),  # fused_kl, divergence_and_label_logprobs
    "logprobs": (("cuda", "triton", "torch"), ("cpu", "torch")),
    "topk": (("cuda", "triton", "torch"), ("cpu", "torch")),  # a klops.TopK teacher, beside logits or hidden states
    # The fused-linear ops: their fused Triton kernels, else the chunked path over the CUDA row kernels (memory
    # decides, see klops/linear.py); on the CPU the chunked path over the C++ row kernels.
    "linear": (("triton", "cuda", "torch"), ("cpu", "torch")),
    "sinkhorn": (("triton", "torch"), ("torch",)),
    "kl_pair": (("triton", "torch"), ("cpu", "torch")),  # forward_reverse_kl, akl_weights, akl_loss
}


def op_backends(op: str) -> tuple[str, ...]:
    """Every concrete backend op family ``op`` has kernels for, GPU column first."""
    on_gpu, on_cpu = PREFERENCES[op]
    return on_gpu + tuple(b for b in on_cpu if b not in on_gpu)


class Limit(NamedTuple):
    """Where a backend of an op does not take every call: ``fits(sizes)`` reads the keywords the op passes to
    ``resolve``; ``error`` is raised for a call that names the backend and does not fit (None: its kernels raise
    their own). "auto" passes over a backend that does not fit."""

    fits: Callable[[dict], bool]
    error: str | None


# The largest V of the CUDA top-k kernels (kMaxTopkVocab in csrc/topk.cu: a bitmap of the row's ids in the 48 KiB of
# shared memory a default launch gets, beside the kernel's static part); backend="auto" takes Triton beyond it.
CUDA_TOPK_MAX_VOCAB = 47 * 1024 * 8

LIMITS = {
    ("topk", "cuda"): Limit(lambda sizes: sizes["vocab"] <= CUDA_TOPK_MAX_VOCAB, None),
    ("sinkhorn", "triton"): Limit(
        lambda sizes: sizes["dtype"] != torch.float64,
        "backend='triton' computes in float32; float64 inputs need backend='torch'",
    ),
}


def _fits(op: str, backend: str, sizes: dict) -> bool:
    limit = LIMITS.get((op, backend))
    return limit is None or limit.fits(sizes)


def resolve(op: str, backend: str, device: torch.device, *, name: str | None = None, **sizes) -> str:
    """The concrete backend that runs a call of op family ``op`` (a key of PREFERENCES) with ``backend`` (one of
    BACKENDS) on tensors of ``device``. ``sizes`` are what the op's LIMITS read (``vocab``, ``dtype``); ``name``
    is the function the messages name (``op`` if None)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}; got {backend!r}")
    on_gpu, on_cpu = PREFERENCES[op]
    if backend == "auto":
        usable = available_backends(device)
        prefers = on_gpu if device.type == "cuda" else on_cpu
        chosen = next(b for b in prefers if b in usable and _fits(op, b, sizes))
        if device.type == "cuda" and CUDA_EXTENSION_PROBLEM is not None:
            _warn_fallback_once(chosen)
        if device.type != "cuda" and "cpu" in on_cpu and chosen != "cpu":
            _warn_cpu_fallback_once(chosen)
        return chosen
    if backend not in op_backends(op):
        raise ValueError(_missing_kernels(backend, name or op, op_backends(op)))
    if backend == "cuda" and CUDA_EXTENSION_PROBLEM is not None:
        raise ValueError(f"backend='cuda' is not available: {CUDA_EXTENSION_PROBLEM}")
    if backend == "cpu" and _cpu.problem() is not None:
        raise ValueError(f"backend='cpu' is not available: {_cpu.problem()}; use backend='torch' (or 'auto')")
    usable = available_backends(device)
    if backend not in usable:
        raise ValueError(
            f"backend={backend!r} cannot run on {device} tensors here (usable: {', '.join(usable)}); see `klops info`"
        )
    limit = LIMITS.get((op, backend))
    if limit is not None and limit.error is not None and not limit.fits(sizes):
        raise ValueError(limit.error)
    return backend


def _missing_kernels(backend: str, name: str, alternatives) -> str:
    library = "CUDA kernels in klops._C" if backend == "cuda" else "C++ CPU kernels (csrc/cpu/)"
    return f"backend={backend!r}: {name} has no {library}; use {' or '.join(map(repr, alternatives))}"


def _warn_fallback_once(fallback: str) -> None:
    global _warned_fallback
    if not _warned_fallback and not torch.compiler.is_compiling():
        _warned_fallback = True
        warnings.warn(f"{CUDA_EXTENSION_PROBLEM}. backend='auto' uses {fallback} instead.", stacklevel=3)


def _warn_cpu_fallback_once(fallback: str) -> None:
    """Where the CPU kernels do not build: one warning that says why (none where KLOPS_CPU_KERNELS=0 asks for it)."""
    global _warned_cpu_fallback
    problem = _cpu.problem()
    if not _warned_cpu_fallback and not torch.compiler.is_compiling() and not _cpu.switched_off():
        _warned_cpu_fallback = True
        warnings.warn(f"the C++ CPU kernels are not usable: {problem}. backend='auto' uses {fallback} instead.",
                      stacklevel=3)  # fmt: skip


def launcher_table(**by_backend: tuple):
    """An op's launchers per concrete backend, as ``table(backend)`` -> the tuple given for it, e.g. (forward,
    backward). Each entry is a callable or the ``"module:name"`` of one (``"klops.kernels.topk:topk_forward"``,
    ``"torch:ops.klops_C.logprobs_forward"``), looked up when a call takes that backend: a call on another backend
    never imports triton, nor needs klops._C."""

    def table(backend: str) -> tuple:
        if backend not in by_backend:  # a custom op called with a backend that resolve() would have refused
            raise ValueError(_missing_kernels(backend, "this op", tuple(by_backend)))
        if backend == "cpu":
            _cpu.problem()  # loads torch.ops.klops_cpu (built and checked by resolve before any call takes "cpu")
        return tuple(pkgutil.resolve_name(f) if isinstance(f, str) else f for f in by_backend[backend])

    return table
