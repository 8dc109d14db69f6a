"""``klops.fused_kl``: token-level KL and f-divergences on logits (docs/losses.md §1).

Layers of this op: ``kernels/divergence.py`` (Triton), ``csrc/divergence.cu`` (CUDA), the chunked torch
backend below, the custom ops ``klops::divergence`` / ``klops::divergence_backward``, and ``fused_kl``.

Gradient strategy: recomputation. The forward sweeps each row twice (logsumexp of both inputs, then
the loss and ``gbar``; once for forward / reverse KL between logit rows) and keeps five fp32 numbers
per row (raw row max and log-sum of both inputs, ``gbar``); the backward sweeps once more and writes
``dz``. Writing the gradient in the forward instead would move more bytes (a third sweep plus a
read-modify-write of ``dz`` to apply ``grad_output``: 18 vs 14 bytes per bf16 entry pair, 14 vs 10 for
forward / reverse KL) and would hold a [N, V] gradient alive from the loss to the backward; with
recomputation nothing of size [N, V] lives between them except the inputs the trainer holds anyway.
"""

import math

import torch

from . import _inputs
from ._chunked import (
    gradient_in_forward,
    log_softmax_from_stats,
    log_softmax_rows,
    row_chunks,
    scaled,
    scaled_total_grads,
)
from ._terms import divergence_terms, row_sums, teacher_probs
from .backend import launcher_table, resolve
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded
from .kernels.kinds import BY_NAME, DIVERGENCE_KINDS, KINDS
from .kernels.launch import TARGET_KINDS
from .topk import TopK, topk_rows

__all__ = ["fused_kl", "DIVERGENCE_KINDS", "KINDS"]


# ----------------------------------------------------------------------------------------------------
# torch backend: the kernels' math, chunked over rows (klops/_chunked.py) so that its extra memory
# is O(chunk * V).


