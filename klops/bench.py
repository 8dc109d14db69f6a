"""``klops bench``: check each op against the float64 reference on this machine's device, then time
forward + backward and measure peak memory against the baselines of ``bench_baselines``: plain PyTorch (eager and
torch.compile), PyTorch's ``F.linear_cross_entropy`` (default and chunked) on the fused-linear cross-entropy cases,
and Liger-Kernel and Cut Cross-Entropy on the fused-linear cases they share when they are installed.

Each case reports the median time of forward + backward, the peak memory allocated above the inputs,
the effective bandwidth: the minimum bytes the op must move (read both inputs once, write the
gradient once) over the time, as a fraction of this device's measured copy bandwidth, and the time of the
first forward + backward call of each implementation, before its check and warm-ups (``measure``).
"""

import ctypes
import dataclasses
import datetime
import statistics
import sys
import time
from functools import partial

import torch
import torch.nn.functional as F

from . import bench_sinkhorn, reference
from ._eager import compile_when_called
from .bench_baselines import (
    SEQUENCES,
    baseline_family,
    eager_akl,
    eager_dckd,
    eager_forward_reverse_kl,
    eager_kl,
    eager_linear_cross_entropy,
    eager_linear_grpo,
    eager_linear_kl,
    eager_linear_logprobs,
    eager_logprobs,
    eager_tdpo,
    eager_topk_kl,
    grpo_batch,
    klops_backends,
    lce_missing,
    library_baselines,
    torch_linear_cross_entropy,
)
from .distill import akl_loss, dckd_loss, forward_reverse_kl
from .divergence import fused_kl
from .kernels.kinds import default_coefficient
from .linear import fused_linear_cross_entropy, fused_linear_logprobs
from .linear_divergence import fused_linear_kl
from .linear_grpo import fused_linear_grpo_loss
from .logprobs import logprobs
from .preference import tdpo_loss
from .topk import TopK


@dataclasses.dataclass
class Case:
    op: str  # "fused_kl" | "fused_kl_topk" | "logprobs" | "fused_linear_cross_entropy" | "fused_linear_kl" |
    # "fused_linear_logprobs" | "fused_linear_grpo_loss" | "tdpo_loss" | "dckd_loss" | "forward_reverse_kl" |
    # "akl_loss"
    rows: int
    vocab: int
    dtype: torch.dtype
    kind: str = "forward"
    hidden: int = 0  # D of the fused-linear ops
    k: int = 0  # teacher ids per row of fused_kl_topk
    teacher_logits: bool = False  # fused_linear_kl: the teacher as [N, V] logits, not hidden states and a head

    @property
    def name(self) -> str:
        dtype = dtype_name(self.dtype)
        kind = f" {self.kind_label}" if self.kind_label else ""
        hidden = f" D={self.hidden}" if self.hidden else ""
        k = f" k={self.k}" if self.k else ""
        return f"{self.op}{kind} N={self.rows} V={self.vocab}{hidden}{k} {dtype}"

    @property
    def kind_label(self) -> str | None:
        """The kind of the ops that have one, with the teacher's form where it has two: "forward teacher-logits"."""
        if self.op not in ("fused_kl", "fused_kl_topk", "fused_linear_kl"):
            return None
        return self.kind + (" teacher-logits" if self.teacher_logits else "")

    @property
    def shape(self) -> dict:
        """The case's sizes by name, for the JSON report: N, V, and D or k where the op has them."""
        return dict(N=self.rows, V=self.vocab, **({"D": self.hidden} if self.hidden else {}),
                    **({"k": self.k} if self.k else {}))  # fmt: skip

    def min_bytes(self, backward: bool = True) -> int:
        """Read the logits (and a dense teacher) once, and with the backward write the gradient once; a top-k
        teacher's ids (int64) and fp32 log-probs are read once."""
        inputs = 2 if self.op in ("fused_kl", "tdpo_loss", *KL_PAIR_OPS) else 1
        return (inputs + backward) * self.rows * self.vocab * self.dtype.itemsize + self.rows * self.k * (8 + 4)

    def min_flops(self, backward: bool = True) -> int:
        """Fused-linear ops: the logits' matmul, and with the backward the two gradient matmuls, 2 N V D each; for
        the KL from a teacher head the teacher's logits too (the teacher has the student's D here)."""
        products = (1 + 2 * backward) + (self.op == "fused_linear_kl" and not self.teacher_logits)
        return 2 * products * self.rows * self.vocab * self.hidden


