"""The C++ CPU kernels of klops (``csrc/cpu/``): the ops ``torch.ops.klops_cpu.*``, built on first use.

The sources travel with klops (``klops.csrc``: ``csrc/`` of a checkout, ``klops/csrc/`` of a wheel) and are compiled
by ``torch.utils.cpp_extension.load`` (g++ or $CXX, ninja) the first time a CPU op asks for them, never at import:
-O3, -fopenmp (so that ``at::parallel_for`` spreads the rows over torch's threads) and the vector flags of the CPU
capability torch reports (AVX512: -mavx512f/dq/vl/bw -mfma; AVX2: -mavx2 -mfma; otherwise none, scalar code). The
build takes about 30 s once; the library is cached in ``$KLOPS_CACHE_DIR`` (default ``$XDG_CACHE_HOME/klops`` or
``~/.cache/klops``) under a key of the torch version, the capability, the flags and the sources, so that another
torch or an edited source never loads a stale library. Two processes that build at once share one build (torch's
lock file in the build folder).

Switches: ``KLOPS_CPU_KERNELS=0`` turns the kernels off (the "cpu" backend is then unavailable and "auto" takes
"torch" on the CPU). ``CXX`` names the compiler.
"""

import hashlib
import importlib
import os
import pathlib
import shutil

import torch

from .kernels.kinds import DIVERGENCE_KINDS

OFF = "KLOPS_CPU_KERNELS"
CACHE = "KLOPS_CACHE_DIR"
HEADERS = (
    "device.cuh",
    "dispatch.h",
    "math.cuh",
    "online_stats.cuh",
    "divergence_terms.cuh",
    "schemas.h",
    "cpu/rows.h",
)
SOURCES = ("cpu/ops.cpp", "cpu/logprobs.cpp", "cpu/divergence.cpp", "cpu/topk.cpp", "cpu/kl_pair.cpp")
CAPABILITY_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}
# -fno-math-errno / -fno-trapping-math change no result (no errno is read, no trap is enabled); they let GCC
# vectorize the branch-free math of csrc/math.cuh and its selects. No -ffast-math: -inf entries are legal.
FLAGS = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]

_problem: str | None = None
_loaded = False


def csrc() -> pathlib.Path:
    """The folder of the C++ sources: klops/csrc in a wheel, csrc/ in a checkout (klops/_checkout.py)."""
    return pathlib.Path(next(iter(importlib.import_module("klops.csrc").__path__)))


def flags() -> list[str]:
    return FLAGS + CAPABILITY_FLAGS.get(torch.backends.cpu.get_cpu_capability(), [])


def cache_key() -> str:
    """sha256 (16 hex digits) of the torch version, the CPU capability, the flags and every source and header."""
    digest = hashlib.sha256()
    for part in (torch.__version__, torch.backends.cpu.get_cpu_capability(), *flags()):
        digest.update(part.encode() + b"\0")
    root = csrc()
    for name in HEADERS + SOURCES:
        digest.update(name.encode() + b"\0" + (root / name).read_bytes())
    return digest.hexdigest()[:16]


def cache_dir() -> pathlib.Path:
    if os.environ.get(CACHE):
        return pathlib.Path(os.environ[CACHE])
    return pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "klops"


def switched_off() -> bool:
    return os.environ.get(OFF, "1") == "0"


def _build_and_load() -> str | None:
    """Loads the library, building it first if the cache has none; the reason it is unusable, or None."""
    if switched_off():
        return f"turned off ({OFF}=0)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler: {compiler!r} (CXX) is not found"
    if shutil.which("ninja") is None:
        return "ninja is not found (pip install ninja)"
    try:
        name = f"klops_cpu_{cache_key()}"
    except OSError as error:  # a source missing from the checkout or the wheel
        return f"the CPU kernels' sources are incomplete ({error})"
    folder = cache_dir() / name
    library = folder / f"{name}.so"
    try:
        if library.exists() and not (folder / "lock").exists():  # built before, and no build under way
            torch.ops.load_library(str(library))
        else:
            from torch.utils.cpp_extension import load

            folder.mkdir(parents=True, exist_ok=True)
            root = csrc()
            load(name=name, sources=[str(root / s) for s in SOURCES], extra_cflags=flags(),
                 extra_ldflags=["-fopenmp"], build_directory=str(folder), is_python_module=False)  # fmt: skip
    except Exception as error:  # a compiler or linker error, a broken cache entry: the reason, in one line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()] or [""]
        first = next((line for line in lines if "error" in line.lower() and line is not lines[0]), lines[0])
        return f"the build of the CPU kernels in {folder} failed ({type(error).__name__}: {first[:300]})"
    return None


def problem() -> str | None:
    """Why the "cpu" backend is unusable here (None: usable); builds or loads the kernels on the first call."""
    global _problem, _loaded
    if not _loaded:
        _problem, _loaded = _build_and_load(), True
    return _problem


def describe() -> str:
    """One line for ``klops info``: the kernels' library and flags, or why they are not used (builds them if needed)."""
    if problem() is not None:
        return f"not used: {problem()}"
    name = f"klops_cpu_{cache_key()}"
    return f"{cache_dir() / name / name}.so ({torch.backends.cpu.get_cpu_capability()}: {' '.join(flags())})"


def topk_divergence_forward(student, indices, teacher_logprobs, valid, kind, tail, temperature, coef, tail_loss,
                            tail_grad):  # fmt: skip
    """klops.topk's forward launcher on the CPU kernels: (B, L, V) student, (B, L, K) int32 indices and teacher
    log-probs, (B, L) valid -> (D, max_c, logsum_c, tail_scale) (B, L) and member_d (B, L, K), fp32 (csrc/topk.cu's
    outputs); the kind goes as its id and the tail as a flag, as klops.topk's CUDA launcher passes them."""
    return torch.ops.klops_cpu.topk_divergence_forward(
        student, indices, teacher_logprobs, valid, DIVERGENCE_KINDS.index(kind), tail == "bin",
        temperature, coef, tail_loss, tail_grad,
    )  # fmt: skip


def topk_divergence_backward(tail_coef, student, indices, valid, max_c, logsum_c, member_value, label_coef, labels,
                             temperature):  # fmt: skip
    """klops.topk's backward launcher on the CPU kernels: dz (B, L, V) = (qc tail_coef, member_value on the top-k
    ids, label_coef at the label) / T; member_value is read contiguous (it has the upstream gradient's layout)."""
    return torch.ops.klops_cpu.topk_divergence_backward(
        tail_coef, student, indices, valid, max_c, logsum_c, member_value.contiguous(), label_coef, labels, temperature
    )


def parallel_threads(rows: int, vocab: int) -> int:
    """How many threads the CPU kernels use for ``rows`` rows of ``vocab`` entries (they must be loaded)."""
    return torch.ops.klops_cpu.parallel_threads(rows, vocab)