def _teacher_check_stats(lp: torch.Tensor, p: torch.Tensor, target_is: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(top, log mass) per row of a teacher given as log-probs or probs, what _inputs.check_teacher_rows reads from
    the max_t / logsum_t slots: top = the largest log-prob, or the largest negated probability; log sum_v p_v."""
    top = lp.amax(-1) if target_is == "logprobs" else p.neg().amax(-1)
    return top, p.sum(-1).log()


def divergence_forward_torch(student, teacher, valid, kind: str, target_is: str, temperature: float, coef: float):
    """Chunked torch forward over (B, L, V) rows: (D, max_q, logsum_q, max_t, logsum_t, gbar), each
    (B, L) fp32; for a teacher given as log-probs or probs, max_t / logsum_t hold the statistics of its check
    (_teacher_check_stats)."""
    B, L, V = student.shape
    outputs = tuple(student.new_zeros((B, L), dtype=torch.float32) for _ in range(6))
    for b, rows in row_chunks(B, L, V):
        values = _divergence_rows(student[b, rows], teacher[b, rows], kind, target_is, temperature, coef)
        for out, value in zip(outputs, values):
            out[b, rows] = torch.where(valid[b, rows], value, 0.0)
    return outputs


def _divergence_rows(student, teacher, kind: str, target_is: str, temperature: float, coef: float):
    """(D, max_q, logsum_q, max_t, logsum_t, gbar) of a chunk of rows [C, V] (its temporaries freed on return)."""
    lq, q, max_q, logsum_q = log_softmax_rows(student, temperature)
    if target_is == "logits":
        lp, p, max_t, logsum_t = log_softmax_rows(teacher, temperature)
    else:
        lp, p = teacher_probs(teacher, target_is)
        max_t, logsum_t = _teacher_check_stats(lp, p, target_is)
    loss, gbar = row_sums(lq, q, lp, p, kind, coef)
    return loss, max_q, logsum_q, max_t, logsum_t, gbar


def divergence_backward_torch(
    grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t, gbar,
    kind: str, target_is: str, temperature: float, coef: float,
):  # fmt: skip
    """Chunked torch backward: (grad (a - q gbar) + grad_logp (onehot(label) - q)) / T per row, (B, L, V) in
    the student's dtype; the second term only with labels and grad_logp."""
    B, L, V = student.shape
    dz = torch.empty((B, L, V), dtype=student.dtype, device=student.device)
    for b, rows in row_chunks(B, L, V):
        stats = tuple(t[b, rows] for t in (max_q, logsum_q, max_t, logsum_t, gbar))
        label_grad = None
        if grad_logp is not None:
            label_grad = (torch.where(valid[b, rows], labels[b, rows], 0).long(), grad_logp[b, rows])
        dz[b, rows] = divergence_grad_rows(
            grad[b, rows], label_grad, student[b, rows], teacher[b, rows], *stats, kind, target_is, temperature, coef
        ).masked_fill_(~valid[b, rows][:, None], 0.0)
    return dz


def divergence_grad_rows(
    grad, label_grad, student, teacher, max_q, logsum_q, max_t, logsum_t, gbar,
    kind: str, target_is: str, temperature: float, coef: float,
):  # fmt: skip
    """The fp32 gradient [C, V] of a chunk of rows, built in place in its a; label_grad: (labels, grad_logp) or
    None. The temporaries are freed on return."""
    lq = log_softmax_from_stats(student, max_q, logsum_q, temperature)
    if target_is == "logits":
        lp = log_softmax_from_stats(teacher, max_t, logsum_t, temperature)
        p = lp.exp()
    else:
        lp, p = teacher_probs(teacher, target_is)
    q = lq.exp()
    chunk = -p if kind == "forward" else divergence_terms(lq, q, lp, p, kind, coef)[1]  # a, a new tensor
    chunk.addcmul_(q, gbar[:, None], value=-1.0).mul_((grad / temperature)[:, None])
    if label_grad is not None:
        labels, grad_logp = label_grad
        g = (grad_logp / temperature)[:, None]
        chunk.addcmul_(q, g, value=-1.0).scatter_add_(-1, labels[:, None], g)
    return chunk


# ----------------------------------------------------------------------------------------------------
# custom ops: one op per direction, so torch.compile sees a single node and autograd a single backward.


def _native_launchers(namespace: str) -> tuple:
    """(forward, backward) over ``torch.ops.<namespace>.divergence_forward`` / ``_backward``: the CUDA ops of
    klops._C (``klops_C``) or the C++ CPU ops (``klops_cpu``), which take the kind and target as integer ids."""

    def forward(student, teacher, valid, kind, target_is, temperature, coef):
        return getattr(torch.ops, namespace).divergence_forward(
            student, teacher, valid, DIVERGENCE_KINDS.index(kind), TARGET_KINDS.index(target_is), temperature, coef
        )

    def backward(
        grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t, gbar,
        kind, target_is, temperature, coef,
    ):  # fmt: skip
        return getattr(torch.ops, namespace).divergence_backward(
            grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t, gbar,
            DIVERGENCE_KINDS.index(kind), TARGET_KINDS.index(target_is), temperature, coef,
        )  # fmt: skip

    return forward, backward


_launchers = launcher_table(  # (forward, backward)
    triton=("klops.kernels.divergence:divergence_forward", "klops.kernels.divergence:divergence_backward"),
    cuda=_native_launchers("klops_C"),
    cpu=_native_launchers("klops_cpu"),
    torch=(divergence_forward_torch, divergence_backward_torch),
)


@torch.library.custom_op("klops::divergence", mutates_args=())
def divergence_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, V) student, teacher; (B, L) bool valid; (B, L) int64 labels or None -> (D, max_q, logsum_q,
    max_t, logsum_t, gbar, logp), each (B, L) fp32: the loss per row, what the backward needs to recompute
    q, p and dz, and log q of the label, (z_label - max_q) / T - logsum_q from one gathered entry per row
    (0 without labels and on invalid rows, whose labels must be in range but are not read). For a teacher given as
    log-probs or probs (which the backward recomputes without statistics), max_t / logsum_t hold what its check
    reads (_inputs.check_teacher_rows): its largest log-prob or negated probability, and log sum_v p_v."""
    forward, _ = _launchers(backend)
    outputs = forward(student, teacher, valid, kind, target_is, temperature, coef)
    max_q, logsum_q = outputs[1], outputs[2]
    if labels is None:
        return (*outputs, torch.zeros_like(max_q))
    z_label = student.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0]
    logp = torch.where(valid, scaled(z_label - max_q, temperature) - logsum_q, 0.0)
    return (*outputs, logp)


@divergence_op.register_fake
def _(student, teacher, valid, labels, kind, target_is, temperature, coef, backend):
    return tuple(student.new_empty(student.shape[:2], dtype=torch.float32) for _ in range(7))


@torch.library.custom_op("klops::divergence_backward", mutates_args=())
def divergence_backward_op(
    grad: torch.Tensor,
    grad_logp: torch.Tensor | None,
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    max_q: torch.Tensor,
    logsum_q: torch.Tensor,
    max_t: torch.Tensor,
    logsum_t: torch.Tensor,
    gbar: torch.Tensor,
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
    backend: str,
) -> torch.Tensor:
    """(B, L) fp32 grads of D and of logp (or None) -> (B, L, V) gradient of the student logits (its dtype)."""
    _, backward = _launchers(backend)
    return backward(
        grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t, gbar,
        kind, target_is, temperature, coef,
    )  # fmt: skip


@divergence_backward_op.register_fake
def _(grad, grad_logp, student, teacher, *stats_gbar_and_params):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def divergence_grad_of_chunk(grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t,
                             gbar, kind: str, target_is: str, temperature: float, coef: float,
                             backend: str) -> torch.Tensor:  # fmt: skip
    """divergence_backward_op's gradient for the chunked fused-linear path, where the chunk's (1, C, V) student
    logits are not read again: on the C++ CPU kernels it is written over them (contiguous), sparing the chunk's
    second [C, V] buffer; the other backends return a new tensor."""
    if backend == "cpu" and student.is_contiguous():
        torch.ops.klops_cpu.divergence_backward_over_student(
            grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t, gbar,
            DIVERGENCE_KINDS.index(kind), TARGET_KINDS.index(target_is), temperature, coef,
        )  # fmt: skip
        return student
    return divergence_backward_op(grad, grad_logp, student, teacher, valid, labels, max_q, logsum_q, max_t, logsum_t,
                                  gbar, kind, target_is, temperature, coef, backend)  # fmt: skip


def _setup_context(ctx, inputs, output):
    student, teacher, valid, labels, kind, target_is, temperature, coef, backend = inputs
    _, *stats_and_gbar, _ = output
    ctx.save_for_backward(student, teacher, valid, labels, *stats_and_gbar)
    ctx.params = (kind, target_is, temperature, coef, backend)


def _backward(ctx, grad_loss, *grad_stats_and_logp):
    student, teacher, valid, labels, *stats_and_gbar = ctx.saved_tensors
    grad_logp = None if labels is None else grad_stats_and_logp[-1]
    dz = divergence_backward_op(grad_loss, grad_logp, student, teacher, valid, labels, *stats_and_gbar, *ctx.params)
    return (dz,) + (None,) * 8


torch.library.register_autograd("klops::divergence", _backward, setup_context=_setup_context)


@torch.library.custom_op("klops::divergence_total", mutates_args=())
def divergence_total_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    weights: torch.Tensor | None,
    divisor: torch.Tensor | None,
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C++ CPU kernels' form of divergence_op for a scalar loss: (total, D, max_t, logsum_t, grad) with total =
    sum_r weights_r D_r / divisor (reduce_rows's value; weights and divisor may be None), D and max_t / logsum_t as
    divergence_op's, and grad = d total / dz = sum_r w_r dD_r / dz (B, L, V) in the student's dtype (the rows'
    weights w = weights / divisor, fp32), written in the same pass over each row as its D (the backward's sweep while
    the row is in the cache; divergence_forward_and_grad). Its backward scales grad by the upstream gradient."""
    row_weight = torch.ones_like(valid, dtype=torch.float32) if weights is None else weights.float()
    row_weight = row_weight if divisor is None else row_weight / divisor
    D, _, _, max_t, logsum_t, _, grad = torch.ops.klops_cpu.divergence_forward_and_grad(
        student, teacher, valid, row_weight, DIVERGENCE_KINDS.index(kind), TARGET_KINDS.index(target_is),
        temperature, coef,
    )  # fmt: skip
    total = (D if weights is None else D * weights.float()).sum()
    return total if divisor is None else total / divisor, D, max_t, logsum_t, grad