# Every op klops bench measures, in its order: the values of Case.op and of ``klops bench --ops``.
OPS = ("fused_kl", "logprobs", "fused_linear_cross_entropy", "fused_linear_kl", "fused_linear_logprobs",
       "fused_linear_grpo_loss", "fused_kl_topk", "tdpo_loss", "dckd_loss", "forward_reverse_kl", "akl_loss",
       "sinkhorn", "sinkhorn_distill_loss")  # fmt: skip
# The ops on klops::kl_pair (both KLs of a row pair from one sweep), with a dense teacher.
KL_PAIR_OPS = ("forward_reverse_kl", "akl_loss")
# forward_reverse_kl's case: a fixed mixture of its two per-token KLs (BD-KD-style weighting).
KL_PAIR_KINDS = ("forward", "reverse")
FORWARD_REVERSE_MIX = (0.7, 0.3)


# Shapes of real models' heads, (N tokens, V, D), for ``klops bench --shapes``, and sweeps for the plots (time and
# memory against V at one N and against N at one V); "cpu-small" and "cpu-sweep" for a CPU.
SHAPE_PRESETS = {
    "llama3-8b": [(4096, 128256, 4096)],
    "qwen2.5-7b": [(4096, 152064, 3584)],
    "gemma2-9b": [(4096, 256000, 3584)],
    "sweep": [(4096, 32000), (4096, 128256), (4096, 256000), (1024, 128256), (16384, 128256)],
    "cpu-small": [(128, 32000, 256)],
    "cpu-sweep": [(128, 8000), (128, 32000), (128, 128256), (32, 32000), (512, 32000)],
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def cases(
    device: torch.device, quick: bool, shapes: list[tuple] | None = None, dtype: torch.dtype | None = None
) -> list[Case]:
    """The cases of a run: the default sizes per device (``quick``: one small case per op), or every op at each
    of ``shapes`` ((N, V) or (N, V, D); D defaults to 4096 on a GPU, 256 on the CPU), in ``dtype`` if given."""
    gpu = device.type == "cuda"
    if gpu:
        sizes = [(1024, 128256)] if quick else [(1024, 32000), (4096, 128256), (2048, 262144)]
        dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float32]
    else:
        sizes = [(128, 32000)] if quick else [(128, 32000), (256, 128256)]
        dtypes = [torch.float32]
    # Llama-3 8B's head (D=4096, V=128256) on a GPU, also at the N=16384; a small head on the CPU.
    linear = [(4096, 128256, 4096)] if gpu else [(256, 32000, 256)]
    linear += [(16384, 128256, 4096)] if gpu and not quick else []
    # A stored top-64 teacher over Qwen2.5's vocabulary (V=152064): the issue's N=16384 on a full GPU run.
    topk = [(1024, 152064)] if gpu else [(128, 32000)]
    topk += [(16384, 152064)] if gpu and not quick else []
    preference = (4096, 128256) if gpu else (128, 32000)
    if shapes:
        sizes = topk = [shape[:2] for shape in shapes]
        linear = [(n, v, d[0] if d else (4096 if gpu else 256)) for n, v, *d in shapes]
        preference = sizes[0]
    dtypes = [dtype] if dtype is not None else dtypes
    kinds = ["forward"] if quick else ["forward", "reverse", "jsd"]
    out = []
    for rows, vocab in sizes:
        for case_dtype in dtypes:
            out += [Case("fused_kl", rows, vocab, case_dtype, kind) for kind in kinds]
            out.append(Case("logprobs", rows, vocab, case_dtype))
    out += [Case("fused_linear_cross_entropy", n, v, dtypes[0], hidden=d) for n, v, d in linear]
    out += [Case("fused_linear_kl", n, v, dtypes[0], "forward", hidden=d) for n, v, d in linear]
    out += [Case("fused_linear_kl", n, v, dtypes[0], "forward", hidden=d, teacher_logits=True) for n, v, d in linear]
    out += [Case("fused_linear_logprobs", n, v, dtypes[0], hidden=d) for n, v, d in linear[:1]]
    out += [Case("fused_linear_grpo_loss", n, v, dtypes[0], hidden=d) for n, v, d in linear[:1]]
    out += [Case("fused_kl_topk", n, v, dtypes[0], "forward", k=64) for n, v in topk]
    # Sequence-level objectives over SEQUENCES sequences of N / SEQUENCES tokens: TDPO (policy and reference
    # logits) and DCKD (a stored top-50 teacher with its tail bin).
    out += [Case("tdpo_loss", *preference, dtypes[0]), Case("dckd_loss", *preference, dtypes[0], k=50)]
    # Both KLs of a row pair in one sweep, mixed; AKL: its weights (a selection, sweeps of the teacher) and the
    # weighted forward + reverse KL.
    out += [Case(op, rows, vocab, dtypes[0]) for op in KL_PAIR_OPS for rows, vocab in sizes]
    return out


