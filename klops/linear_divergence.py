"""Fused-linear divergences: ``klops.fused_kl`` from the student's (and the teacher's) last hidden states and LM
heads, neither model's ``[N, V]`` logits formed (docs/losses.md §1 on ``logits = softcap(hidden @ weight.T +
bias)``): the custom ops ``klops::linear_divergence`` / its backward / ``klops::linear_divergence_total`` and the
public ``fused_linear_kl`` and ``linear_divergence_and_label_logprobs``. The two paths (the fused Triton kernels of
kernels/linear_divergence.py, or the chunked path over the row ops), their FLOPs and memory: klops/linear.py's
module docstring, which the log-probs and the cross-entropy share with these.
"""

import torch

from . import _inputs
from ._chunked import (
    cast_grads,
    chunk_row_weights,
    chunked_backward,
    chunked_rows,
    chunked_total,
    empty_rows,
    fake_grads,
    fake_total,
    gradient_in_forward,
    logits_of_chunks,
    reduction_row_weights,
    register_total_autograd,
)
from ._inputs import check_linear, check_softcap
from .backend import resolve
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded
from .divergence import (
    check_divergence_options,
    divergence_grad_of_chunk,
    divergence_op,
    reduce_rows,
    valid_rows_and_weights,
)
from .topk import TopK, linear_topk_rows

__all__ = ["fused_linear_kl", "linear_divergence_and_label_logprobs"]

# ----------------------------------------------------------------------------------------------------
# divergences


@torch.library.custom_op("klops::linear_divergence", mutates_args=())
def linear_divergence_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
    softcap: float | None,
    teacher_softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' (D, max_q, logsum_q, max_t, logsum_t, gbar, logp), each (B, L) fp32, of the divergence between
    the teacher (teacher_hidden @ teacher_weight^T + teacher_bias, or teacher_logits (B, L, V)) and the
    student's logits, a chunk of rows at a time (or a tile at a time, neither model's logits stored, on the
    Triton backend); logp is log q of the label (0 without labels); max_t / logsum_t of teacher_logits given as
    log-probs or probs are the statistics of their check (as divergence_op's)."""
    if backend == "triton":
        from .kernels import linear_divergence as fused

        teacher = teacher_hidden if teacher_logits is None else teacher_logits
        return fused.linear_divergence_forward(
            hidden, weight, bias, teacher, teacher_weight, teacher_bias, valid, labels, kind, target_is, temperature,
            coef, softcap, teacher_softcap,
        )  # fmt: skip

    teacher = teacher_chunks(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap)

    def chunk_rows(z, rows):
        y = teacher(rows)
        chunk_labels = None if labels is None else labels[rows][None]
        return divergence_op(z, y, valid[rows][None], chunk_labels, kind, target_is, temperature, coef, backend)

    return chunked_rows(hidden, weight, bias, softcap, empty_rows(hidden, 7), chunk_rows)


def teacher_chunks(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap):
    """rows -> the teacher's logits [1, C, V] of a chunk of rows: a view of teacher_logits, or formed from its hidden
    states (under its own soft cap) into one buffer for the sweep (logits_of_chunks)."""
    if teacher_logits is not None:
        return lambda rows: teacher_logits[rows][None]
    logits = logits_of_chunks(teacher_hidden, teacher_weight, teacher_bias, teacher_softcap)
    return lambda rows: logits(rows)[0][None]


@linear_divergence_op.register_fake
def _(hidden, weight, *rest):
    return empty_rows(hidden, 7)


@torch.library.custom_op("klops::linear_divergence_backward", mutates_args=())
def linear_divergence_backward_op(
    grad: torch.Tensor,
    grad_logp: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
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
    softcap: float | None,
    teacher_softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) fp32 grads of D and of logp (or None) -> the student's (grad_hidden, grad_weight, grad_bias or
    [0]); the teacher gets none."""
    if backend == "triton":
        from .kernels import linear_divergence as fused

        teacher = teacher_hidden if teacher_logits is None else teacher_logits
        grads = fused.linear_divergence_backward(
            grad, grad_logp, hidden, weight, bias, teacher, teacher_weight, teacher_bias, valid, labels,
            (max_q, logsum_q, max_t, logsum_t, gbar), kind, target_is, temperature, coef, softcap, teacher_softcap,
        )  # fmt: skip
        return cast_grads(grads, weight, bias)

    teacher = teacher_chunks(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap)

    def chunk_grad(z, rows):
        y = teacher(rows)
        stats = (x[rows][None] for x in (max_q, logsum_q, max_t, logsum_t, gbar))
        chunk_grad_logp = None if grad_logp is None else grad_logp[rows][None]
        chunk_labels = None if grad_logp is None else labels[rows][None]
        return divergence_grad_of_chunk(
            grad[rows][None], chunk_grad_logp, z, y, valid[rows][None], chunk_labels, *stats,
            kind, target_is, temperature, coef, backend,
        )  # fmt: skip

    return chunked_backward(hidden, weight, bias, softcap, chunk_grad)


@linear_divergence_backward_op.register_fake
def _(grad, grad_logp, hidden, weight, bias, *rest):
    return fake_grads(hidden, weight, bias)


def _divergence_setup_context(ctx, inputs, output):
    *tensors, kind, target_is, temperature, coef, softcap, teacher_softcap, backend = inputs
    _, *stats_and_gbar, _ = output
    ctx.has_bias = tensors[2] is not None
    ctx.save_for_backward(*tensors, *stats_and_gbar)
    ctx.params = (kind, target_is, temperature, coef, softcap, teacher_softcap, backend)


def _divergence_backward(ctx, grad_rows, *grad_stats_and_logp):
    hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, valid, labels, *stats = ctx.saved_tensors
    grad_logp = None if labels is None else grad_stats_and_logp[-1]
    grad_hidden, grad_weight, grad_bias = linear_divergence_backward_op(
        grad_rows, grad_logp, hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, valid, labels, *stats,
        *ctx.params,
    )  # fmt: skip
    return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 13


torch.library.register_autograd(
    "klops::linear_divergence", _divergence_backward, setup_context=_divergence_setup_context
)


@torch.library.custom_op("klops::linear_divergence_total", mutates_args=())
def linear_divergence_total_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor | None,
    teacher_weight: torch.Tensor | None,
    teacher_bias: torch.Tensor | None,
    teacher_logits: torch.Tensor | None,
    valid: torch.Tensor,
    row_weight: torch.Tensor | None,
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
    softcap: float | None,
    teacher_softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, D, grad_hidden, grad_weight, grad_bias, max_t, logsum_t) of the chunked path for a scalar loss:
    the (B, L) rows' D (as linear_divergence_op's), total = sum_r w_r D_r (w = row_weight, or 1) and its fp32
    gradient formed in the same sweep (klops/_chunked.py); max_t / logsum_t as linear_divergence_op's."""

    teacher = teacher_chunks(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap)

    def chunk_total(z, rows):
        y = teacher(rows)
        options = (kind, target_is, temperature, coef, backend)
        D, *stats, _ = divergence_op(z, y, valid[rows][None], None, *options)
        g = chunk_row_weights(row_weight, rows, D)
        return (D, *stats[2:4]), divergence_grad_of_chunk(g, None, z, y, valid[rows][None], None, *stats, *options)

    return chunked_total(hidden, weight, bias, softcap, row_weight, empty_rows(hidden, 3), chunk_total)