@divergence_total_op.register_fake
def _(student, teacher, valid, weights, divisor, kind, target_is, temperature, coef):
    rows = tuple(student.new_empty(student.shape[:2], dtype=torch.float32) for _ in range(3))
    return (student.new_empty((), dtype=torch.float32), *rows, torch.empty_like(student))


def _total_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(*output[1:])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(output[-1])
    ctx.dtype = inputs[0].dtype


@torch.autograd.function.once_differentiable
def _total_backward(ctx, grad_total, *_grad_rows):
    (grad,) = ctx.saved_tensors
    (grad_student,) = scaled_total_grads([grad], grad_total, [ctx.dtype], ctx.needs_input_grad[:1])
    return (grad_student,) + (None,) * 8


torch.library.register_autograd("klops::divergence_total", _total_backward, setup_context=_total_setup_context)


# ----------------------------------------------------------------------------------------------------
# public function


def _check_coefficient(kind: str, beta, alpha) -> tuple[str, float]:
    """The kernel's (kind, coef) from the coefficient the kind takes (its default when None), checked against the
    kinds table: its range; a coefficient where it is exactly another kind gives that kind (jsd with beta 0 / 1 is
    forward / reverse KL, docs/losses.md §1); an excluded one raises. A coefficient given to a kind that does not take
    it is an error, never silently ignored."""
    entry = BY_NAME[kind]
    takes = entry.coefficient
    for name, value in (("beta", beta), ("alpha", alpha)):
        if value is not None and name != takes:
            uses = f"takes {takes}, not {name}" if takes else f"takes no coefficient (beta or alpha), got {name}"
            raise ValueError(f"kind={kind!r} {uses}={value!r}")
    if takes is None:
        return kind, 0.0
    value = beta if takes == "beta" else alpha
    low, high = entry.range
    value = entry.default if value is None else value
    value = _inputs.check_real(takes, value, low=low, high=high, open_low=math.isinf(low))
    if value in dict(entry.excluded):
        values = " or ".join(f"{c:g}" for c, _ in entry.excluded)
        others = " / ".join(repr(other) for _, other in entry.excluded)
        raise ValueError(f"{takes} must not be {values} for kind={kind!r} (use kind={others})")
    if value in dict(entry.same_as):
        return dict(entry.same_as)[value], 0.0
    return kind, value