def selected(impl: str, backends: set[str] | None, baselines: set[str] | None) -> bool:
    """Whether ``impl`` runs under ``--backends`` (concrete backend names) and ``--baselines`` (families)."""
    family = baseline_family(impl)
    if family is None:
        return backends is None or impl[len("klops[") : impl.index("]")] in backends
    return baselines is None or family in baselines


# A klops implementation whose loss or gradient is further than this from float64 (relative to the largest value)
# is reported FAILED and not timed. (SinKD's fp32 gradient reaches ~1e-2 at V = 32000: docs in bench_sinkhorn.)
PASS_REL_ERR = 2e-2


# The backend family (klops.backend.PREFERENCES) of each op of Case.
FAMILIES = {
    "fused_kl": "divergence",
    "tdpo_loss": "divergence",
    "logprobs": "logprobs",
    "fused_kl_topk": "topk",
    "dckd_loss": "topk",
    "forward_reverse_kl": "kl_pair",
    "akl_loss": "kl_pair",
    "fused_linear_cross_entropy": "linear",
    "fused_linear_kl": "linear",
    "fused_linear_logprobs": "linear",
    "fused_linear_grpo_loss": "linear",
}


def implementations(case: Case, device: torch.device) -> dict:
    """name -> callable(z, y_or_labels) returning a scalar loss."""
    impls = {}
    backends = klops_backends(FAMILIES[case.op], device, vocab=case.vocab, dtype=case.dtype)
    if case.op == "fused_linear_cross_entropy":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda h, y, b=backend: _klops_linear_cross_entropy(h, y, b)
        eager = eager_linear_cross_entropy
    elif case.op == "fused_linear_kl":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda h, y, b=backend: _klops_linear_kl(h, y, case.kind, b)
        eager = lambda h, y: eager_linear_kl(h, y, case.kind)  # noqa: E731
    elif case.op == "fused_linear_logprobs":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda h, y, b=backend: _klops_linear_logprobs(h, y, b)
        eager = eager_linear_logprobs
    elif case.op == "fused_linear_grpo_loss":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda h, y, b=backend: _klops_linear_grpo(h, y, b)
        eager = eager_linear_grpo
    elif case.op == "tdpo_loss":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: tdpo_loss(z, y[0], y[1], None, *y[2:], backend=b)[0]
        eager = eager_tdpo
    elif case.op == "dckd_loss":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: dckd_loss(z, TopK(y[0], y[1]), *y[2:], backend=b)[0]
        eager = eager_dckd
    elif case.op == "forward_reverse_kl":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: _mixed_kl(*forward_reverse_kl(z, y, backend=b))
        eager = lambda z, y: _mixed_kl(*eager_forward_reverse_kl(z, y))  # noqa: E731
    elif case.op == "akl_loss":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: akl_loss(z, y, backend=b)
        eager = eager_akl
    elif case.op == "fused_kl_topk":
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: fused_kl(
                z, TopK(y[0], y[1]), case.kind, reduction="batchmean", backend=b
            )
        # the dense op on the teacher's full logits, for comparison
        dense = klops_backends("divergence", device, vocab=case.vocab, dtype=case.dtype)[0]
        impls[f"klops[{dense}] dense teacher"] = lambda z, y: fused_kl(
            z, y[2], case.kind, reduction="batchmean", backend=dense
        )
        eager = eager_topk_kl
    elif case.op == "fused_kl":
        coef = default_coefficient(case.kind)  # jsd's beta = 1/2 of eager_kl
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: fused_kl(
                z, y, case.kind, reduction="batchmean", backend=b, **coef
            )
        eager = lambda z, y: eager_kl(z, y, case.kind)  # noqa: E731
    else:
        for backend in backends:
            impls[f"klops[{backend}]"] = lambda z, y, b=backend: _klops_logprobs(z, y, b)
        eager = eager_logprobs
    impls["torch eager"] = eager
    impls["torch.compile"] = compile_when_called(eager)
    impls.update(torch_linear_cross_entropy(case))
    impls.update(library_baselines(case))
    return impls