@linear_divergence_total_op.register_fake
def _(hidden, weight, bias, *rest):
    return fake_total(hidden, weight, bias, 2)


register_total_autograd("klops::linear_divergence_total", 8)


# ----------------------------------------------------------------------------------------------------
# public functions


def fused_linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | TopK | None = None,
    teacher_weight: torch.Tensor | None = None,
    *,
    teacher_logits: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    kind: str = "forward",
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    teacher_softcap: float | None | str = "same",
    teacher_logit_scale: float | str = "same",
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
    """``klops.fused_kl`` between the teacher and ``student logits = softcap(logit_scale * (student_hidden @
    student_weight.T + student_bias))``, without forming either model's logits.

    The teacher is ``teacher_hidden [..., Dt]`` with ``teacher_weight [V, Dt]`` (and ``teacher_bias``; on-policy
    distillation: its logits are formed a chunk at a time too, with ``teacher_softcap`` and ``teacher_logit_scale``,
    by default the student's ``softcap`` and ``logit_scale``), or
    ``teacher_logits [..., V]`` (used as they are, read as ``target_is``; log-probs and probs are checked to be
    normalized as in ``fused_kl``, from the forward's own sweep), or a sparse ``klops.TopK`` in the
    ``teacher_hidden`` position (no teacher weight; see ``TopK``). Student and teacher may have
    different hidden sizes; their vocabularies must match. Every kind, coefficient and option of
    ``fused_kl``, with the same semantics; gradients flow to ``student_hidden``, ``student_weight`` and
    ``student_bias``, and to ``weights`` (their gradient is the per-row divergence), never to the teacher.

    ``vocab_group`` / ``vocab_start``: both heads (or the student's head and ``teacher_logits [..., V_r]``) sharded
    over the vocabulary alike, as in ``fused_linear_cross_entropy``.
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(student_weight) or is_sharded(teacher_weight):
        return VOCAB_PARALLEL_FORMS["fused_linear_kl"](
            student_hidden, student_weight, teacher_hidden, teacher_weight, teacher_logits=teacher_logits,
            student_bias=student_bias, teacher_bias=teacher_bias, kind=kind, beta=beta, alpha=alpha,
            temperature=temperature, softcap=softcap, logit_scale=logit_scale, teacher_softcap=teacher_softcap,
            teacher_logit_scale=teacher_logit_scale, labels=labels, mask=mask, weights=weights,
            ignore_index=ignore_index, reduction=reduction, num_items=num_items, target_is=target_is,
            backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    V = student_weight.shape[0]
    if (teacher_softcap != "same" or teacher_logit_scale != "same") and (
        teacher_logits is not None or isinstance(teacher_hidden, TopK)
    ):
        raise ValueError("teacher_softcap and teacher_logit_scale apply to a teacher given as hidden states and a head")
    if isinstance(teacher_hidden, TopK):
        if teacher_weight is not None or teacher_bias is not None or teacher_logits is not None:
            raise ValueError("a TopK teacher (in the teacher_hidden position) takes no teacher_weight, bias or logits")
        if target_is != "logits":
            raise ValueError(f"a TopK teacher carries its log-probs; target_is={target_is!r} is for teacher_logits")
    elif teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("give the teacher as teacher_hidden + teacher_weight or as teacher_logits, not both")
        _inputs.check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[-1] != V:
            raise ValueError(
                f"vocabulary mismatch: student_weight has V={V}, teacher_logits has V={teacher_logits.shape[-1]}"
            )
        if teacher_logits.shape[:-1] != student_hidden.shape[:-1] or teacher_logits.device != student_hidden.device:
            raise ValueError(
                f"teacher_logits must have shape {tuple(student_hidden.shape[:-1]) + (V,)} on {student_hidden.device}, "
                f"got {tuple(teacher_logits.shape)} on {teacher_logits.device}"
            )
    else:
        if teacher_hidden is None or teacher_weight is None:
            raise ValueError("the teacher is missing: give teacher_hidden and teacher_weight, or teacher_logits")
        check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
        if teacher_weight.shape[0] != V:
            raise ValueError(
                f"vocabulary mismatch: student_weight has V={V}, teacher_weight has V={teacher_weight.shape[0]}"
            )
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1] or teacher_hidden.device != student_hidden.device:
            raise ValueError(
                f"teacher_hidden must have the rows of student_hidden {tuple(student_hidden.shape[:-1])} on "
                f"{student_hidden.device}, got {tuple(teacher_hidden.shape[:-1])} on {teacher_hidden.device}"
            )
        if target_is != "logits":
            raise ValueError(
                f"a teacher given as hidden states gives logits; target_is={target_is!r} is for teacher_logits"
            )
    kernel_kind, coef, temperature = check_divergence_options(
        kind, beta, alpha, temperature, target_is, reduction, num_items
    )
    softcap = check_softcap(softcap)
    teacher_softcap = softcap if teacher_softcap == "same" else check_softcap(teacher_softcap, "teacher_softcap")
    if teacher_weight is not None:
        scale = logit_scale if teacher_logit_scale == "same" else teacher_logit_scale
        teacher_hidden, teacher_bias = _inputs.scale_head_inputs(
            "teacher_logit_scale", scale, teacher_hidden, teacher_bias
        )
    student_hidden, student_bias = _inputs.scale_head_inputs("logit_scale", logit_scale, student_hidden, student_bias)
    valid, weights = valid_rows_and_weights("student_hidden", student_hidden, V, labels, mask, weights, ignore_index)
    in_forward = gradient_in_forward(reduction, student_hidden, student_weight, student_bias)
    if isinstance(teacher_hidden, TopK):  # always the chunked path; in the forward, the op's sum is the loss
        row_weight = reduction_row_weights(valid, weights, reduction, num_items) if in_forward else None
        rows, _ = linear_topk_rows(
            student_hidden, student_weight, student_bias, teacher_hidden, valid,
            kernel_kind, kind, coef, temperature, softcap, backend, row_weight=row_weight, total=in_forward,
        )  # fmt: skip
        return rows if in_forward else reduce_rows(_weighted(rows, weights), valid, reduction, num_items)
    backend = resolve("linear", backend, student_hidden.device)

    # (B, L, D) and (B, L, V) views without a copy, e.g. of hidden[:, :-1] or teacher_logits[:, :-1]
    if teacher_logits is not None:
        student3, teacher_logits3 = _inputs.as_rows(student_hidden, teacher_logits)
        teacher = (None, None, None, teacher_logits3)
    else:
        student3, teacher3 = _inputs.as_rows(student_hidden, teacher_hidden)
        teacher = (teacher3, teacher_weight, teacher_bias, None)
    valid3 = valid.reshape(student3.shape[:2])
    options = (kernel_kind, target_is, temperature, coef, softcap, teacher_softcap, backend)
    in_forward = in_forward and backend != "triton"
    if in_forward:  # the gradient in the forward; the op's weighted sum is the reduced loss itself
        row_weight = reduction_row_weights(valid, weights, reduction, num_items)
        row_weight = None if row_weight is None else row_weight.reshape(valid3.shape)
        loss, *_, top, log_mass = linear_divergence_total_op(
            student3, student_weight, student_bias, *teacher, valid3, row_weight, *options
        )
    else:
        rows, _, _, top, log_mass, _, _ = linear_divergence_op(
            student3, student_weight, student_bias, *teacher, valid3, None, *options
        )
        loss = reduce_rows(_weighted(rows.reshape(valid.shape), weights), valid, reduction, num_items)
    if teacher_logits is not None:  # normalized log-probs / probs, from the forward's statistics (fused_kl)
        _inputs.check_teacher_rows("teacher_logits", target_is, teacher_logits.dtype, V, valid3, top, log_mass)
    return loss


def _weighted(rows, weights):
    """rows times the per-row weights, if any."""
    return rows if weights is None else rows * weights.float()


def linear_divergence_and_label_logprobs(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor | TopK,
    teacher_weight: torch.Tensor | None,
    labels: torch.Tensor,
    kind: str = "forward",
    *,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``klops.divergence.divergence_and_label_logprobs`` from hidden states and heads, neither model's logits
    formed: ``(D, log q(label), log p(label))`` per row, gradients to the student's hidden, weight and bias. The
    teacher may be a ``klops.TopK`` in the ``teacher_hidden`` position (no teacher weight); then the third value
    is None."""
    check_linear("student_hidden", student_hidden, "student_weight", student_weight, "student_bias", student_bias)
    V = student_weight.shape[0]
    topk = isinstance(teacher_hidden, TopK)
    if topk and (teacher_weight is not None or teacher_bias is not None):
        raise ValueError("a TopK teacher (in the teacher_hidden position) takes no teacher_weight or bias")
    if not topk:
        check_linear("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight, "teacher_bias", teacher_bias)
        if teacher_weight.shape[0] != V or teacher_hidden.shape[:-1] != student_hidden.shape[:-1]:
            raise ValueError(
                f"the teacher must have V={V} and the rows {tuple(student_hidden.shape[:-1])} of student_hidden, "
                f"got V={teacher_weight.shape[0]} and rows {tuple(teacher_hidden.shape[:-1])}"
            )
    kernel_kind, coef, temperature = check_divergence_options(kind, beta, alpha, temperature, "logits", "none", None)
    softcap = check_softcap(softcap)
    valid, _ = valid_rows_and_weights("student_hidden", student_hidden, V, labels, mask, None, ignore_index)
    if topk:
        rows, logp = linear_topk_rows(
            student_hidden, student_weight, student_bias, teacher_hidden, valid, kernel_kind, kind, coef, temperature,
            softcap, backend, labels=labels,
        )  # fmt: skip
        return rows, logp, None
    backend = resolve("linear", backend, student_hidden.device)
    student3, teacher3 = _inputs.as_rows(student_hidden, teacher_hidden)
    rows_shape = student3.shape[:2]
    valid3, labels3 = valid.reshape(rows_shape), labels.long().reshape(rows_shape)
    rows, _, _, max_t, logsum_t, _, logp = linear_divergence_op(
        student3, student_weight, student_bias, teacher3, teacher_weight, teacher_bias, None, valid3, labels3,
        kernel_kind, "logits", temperature, coef, softcap, softcap, backend,
    )  # fmt: skip
    with torch.no_grad():  # the teacher's logit of each label: one row of its head per token
        read = torch.where(valid3, labels3, 0)  # ignored rows' labels are not valid indices
        y = (teacher3.float() * teacher_weight[read].float()).sum(-1)
        if teacher_bias is not None:
            y = y + teacher_bias[read].float()
        if backend != "triton":  # rounded as F.linear rounds the chunks' logits (the fused kernels keep fp32)
            y = y.to(teacher_weight.dtype).float()
        if softcap is not None:
            y = softcap * torch.tanh(y / softcap)
        teacher_logp = torch.where(valid3, (y - max_t) / temperature - logsum_t, 0.0)
    return rows.reshape(valid.shape), logp.reshape(valid.shape), teacher_logp.reshape(valid.shape)