def check_divergence_options(kind, beta, alpha, temperature, target_is, reduction, num_items):
    """The checks of fused_kl's scalar options; returns the kernel's (kind, coef) and the temperature."""
    _inputs.check_choice("kind", kind, DIVERGENCE_KINDS)
    _inputs.check_choice("target_is", target_is, TARGET_KINDS)
    _inputs.check_choice("reduction", reduction, _inputs.REDUCTIONS)
    kernel_kind, coef = _check_coefficient(kind, beta, alpha)
    temperature = _inputs.check_temperature(temperature)
    _inputs.check_num_items(num_items, reduction)
    return kernel_kind, coef, temperature


def valid_rows_and_weights(ref_name, ref, vocab_size, labels, mask, weights, ignore_index):
    """(valid [...] bool, weights [...] or None) for the rows of ref ([..., V] logits or [..., D] hidden
    states): labels (checked in range) and mask select rows; [N] weights are viewed as the rows' shape."""
    rows_shape = ref.shape[:-1]
    valid = torch.ones(rows_shape, dtype=torch.bool, device=ref.device)
    if labels is not None:
        labels = _inputs.as_labels("labels", labels, ref_name, ref)
        _inputs.check_labels_in_range("labels", labels, vocab_size, ignore_index)
        valid = valid & (labels != ignore_index)
    if mask is not None:
        _inputs.check_same_rows("mask", mask, ref_name, ref)
        valid = valid & (mask != 0)
    if weights is not None:
        if isinstance(weights, torch.Tensor) and weights.dim() == 1 and weights.numel() == math.prod(rows_shape):
            weights = weights.reshape(rows_shape)  # flat [N] weights
        _inputs.check_same_rows("weights", weights, ref_name, ref)
    return valid, weights