def _klops_linear_logprobs(hidden, weight_and_labels, backend):
    weight, labels = weight_and_labels
    logp, entropy = fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    return logp.mean() - entropy.mean()


def _klops_linear_grpo(hidden, inputs, backend):
    return fused_linear_grpo_loss(*grpo_batch(hidden, inputs), loss_type="dapo", backend=backend)[0]


def _klops_linear_kl(hidden, heads, kind, backend):
    """heads: (weight, teacher hidden states, teacher head), or (weight, teacher logits)."""
    weight, *teacher = heads
    teacher_logits = dict(teacher_logits=teacher[0]) if len(teacher) == 1 else {}
    teacher_heads = teacher if len(teacher) == 2 else (None, None)
    return fused_linear_kl(hidden, weight, *teacher_heads, kind=kind, reduction="batchmean", backend=backend,
                           **teacher_logits)  # fmt: skip


def _klops_linear_cross_entropy(hidden, weight_and_labels, backend):
    weight, labels = weight_and_labels
    return fused_linear_cross_entropy(hidden, weight, labels, backend=backend)


def _klops_logprobs(logits, labels, backend):
    logp, entropy = logprobs(logits, labels, return_entropy=True, backend=backend)
    return logp.mean() - entropy.mean()


# ----------------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak bytes allocated above the level at entry: CUDA allocator stats on a GPU, the process's
    peak resident set (VmHWM, reset through /proc/self/clear_refs) on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            _release_freed_memory_to_os()
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.base = _proc_status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = _proc_status_kib("VmHWM") * 1024 - self.base


def _release_freed_memory_to_os() -> None:
    """Make the resident set follow what torch holds: glibc serves every allocation above 64 KiB with
    its own mmap (by default it keeps freed blocks of up to 32 MiB in its heap and reuses them, which
    hides the temporaries of a repeated step), and what its heap still holds free is returned now."""
    libc = ctypes.CDLL("libc.so.6")
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 64 * 1024)
    libc.malloc_trim(0)


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, device: torch.device, repeats: int) -> float:
    """Median time of fn() in milliseconds, after two warm-up calls: on a GPU from CUDA events, with the L2 cache
    flushed before each call (a write of twice its size) so that inputs left there by the previous call do not
    flatter the time; on the CPU the wall clock."""
    for _ in range(2):
        fn()
    _sync(device)
    if device.type == "cuda":
        l2_bytes = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 64 << 20)
        flush = torch.empty(2 * l2_bytes // 4, dtype=torch.int32, device=device)
        events = []
        for _ in range(repeats):
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events.append((start, end))
        torch.cuda.synchronize()
        return statistics.median(start.elapsed_time(end) for start, end in events)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def call_ms(fn, device: torch.device) -> float:
    """Wall-clock milliseconds of one call of fn(), the device synchronized before and after (a first call: its
    compiles and builds are host time that CUDA events would not see)."""
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return (time.perf_counter() - start) * 1e3


def copy_bandwidth(device: torch.device) -> float:
    """Measured device-memory bandwidth in bytes/s: a large tensor copy (read + write)."""
    n = (1 << 28) if device.type == "cuda" else (1 << 25)
    src = torch.empty(n, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, repeats=10)
    return 2 * src.nbytes / (ms * 1e-3)


def matmul_rate(device: torch.device, dtype: torch.dtype) -> float:
    """Measured matmul rate in FLOP/s of this device and dtype (the ceiling of the fused-linear ops)."""
    n = 4096 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    ms = time_ms(lambda: a @ b, device, repeats=10)
    return 2 * n**3 / (ms * 1e-3)


def make_inputs(case: Case, device: torch.device, gen: torch.Generator):
    if case.hidden:

        def head():
            return (torch.randn(case.vocab, case.hidden, generator=gen) / case.hidden**0.5).to(device, case.dtype)

        hidden = torch.randn(case.rows, case.hidden, generator=gen).to(device=device, dtype=case.dtype)
        if case.op == "fused_linear_kl":  # the teacher: hidden states and a head of its own, or its logits
            teacher_hidden = torch.randn(case.rows, case.hidden, generator=gen).to(device=device, dtype=case.dtype)
            weight, teacher_weight = head().requires_grad_(), head()
            if case.teacher_logits:
                return hidden, (weight, (teacher_hidden @ teacher_weight.t()).to(case.dtype))
            return hidden, (weight, teacher_hidden, teacher_weight)
        labels = torch.randint(0, case.vocab, (case.rows,), generator=gen).to(device)
        if case.op == "fused_linear_grpo_loss":  # the completions' ids and one advantage per sequence
            return hidden, (head().requires_grad_(), labels, torch.randn(SEQUENCES, generator=gen).to(device))
        return hidden, (head().requires_grad_(), labels)
    if case.op in ("tdpo_loss", "dckd_loss"):
        return _sequence_inputs(case, device, gen)
    z = (torch.randn(case.rows, case.vocab, generator=gen) * 2).to(device=device, dtype=case.dtype)
    if case.op == "fused_kl_topk":  # (ids, log-probs) of the teacher's top-k, and its full logits
        y = (torch.randn(case.rows, case.vocab, generator=gen) * 2).to(device=device, dtype=case.dtype)
        top = torch.log_softmax(y.float(), dim=-1).topk(case.k, dim=-1)
        return z, (top.indices, top.values, y)
    if case.op in ("fused_kl", *KL_PAIR_OPS):
        y = (torch.randn(case.rows, case.vocab, generator=gen) * 2).to(device=device, dtype=case.dtype)
    else:
        y = torch.randint(0, case.vocab, (case.rows,), generator=gen).to(device)
    return z, y


def _sequence_inputs(case: Case, device: torch.device, gen: torch.Generator):
    """(student / policy logits [S, L, V], the rest) of the tdpo_loss / dckd_loss cases; the first quarter of
    each sequence is prompt (label -100)."""
    shape = (SEQUENCES, case.rows // SEQUENCES, case.vocab)

    def logits():
        return (torch.randn(shape, generator=gen) * 2).to(device=device, dtype=case.dtype)

    z, teacher = logits(), logits()
    labels = torch.randint(0, case.vocab, shape[:2], generator=gen).to(device)
    labels[:, : shape[1] // 4] = -100
    if case.op == "tdpo_loss":
        return z, (teacher, labels, torch.tensor([0, 2], device=device), torch.tensor([1, 3], device=device))
    top = torch.log_softmax(teacher.float(), dim=-1).topk(case.k, dim=-1)
    return z, (top.indices, top.values, labels, torch.tensor([True, False, True, False], device=device))


def check_against_reference(case: Case, name: str, impl, z, y) -> float:
    """Largest error of the loss and gradient on the first rows vs the float64 reference, relative to
    the largest reference value."""
    rows = min(8, case.rows)
    if case.hidden:
        z = z[:rows].detach().clone()
        z_k, z_r = z.clone().requires_grad_(), z.double().requires_grad_()
        weight = y[0].detach()
        if case.op == "fused_linear_kl":
            teacher_rows = tuple(y[1:2]) if case.teacher_logits else (y[1], y[2])
            teacher_rows = (teacher_rows[0][:rows], *teacher_rows[1:])
            loss = impl(z_k, (weight, *teacher_rows))
            teacher = teacher_rows[0].double() if case.teacher_logits else teacher_rows[0].double() @ y[2].double().t()
            ref = reference.fused_kl_reference(z_r @ weight.double().t(), teacher, case.kind, reduction="batchmean")
        elif case.op == "fused_linear_grpo_loss":
            loss = impl(z_k, (weight, y[1][:rows], y[2]))
            hidden, _, ids, advantages, mask = grpo_batch(z_r, (weight, y[1][:rows], y[2]))
            logp, _ = reference.logprobs_reference(hidden @ weight.double().t(), ids)
            ref = reference.grpo_loss_reference(logp, advantages, mask, loss_type="dapo")
        elif case.op == "fused_linear_logprobs":
            loss = impl(z_k, (weight, y[1][:rows]))
            logp, entropy = reference.logprobs_reference(z_r @ weight.double().t(), y[1][:rows])
            ref = logp.mean() - entropy.mean()
        else:
            loss = impl(z_k, (weight, y[1][:rows]))
            ref = F.cross_entropy(z_r @ weight.double().t(), y[1][:rows])
        return _relative_error(loss, ref, z_k, z_r)
    if case.op in ("tdpo_loss", "dckd_loss"):  # the last two tokens of every sequence
        z_k, z_r = z[:, -2:].detach().clone().requires_grad_(), z[:, -2:].detach().double().requires_grad_()
        y = tuple(t[:, -2:] if t.dim() > 1 else t for t in y)
        loss = impl(z_k, y)
        if case.op == "tdpo_loss":
            ref = reference.tdpo_loss_reference(z_r, y[0], y[1], None, y[2], y[3])
        else:
            ref = reference.dckd_loss_reference(z_r, TopK(y[0], y[1]), y[2], y[3])
        return _relative_error(loss, ref, z_k, z_r)
    z = z[:rows].detach().clone()
    y = tuple(t[:rows] for t in y) if isinstance(y, tuple) else y[:rows]
    z_k, z_r = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss = impl(z_k, y)
    if case.op == "fused_kl_topk":  # the impl's teacher: the top-k, or the full logits it was drawn from
        teacher = y[2] if name.endswith("dense teacher") else TopK(y[0], y[1])
        ref = reference.fused_kl_reference(z_r, teacher, case.kind, reduction="batchmean")
    elif case.op == "fused_kl":
        ref = reference.fused_kl_reference(z_r, y, case.kind, reduction="batchmean", **default_coefficient(case.kind))
    elif case.op == "forward_reverse_kl":
        forward, reverse = (reference.fused_kl_reference(z_r, y, kind, reduction="none") for kind in KL_PAIR_KINDS)
        ref = _mixed_kl(forward, reverse)
    elif case.op == "akl_loss":
        w = reference.akl_weights_reference(z, y)
        ref = reference.fused_kl_reference(z_r, y, "forward", weights=w) + reference.fused_kl_reference(
            z_r, y, "reverse", weights=1 - w
        )
    else:
        logp, entropy = reference.logprobs_reference(z_r, y)
        ref = logp.mean() - entropy.mean()
    return _relative_error(loss, ref, z_k, z_r)


def _mixed_kl(forward: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
    """The forward_reverse_kl case's loss: the mean over rows of FORWARD_REVERSE_MIX's mixture of the two KLs."""
    w_forward, w_reverse = FORWARD_REVERSE_MIX
    return (w_forward * forward + w_reverse * reverse).mean()


def _relative_error(loss, ref, z_k, z_r) -> float:
    """Backpropagates both losses; the larger relative error of the loss and of the input's gradient."""
    loss.backward(), ref.backward()
    err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)
    grad_err = ((z_k.grad.double() - z_r.grad).abs().max() / z_r.grad.abs().max().clamp(min=1e-30)).item()
    return max(err, grad_err)


def run(
    device: torch.device,
    quick: bool,
    repeats: int | None = None,
    ops: list[str] | None = None,
    shapes: list[tuple] | None = None,
    dtype: torch.dtype | None = None,
    backends: set[str] | None = None,
    baselines: set[str] | None = None,
    progress=None,
    time_limit: float | None = None,
) -> dict:
    """Run every case (of the ``ops`` named, at ``shapes`` in ``dtype`` when given; the klops ``backends`` and
    baseline families named, when given). Returns the report: ``device``, ``date``, ``versions``, ``ceilings``
    (the copy bandwidth and the matmul rates measured in this run), ``repeats``, ``results`` (the rows of
    ``measure``), ``not_run``, the names of the cases left when ``time_limit`` seconds had passed (no case
    starts after that; a case already started runs to its end), and ``skipped_baselines``, family -> why, for a
    selected baseline family that this run's cases would use but cannot run here (lce on torch < 2.13).
    ``progress(i, n, name, seconds)`` is called before each case."""
    repeats = (5 if quick else 20) if repeats is None else repeats
    ceilings = dict(copy_bandwidth_gbps=copy_bandwidth(device) / 1e9, matmul_tflops={})
    gen = torch.Generator().manual_seed(0)
    results = []
    sinkhorn_cases = [] if shapes or dtype is not None else bench_sinkhorn.cases(device, quick)
    todo = [case for case in cases(device, quick, shapes=shapes, dtype=dtype) + sinkhorn_cases
            if ops is None or case.op in ops]  # fmt: skip
    skipped = {}
    if any(case.op == "fused_linear_cross_entropy" for case in todo) and (baselines is None or "lce" in baselines):
        skipped = {"lce": lce_missing()} if lce_missing() is not None else {}
    start = time.perf_counter()
    not_run, timed = [], set()  # timed: the (op, impl) pairs measured so far
    for index, case in enumerate(todo):
        if time_limit is not None and time.perf_counter() - start > time_limit:
            not_run = [left.name for left in todo[index:]]
            break
        if progress is not None:
            progress(index, len(todo), case.name, time.perf_counter() - start)
        if case.hidden and dtype_name(case.dtype) not in ceilings["matmul_tflops"]:
            ceilings["matmul_tflops"][dtype_name(case.dtype)] = matmul_rate(device, case.dtype) / 1e12
        forget_compiled_code()
        sinkhorn_case = isinstance(case, bench_sinkhorn.SinkhornCase)
        z, y = case.inputs(device, gen) if sinkhorn_case else make_inputs(case, device, gen)
        for name, impl in (case.implementations(device) if sinkhorn_case else implementations(case, device)).items():
            if selected(name, backends, baselines):
                results += measure(case, name, impl, z, y, device, repeats, ceilings, (case.op, name) not in timed)
                timed.add((case.op, name))
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return dict(device=device_name(device), date=date, versions=versions(), ceilings=ceilings, repeats=repeats,
                results=results, not_run=not_run, skipped_baselines=skipped)  # fmt: skip


def forget_compiled_code() -> None:
    """Drop what torch.compile made for earlier cases, so that each case compiles its own. Dynamo keeps compiled code
    per Python function and compiles one function at most ``torch._dynamo.config.recompile_limit`` times (8), then
    runs it eagerly with only a log warning: in a cpu-sweep run the torch.compile baseline of fused_kl (3 kinds x 5
    shapes of one function) was eager PyTorch from its 9th case on. Nothing to drop before dynamo is imported."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()


PASSES = ("forward", "forward+backward")


def measure(
    case, name: str, impl, z, y, device: torch.device, repeats: int, ceilings: dict, first_of_op: bool = True
) -> list[dict]:
    """The result rows of one implementation of a case. Its first call is timed (``first_call_ms``): one forward +
    backward on the case's inputs, before anything else of this measurement, with whatever that call sets off
    (imports, a torch.compile, Triton JIT compiles and autotuning, an extension built on first use) and the
    compute of one step. ``first_of_op``: whether no earlier case of this op in this process ran the implementation,
    so that this call pays the op's one-time costs; a later case pays only what its new shape sets off (torch.compile
    with dynamic=False compiles per shape). Costs that ops share (importing torch._dynamo, building an extension)
    fall on the first op that runs them. Then each implementation is checked against float64 (but
    ``torch.compile``, which runs the function checked as ``torch eager``: compiling it again for the check's
    smaller shape would only add a compile; and the Sinkhorn baselines, whose stopping rules and gradients are their
    own): one row with ``correct`` False and no time if it disagrees. Then one row per pass (forward, forward+backward):
    ``op``, ``impl``, ``case``, ``shape``, ``dtype``, ``pass``, ``time_ms``, ``peak_mem_mib`` and the achieved rate,
    ``gb_per_s`` with its ``bandwidth_fraction`` of the copy bandwidth, or for fused-linear ops ``tflop_per_s`` with
    its ``flops_fraction`` of the matmul rate; ``correct`` (None where not checked) and ``rel_err``; the
    forward+backward row also ``first_call_ms`` and ``first_of_op``. A pass that raises (OOM, an unsupported case) is
    a row with ``error`` instead."""
    common = dict(op=case.op, impl=name, case=case.name, shape=case.shape, dtype=dtype_name(case.dtype), correct=None)
    if case.kind_label:
        common["kind"] = case.kind_label
    z_grad = z.detach().requires_grad_()

    def forward():
        return impl(z_grad, y)

    def forward_backward():
        forward().backward()
        z_grad.grad = None

    last = {"pass": PASSES[1], "first_of_op": first_of_op}  # the forward+backward row's own fields
    try:
        last["first_call_ms"] = call_ms(forward_backward, device)
    except Exception as error:  # the same error is the check's or the timed passes' row
        last["first_call_error"] = error_text(error)
    sinkhorn_case = isinstance(case, bench_sinkhorn.SinkhornCase)
    if name.startswith("klops") or not (sinkhorn_case or baseline_family(name) == "compile"):
        check = case.check if sinkhorn_case else partial(check_against_reference, case)
        try:
            common["rel_err"] = check(name, impl, z, y)
        except Exception as error:
            return [dict(common, error=error_text(error), **last)]
        common["correct"] = common["rel_err"] <= PASS_REL_ERR
        if not common["correct"]:  # a kernel that disagrees with the reference is not timed
            return [dict(common, **last)]
    rows = []
    for pass_name, step in zip(PASSES, (forward, forward_backward)):
        row = dict(common, **(last if pass_name == PASSES[1] else {"pass": pass_name}))
        rows.append(row)
        try:
            row["time_ms"] = time_ms(step, device, repeats)
            with PeakMemory(device) as peak:  # the forward's peak includes what it saves for the backward
                step()
        except Exception as error:
            row["error"] = error_text(error)
            continue
        row["peak_mem_mib"] = peak.peak / 2**20
        backward, seconds = pass_name != "forward", row["time_ms"] * 1e-3
        if case.hidden:  # matmul-bound: the fraction of the measured matmul rate
            row["tflop_per_s"] = case.min_flops(backward) / seconds / 1e12
            row["flops_fraction"] = row["tflop_per_s"] / ceilings["matmul_tflops"][row["dtype"]]
            continue
        if sinkhorn_case:  # compute on CUDA cores: a rate, no measured ceiling
            row["tflop_per_s"] = case.min_flops(backward) / seconds / 1e12
        if case.min_bytes(backward):
            row["gb_per_s"] = case.min_bytes(backward) / seconds / 1e9
            row["bandwidth_fraction"] = row["gb_per_s"] / ceilings["copy_bandwidth_gbps"]
    return rows


def error_text(error: Exception) -> str:
    return f"{type(error).__name__}: {str(error).splitlines()[0][:80]}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def versions() -> dict:
    """The versions a result depends on: klops, torch (and its CUDA), triton, python, and the baselines found."""
    import importlib.metadata
    import platform

    from . import __version__
    from .backend import CUDA_EXTENSION, TRITON_VERSION

    found = {"klops": __version__, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": TRITON_VERSION,
             "python": platform.python_version(),
             "klops._C": "built" if CUDA_EXTENSION is not None else None}  # fmt: skip
    for name in ("pot", "liger-kernel", "cut-cross-entropy", "matplotlib"):
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return found


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"