def reduce_rows(rows: torch.Tensor, valid: torch.Tensor, reduction: str, num_items) -> torch.Tensor:
    """docs/losses.md §0 reductions of per-row values (0 on invalid rows); no host sync."""
    if reduction == "none":
        return rows
    divisor = _divisor(valid, reduction, num_items)
    return rows.sum() if divisor is None else rows.sum() / divisor


def _divisor(valid: torch.Tensor, reduction: str, num_items):
    """What a scalar reduction divides the sum of the rows by: num_items, else the valid rows' count ("mean",
    "batchmean"), or None ("sum")."""
    if num_items is not None:
        return num_items
    return None if reduction == "sum" else valid.sum().clamp(min=1)


def fused_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopK,
    kind: str = "forward",
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    target_is: str = "logits",
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Token-level divergence between teacher p and student q over the vocabulary, fused.

    ``q = softmax(student_logits / T)``; ``p = softmax(teacher_logits / T)`` (``target_is="logits"``), or
    ``p = exp(teacher_logits)`` (``"logprobs"``) or ``p = teacher_logits`` (``"probs"``): a teacher given as
    log-probs or probs is used as it is, without temperature or renormalization.

    ==============  ====================================  ===========================================
    kind            D(p, q) per row                       f-DPO generator, D = sum p f(q/p)
    ==============  ====================================  ===========================================
    forward         KL(p||q) = sum p log(p/q)              f(w) = -log w
    reverse         KL(q||p) = sum q log(q/p)              f(w) = w log w
    jsd (beta)      beta KL(p||m) + (1-beta) KL(q||m),     beta=1/2: half of f(w) = w log w
                    m = beta p + (1-beta) q;               - (w+1) log((w+1)/2)
                    beta=0: KL(p||q), beta=1: KL(q||p)
    skew_forward    KL(p||m), m = alpha p + (1-alpha) q    f(w) = -log(alpha + (1-alpha) w)
    skew_reverse    KL(q||n), n = (1-alpha) p + alpha q    f(w) = w log(w / (1-alpha + alpha w))
    tv              1/2 sum |p - q|                        f(w) = |w - 1| / 2
    alpha (Amari)   (1 - sum p^a q^(1-a)) / (a (1-a))      f(w) = (w^(1-a) - (1-a) w - a) / (a (a-1))
    ==============  ====================================  ===========================================

    Args:
        student_logits: [..., V] fp32/bf16/fp16, stride 1 along V; receives the gradient
            ``dD/dz = q (g - sum q g) / T`` (docs/losses.md §1) in its own dtype.
        teacher_logits: [..., V], any of those dtypes; gets no gradient (it is treated as a constant). Or a
            sparse ``klops.TopK`` teacher (its ids and log-probs ``[..., k]``; the temperature applies to the
            student only; see ``TopK`` for its tail modes, and for the check of its log-probs).
        beta: jsd's mixture weight (default 0.5); alpha: skew_forward / skew_reverse's mixture weight or
            Amari's alpha (default 0.5). A coefficient the kind does not take raises ValueError.
        labels, mask: [...] optional; rows whose label is ``ignore_index`` or whose mask is 0 give 0 and
            a zero gradient. Labels of any integer dtype; on GPU tensors their range is checked by a
            device-side assertion, without a host sync (``klops.set_host_checks``).
        weights: [...] or [N] optional per-row weights multiplying D (for AKL / BD-KD mixtures); they get the
            gradient D.
        reduction: "none" ([...] fp32), "sum", "mean" / "batchmean" (over valid rows, unweighted count);
            ``num_items`` (int or 0-d tensor) replaces the denominator (not with "none").
        target_is: "logits" (default), "logprobs" or "probs": how ``teacher_logits`` is read. Log-probs and probs
            must be normalized: on the valid rows, no log-prob above 0 nor negative probability, and a mass
            ``sum_v p_v`` within ``exp(+-tol)`` of 1, ``tol = eps (1 + log V)`` with the eps of the teacher's dtype
            (bfloat16's for float32; 0.10 at V = 128256, 0.013 in float16), enough for any rounded teacher and far
            below the mistakes it catches (probabilities passed as log-probs, logits as probabilities). Checked
            from statistics of the forward's own sweep over the teacher: a ``ValueError`` naming
            ``teacher_logits`` on CPU tensors and under ``klops.set_host_checks(True)``, else a device-side
            assertion, never a host sync.
        backend: "auto" | "cuda" | "triton" | "torch" (see ``klops.backend``).
        vocab_group: the process group over which the vocabulary is sharded: both logits ``[..., V_r]`` are this
            rank's contiguous slice (the same for both), in rank order (or from ``vocab_start``); labels are global ids;
            every rank gets the same loss and the gradient of its shard (klops/vocab_parallel.py). DTensors placed
            ``Shard(-1)`` on a 1-D mesh need none. The loss is a plain tensor. A ``TopK`` teacher's ids are global
            (klops/vocab_parallel_distill.py).

    Returns the fp32 loss.
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(student_logits):
        form = "fused_kl_topk" if isinstance(teacher_logits, TopK) else "fused_kl"
        return VOCAB_PARALLEL_FORMS[form](
            student_logits, teacher_logits, kind, beta=beta, alpha=alpha, temperature=temperature, labels=labels,
            mask=mask, weights=weights, ignore_index=ignore_index, reduction=reduction, num_items=num_items,
            target_is=target_is, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    _inputs.check_logits("student_logits", student_logits)
    kernel_kind, coef, temperature = check_divergence_options(
        kind, beta, alpha, temperature, target_is, reduction, num_items
    )
    if isinstance(teacher_logits, TopK):
        if target_is != "logits":
            raise ValueError(f"a TopK teacher carries its log-probs; target_is={target_is!r} is for dense teachers")
    else:
        _inputs.check_dense_teacher(teacher_logits, student_logits)
    valid, weights = valid_rows_and_weights(
        "student_logits", student_logits, student_logits.shape[-1], labels, mask, weights, ignore_index
    )
    if isinstance(teacher_logits, TopK):
        rows, _ = topk_rows(student_logits, teacher_logits, valid, kernel_kind, kind, coef, temperature, backend)
    else:
        backend = resolve("divergence", backend, student_logits.device)
        student3, teacher3 = _inputs.as_rows(student_logits, teacher_logits)
        valid3 = valid.reshape(student3.shape[:2])
        if _gradient_in_forward(backend, student_logits, weights, reduction):
            divisor = _divisor(valid, reduction, num_items)
            divisor = torch.as_tensor(divisor, device=valid.device) if isinstance(divisor, int) else divisor
            total, _, top, log_mass, _ = divergence_total_op(
                student3, teacher3, valid3, None if weights is None else weights.reshape(valid3.shape), divisor,
                kernel_kind, target_is, temperature, coef,
            )  # fmt: skip
            _inputs.check_teacher_rows(
                "teacher_logits", target_is, teacher_logits.dtype, teacher_logits.shape[-1], valid3, top, log_mass
            )
            return total
        rows, _, _, top, log_mass, _, _ = divergence_op(
            student3, teacher3, valid3, None, kernel_kind, target_is, temperature, coef, backend
        )
        _inputs.check_teacher_rows(
            "teacher_logits", target_is, teacher_logits.dtype, teacher_logits.shape[-1], valid3, top, log_mass
        )
        rows = rows.reshape(valid.shape)
    if weights is not None:
        rows = rows * weights.float()
    return reduce_rows(rows, valid, reduction, num_items)


def _gradient_in_forward(backend: str, student: torch.Tensor, weights, reduction: str) -> bool:
    """Whether fused_kl takes divergence_total_op: the C++ CPU kernels, fp32 student logits (a bf16 gradient scaled
    by a non-unit upstream gradient would be rounded twice), a scalar loss whose gradient is wanted, and no gradient
    to the row weights."""
    wanted = gradient_in_forward(reduction, student) and not (
        isinstance(weights, torch.Tensor) and weights.requires_grad
    )
    return backend == "cpu" and student.dtype == torch.float32 and wanted


def divergence_and_label_logprobs(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | TopK,
    labels: torch.Tensor,
    kind: str = "forward",
    *,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``(D, log q(label), log p(label))`` per row ``[...]`` fp32 from one sweep over both logit rows: the
    divergence of ``fused_kl(reduction="none")``, the student's log-prob of each row's label (with its gradient
    ``(onehot - q) / T``, written in the same backward sweep as D's) and the teacher's (no gradient; from the
    forward's row statistics and one gathered entry). Rows whose label is ``ignore_index`` or whose mask is 0
    give 0 in all three. For TDPO (a reference and its policy) and SFT + distillation mixes. The teacher may be
    a ``klops.TopK``: then the third value is None (the label need not be among its ids).

    ``vocab_group`` / ``vocab_start``: vocabulary-sharded logits, as ``fused_kl`` takes them (labels and a ``TopK``
    teacher's ids are global; klops/vocab_parallel_distill.py)."""
    if vocab_group is not None or vocab_start is not None or is_sharded(student_logits):
        return VOCAB_PARALLEL_FORMS["divergence_and_label_logprobs"](
            student_logits, teacher_logits, labels, kind, beta=beta, alpha=alpha, temperature=temperature, mask=mask,
            ignore_index=ignore_index, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    _inputs.check_logits("student_logits", student_logits)
    if not isinstance(teacher_logits, TopK):
        _inputs.check_dense_teacher(teacher_logits, student_logits)
    kernel_kind, coef, temperature = check_divergence_options(kind, beta, alpha, temperature, "logits", "none", None)
    valid, _ = valid_rows_and_weights(
        "student_logits", student_logits, student_logits.shape[-1], labels, mask, None, ignore_index
    )
    if isinstance(teacher_logits, TopK):
        rows, logp = topk_rows(student_logits, teacher_logits, valid, kernel_kind, kind, coef, temperature, backend,
                               labels=labels)  # fmt: skip
        return rows, logp, None
    backend = resolve("divergence", backend, student_logits.device)
    student3, teacher3 = _inputs.as_rows(student_logits, teacher_logits)
    rows_shape = student3.shape[:2]
    valid3, labels3 = valid.reshape(rows_shape), labels.long().reshape(rows_shape)
    rows, _, _, max_t, logsum_t, _, logp = divergence_op(
        student3, teacher3, valid3, labels3, kernel_kind, "logits", temperature, coef, backend
    )
    teacher_label = teacher3.gather(-1, torch.where(valid3, labels3, 0)[..., None])[..., 0].float()
    teacher_logp = torch.where(valid3, scaled(teacher_label - max_t, temperature) - logsum_t, 0.0)
    return rows.reshape(valid.shape), logp.reshape(valid.shape), teacher_logp.detach().reshape(valid.shape)
