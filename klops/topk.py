"""Sparse top-k teachers: ``klops.TopK`` and the divergences of ``fused_kl`` / ``fused_linear_kl`` against one
(docs/losses.md §1, sparse teachers; DCKD / ADPA store top-50 plus one bin for the leftover mass).

Layers of this op: ``kernels/topk.py`` (Triton, where the math is written out), ``csrc/topk.cu`` (CUDA), the
chunked torch backend below, the custom ops ``klops::topk_divergence`` / ``klops::linear_topk_divergence`` and
their backwards. The public entry points are ``fused_kl`` and ``fused_linear_kl`` with a ``TopK`` teacher.

The k teacher positions are gathered, never scattered into an [N, V] tensor: per row the forward keeps the
student's statistics outside the top-k (so that its tail mass keeps full precision when tiny), the tail's
gradient coefficient and k fp32 corrections; the backward writes ``dz = q times a per-row constant`` on
every entry outside the top-k and the k corrections in place. Nothing of size [N, V] besides the gradient.
"""

import math
from dataclasses import dataclass

import torch

from . import _inputs
from ._chunked import (
    chunk_row_weights,
    chunked_backward,
    chunked_rows,
    chunked_total,
    empty_rows,
    fake_grads,
    fake_total,
    log_softmax_from_stats,
    register_total_autograd,
    row_chunks,
    row_stats,
    scaled,
)
from ._terms import divergence_terms
from .backend import launcher_table, resolve
from .kernels.kinds import BY_NAME, DIVERGENCE_KINDS, finite_where_p_is_0, infinite_where_p_is_0

__all__ = ["TopK", "TAILS"]

TAILS = ("bin", "renormalize")


@dataclass(frozen=True, eq=False)
class TopK:
    """A teacher stored as its top-k tokens, accepted wherever ``fused_kl`` / ``fused_linear_kl`` take a teacher.

    Args:
        indices: ``[..., k]`` integer token ids, distinct within a row, in any order; the rows ``[...]`` are the
            student's (``[B, L-1, k]`` for ``logits[:, :-1]``).
        logprobs: ``[..., k]`` float, the teacher's log-probabilities of those tokens, used as given: the
            temperature of ``fused_kl`` applies to the student only. For a teacher temperature ``Tt``, produce the
            top-k from ``log_softmax(teacher_logits / Tt)``. The ops check the valid rows: no entry above 0, and
            ``logsumexp`` (the top-k's mass) not above 0, within the tolerance of dense log-probs (``fused_kl``'s
            ``target_is``); raw logits in their place raise ValueError (a device-side assertion on a GPU).
        tail: how the teacher's mass outside the top-k enters, with ``q = softmax(z / T)`` over the whole vocabulary:

            - ``"bin"`` (DCKD / ADPA): the divergence between two distributions over k + 1 outcomes, the
              teacher's ``(p_S, max(0, 1 - sum p_S))`` and the student's ``(q_S, 1 - sum q_S)``. A teacher mass
              that exceeds 1 by rounding gives a tail of 0, never NaN. With k = V there is no tail: the dense op.
            - ``"renormalize"``: the teacher is ``p_S / sum p_S`` on its top-k and 0 elsewhere (the dense op with
              a sparse teacher). Kinds that are infinite where the teacher is 0 (reverse KL, jsd with beta = 1,
              skew_reverse with alpha = 0, Amari alpha < 0) raise ValueError.
    """

    indices: torch.Tensor
    logprobs: torch.Tensor
    tail: str = "bin"

    def __post_init__(self):
        if not isinstance(self.indices, torch.Tensor) or not isinstance(self.logprobs, torch.Tensor):
            raise TypeError("TopK indices and logprobs must be torch.Tensors")
        if self.indices.dtype.is_floating_point or self.indices.dtype.is_complex or self.indices.dtype == torch.bool:
            raise TypeError(f"TopK indices must be an integer tensor, got {self.indices.dtype}")
        if self.logprobs.dtype not in _inputs.LOGIT_DTYPES:
            raise TypeError(f"TopK logprobs must have dtype float32, bfloat16 or float16, got {self.logprobs.dtype}")
        if self.indices.dim() < 1 or self.indices.shape[-1] == 0 or self.indices.shape != self.logprobs.shape:
            raise ValueError(
                f"TopK indices and logprobs must have one shape [..., k] with k >= 1, got {tuple(self.indices.shape)} "
                f"and {tuple(self.logprobs.shape)}"
            )
        if self.indices.device != self.logprobs.device:
            raise ValueError(f"TopK indices are on {self.indices.device} but logprobs on {self.logprobs.device}")
        _inputs.check_choice("tail", self.tail, TAILS)


def check_topk_logprobs(name: str, topk: TopK, vocab_size: int, valid: torch.Tensor) -> None:
    """The valid rows of ``topk.logprobs`` are log-probabilities of a distribution over V tokens: no entry above 0
    and a log-sum-exp (the log of the top-k's mass) not above 0, within ``_inputs.teacher_tolerance`` of their
    dtype. Raw logits in their place give entries and a log-sum-exp of their scale above 0 (a finite, wrong loss)."""
    lp = topk.logprobs.float()
    tol = _inputs.teacher_tolerance(topk.logprobs.dtype, vocab_size)
    what = (
        f"{name} (TopK.logprobs) must hold log-probabilities (each <= 0, exp summing to at most 1 per row, within "
        f"{tol:.2g} for {topk.logprobs.dtype} at V={vocab_size}): build a TopK from log_softmax(teacher_logits), "
        "not raw logits"
    )
    top = lp.amax(-1)
    _inputs.check_none(valid & ~(top <= tol), top, f"{what}; a row's largest entry is above 0")
    log_mass = torch.logsumexp(lp, -1)
    _inputs.check_none(valid & ~(log_mass <= tol), log_mass.exp(), f"{what}; a row's probabilities sum to")


def sorted_topk(topk: TopK, name: str, ref_name: str, ref: torch.Tensor, vocab_size: int, valid: torch.Tensor):
    """(indices int32, logprobs) of ``topk`` (the argument ``name``) sorted by token id within each row, ``[..., k]``
    contiguous (what every backend reads), after the checks of its rows against ``ref`` ([..., V] logits or [..., D]
    hidden states), of the valid rows' ids: in [0, V) and distinct, and of their log-probs (check_topk_logprobs)
    (eager ValueError on CPU tensors; a device-side assertion otherwise, see ``klops.set_host_checks``)."""
    if not isinstance(topk, TopK):
        raise TypeError(f"expected a klops.TopK teacher, got {type(topk).__name__}")
    rows, k = tuple(ref.shape[:-1]), topk.indices.shape[-1]
    if tuple(topk.indices.shape[:-1]) != rows:
        raise ValueError(
            f"TopK indices must have shape {rows + (k,)} (the rows of {ref_name}), got {tuple(topk.indices.shape)}"
        )
    if topk.indices.device != ref.device:
        raise ValueError(f"TopK indices are on {topk.indices.device} but {ref_name} is on {ref.device}")
    if k > vocab_size:
        raise ValueError(f"TopK has k={k} ids per row, more than the vocabulary V={vocab_size}")
    indices, order = topk.indices.long().sort(dim=-1)
    keep = valid[..., None]
    outside = keep & ((indices < 0) | (indices >= vocab_size))
    _inputs.check_none(outside, indices, f"TopK indices must lie in [0, {vocab_size})")
    repeated = keep & (indices[..., 1:] == indices[..., :-1])
    _inputs.check_none(repeated, indices[..., 1:], "TopK indices must be distinct within a row")
    check_topk_logprobs(name, topk, vocab_size, valid)
    # Ids outside [0, V) (possible only when the checks above are device-side) become -1 or V: never read.
    # Ignored rows may hold anything (padding): they get the ids 0..k-1, so that no backend reads theirs.
    indices = torch.where(keep, indices.clamp(-1, vocab_size), torch.arange(k, device=indices.device))
    return indices.to(torch.int32), topk.logprobs.gather(-1, order)


def renormalized_tail_terms(kind: str, coef: float, user_kind: str) -> tuple[float, float]:
    """(tail_loss, tail_grad): an entry where the teacher is 0 contributes ``tail_loss q`` to D and
    ``tail_grad q`` to a (docs/losses.md §1 at p = 0, linear in q): the kinds table's where_p_is_0, Python floats
    that torch.compile folds; ValueError where the table says that is infinite."""
    if infinite_where_p_is_0(kind, coef):
        raise ValueError(
            f"kind={user_kind!r} is infinite against a teacher that is 0 outside its top-k (TopK tail='renormalize'); "
            f"use tail='bin', or a kind that is finite there ({finite_where_p_is_0()})"
        )
    return BY_NAME[kind].where_p_is_0(coef)


# ----------------------------------------------------------------------------------------------------
# torch backend: the kernels' math (kernels/topk.py), chunked over rows; a chunk's membership mask is the
# only [chunk, V] temporary beyond the logits' fp32 copy.


def _combine_lse(max_a, logsum_a, max_b, logsum_b, temperature):
    """(max, logsum) of the union of two sets of entries from theirs; an empty set has logsum -inf."""
    mx = torch.maximum(max_a, max_b)
    mx = torch.where(logsum_a == -math.inf, max_b, torch.where(logsum_b == -math.inf, max_a, mx))
    return mx, torch.logaddexp(scaled(max_a - mx, temperature) + logsum_a, scaled(max_b - mx, temperature) + logsum_b)


def topk_forward_torch(student, indices, teacher_logprobs, valid, kind, tail, temperature, coef, tail_loss, tail_grad):
    """Chunked torch forward over (B, L, V) rows: (D, max_c, logsum_c, tail_scale) each (B, L) fp32 and
    member_d (B, L, K) fp32."""
    B, L, V = student.shape
    K = indices.shape[-1]
    outputs = tuple(student.new_zeros((B, L), dtype=torch.float32) for _ in range(4))
    member_d = student.new_zeros((B, L, K), dtype=torch.float32)
    for b, rows in row_chunks(B, L, V):
        z, idx = student[b, rows].float(), indices[b, rows].long()
        member = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, idx, True)
        max_c, logsum_c = row_stats(z.masked_fill(member, -math.inf), temperature)
        z_s = z.gather(-1, idx)
        max_s, logsum_s = row_stats(z_s, temperature)
        max_q, logsum_q = _combine_lse(max_c, logsum_c, max_s, logsum_s, temperature)
        lq = log_softmax_from_stats(z_s, max_q, logsum_q, temperature)
        log_tail_q = scaled(max_c - max_q, temperature) + logsum_c - logsum_q
        lp = teacher_logprobs[b, rows].float()
        log_mass_p = torch.logsumexp(lp, dim=-1)
        if tail == "bin":
            no_tail = torch.full_like(log_mass_p, -math.inf)
            log_tail_p = (-torch.expm1(log_mass_p)).clamp(min=0).log() if K < V else no_tail
            loss_tail, a_tail = divergence_terms(log_tail_q, log_tail_q.exp(), log_tail_p, log_tail_p.exp(), kind, coef)
        else:
            lp = lp - log_mass_p[:, None]
            loss_tail, a_tail = tail_loss * log_tail_q.exp(), tail_grad * log_tail_q.exp()
        entry_loss, a = divergence_terms(lq, lq.exp(), lp, lp.exp(), kind, coef)
        gbar = a.sum(-1) + a_tail
        # a_tail - Q gbar without the cancellation of two numbers near a_tail when Q is near 1
        mass_q_s = torch.exp(scaled(max_s - max_q, temperature) + logsum_s - logsum_q)
        tail_scale = a_tail * mass_q_s - log_tail_q.exp() * a.sum(-1)
        keep = valid[b, rows]
        values = (entry_loss.sum(-1) + loss_tail, max_c, logsum_c, tail_scale)
        for out, value in zip(outputs, values):
            out[b, rows] = torch.where(keep, value, 0.0)
        member_d[b, rows] = torch.where(keep[:, None], a - lq.exp() * gbar[:, None], 0.0)
    return (*outputs, member_d)


def topk_backward_torch(tail_coef, student, indices, valid, max_c, logsum_c, member_value, label_coef, labels,
                        temperature):  # fmt: skip
    """Chunked torch backward: (qc tail_coef outside the top-k, member_value on it, + label_coef at the label)
    / T per row, in the student's dtype."""
    B, L, V = student.shape
    dz = torch.empty((B, L, V), dtype=student.dtype, device=student.device)
    for b, rows in row_chunks(B, L, V):
        z = student[b, rows].float()
        qc = torch.exp(log_softmax_from_stats(z, max_c[b, rows], logsum_c[b, rows], temperature))
        chunk = torch.where(z == -math.inf, 0.0, tail_coef[b, rows][:, None] * qc)
        chunk.scatter_(-1, indices[b, rows].long(), member_value[b, rows])
        if label_coef is not None:
            chunk.scatter_add_(-1, labels[b, rows][:, None], label_coef[b, rows][:, None])
        dz[b, rows] = torch.where(valid[b, rows][:, None], chunk / temperature, 0.0)
    return dz


def _row_lse(student, indices, max_c, logsum_c, temperature):
    """(max_q, logsum_q, z of the members) of the full rows from the statistics outside the top-k and the k
    gathered logits (a [B, L, K] computation)."""
    z_s = student.gather(-1, indices.long()).float()
    return (*_combine_lse(max_c, logsum_c, *row_stats(z_s, temperature), temperature), z_s)


def _backward_coefficients(grad, grad_logp, student, indices, max_c, logsum_c, tail_scale, member_d, temperature):
    """(tail_coef, member_value) of the backward kernels: the rows' gradient times (a_tail - Q gbar) and d, less
    grad_logp times Q and q_i when the label's log-prob has a gradient (its -q part; the kernels add the
    onehot)."""
    tail_coef, member_value = grad * tail_scale, grad[..., None] * member_d
    if grad_logp is not None:
        max_q, logsum_q, z_s = _row_lse(student, indices, max_c, logsum_c, temperature)
        log_tail_q = scaled(max_c - max_q, temperature) + logsum_c - logsum_q
        q_s = torch.exp(scaled(z_s - max_q[..., None], temperature) - logsum_q[..., None])
        tail_coef = tail_coef - grad_logp * log_tail_q.exp()
        member_value = member_value - grad_logp[..., None] * q_s
    return tail_coef, member_value


# ----------------------------------------------------------------------------------------------------
# custom ops


def _cuda_forward(student, indices, teacher_logprobs, valid, kind, tail, temperature, coef, tail_loss, tail_grad):
    return torch.ops.klops_C.topk_divergence_forward(
        student, indices, teacher_logprobs, valid, DIVERGENCE_KINDS.index(kind), tail == "bin",
        temperature, coef, tail_loss, tail_grad,
    )  # fmt: skip


def _cuda_backward(tail_coef, student, indices, valid, max_c, logsum_c, member_value, label_coef, labels, temperature):
    # member_value = grad[..., None] * member_d has grad's layout (a transposed upstream gradient of
    # reduction="none" makes it non-contiguous); the kernel reads it contiguous, as the Triton launcher does.
    return torch.ops.klops_C.topk_divergence_backward(
        tail_coef, student, indices, valid, max_c, logsum_c, member_value.contiguous(), label_coef, labels, temperature
    )


_launchers = launcher_table(  # (forward, backward)
    triton=("klops.kernels.topk:topk_divergence_forward", "klops.kernels.topk:topk_divergence_backward"),
    cuda=(_cuda_forward, _cuda_backward),
    cpu=("klops._cpu:topk_divergence_forward", "klops._cpu:topk_divergence_backward"),
    torch=(topk_forward_torch, topk_backward_torch),
)


@torch.library.custom_op("klops::topk_divergence", mutates_args=())
def topk_divergence_op(
    student: torch.Tensor,
    indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    kind: str,
    tail: str,
    temperature: float,
    coef: float,
    tail_loss: float,
    tail_grad: float,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, V) student; (B, L, K) sorted int32 ids and their teacher log-probs; (B, L) bool valid; (B, L)
    int64 labels or None -> (D, max_c, logsum_c, tail_scale) each (B, L) fp32, member_d (B, L, K) fp32, and
    log q of the label (B, L) (from the row statistics and K + 1 gathered logits; 0 without labels)."""
    forward, _ = _launchers(backend)
    outputs = forward(student, indices, teacher_logprobs, valid, kind, tail, temperature, coef, tail_loss, tail_grad)
    if labels is None:
        return (*outputs, torch.zeros_like(outputs[0]))
    max_q, logsum_q, _ = _row_lse(student, indices, outputs[1], outputs[2], temperature)
    z_label = student.gather(-1, torch.where(valid, labels, 0)[..., None])[..., 0]
    return (*outputs, torch.where(valid, scaled(z_label - max_q, temperature) - logsum_q, 0.0))


@topk_divergence_op.register_fake
def _(student, indices, *rest):
    rows = tuple(student.new_empty(student.shape[:2], dtype=torch.float32) for _ in range(4))
    return (*rows, student.new_empty(indices.shape, dtype=torch.float32), rows[0].new_empty(rows[0].shape))


@torch.library.custom_op("klops::topk_divergence_backward", mutates_args=())
def topk_divergence_backward_op(
    grad: torch.Tensor,
    grad_logp: torch.Tensor | None,
    student: torch.Tensor,
    indices: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    max_c: torch.Tensor,
    logsum_c: torch.Tensor,
    tail_scale: torch.Tensor,
    member_d: torch.Tensor,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    """(B, L) fp32 grads of D and of the label's log-prob (or None) -> (B, L, V) gradient of the student logits
    (student dtype), in one sweep."""
    _, backward = _launchers(backend)
    tail_coef, member_value = _backward_coefficients(
        grad, grad_logp, student, indices, max_c, logsum_c, tail_scale, member_d, temperature
    )
    labels = None if grad_logp is None else torch.where(valid, labels, 0)
    return backward(tail_coef, student, indices, valid, max_c, logsum_c, member_value, grad_logp, labels, temperature)


@topk_divergence_backward_op.register_fake
def _(grad, grad_logp, student, *rest):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _setup_context(ctx, inputs, output):
    student, indices, _, valid, labels, _, _, temperature, *_, backend = inputs
    ctx.save_for_backward(student, indices, valid, labels, *output[1:5])
    ctx.params = (temperature, backend)


def _backward(ctx, grad_loss, *grad_stats_and_logp):
    student, indices, valid, labels, *stats = ctx.saved_tensors
    grad_logp = None if labels is None else grad_stats_and_logp[-1]
    dz = topk_divergence_backward_op(grad_loss, grad_logp, student, indices, valid, labels, *stats, *ctx.params)
    return (dz,) + (None,) * 11


torch.library.register_autograd("klops::topk_divergence", _backward, setup_context=_setup_context)


# fused-linear form: the student's logits a chunk of rows at a time (klops/_chunked.py), each chunk through
# the row ops above.


@torch.library.custom_op("klops::linear_topk_divergence", mutates_args=())
def linear_topk_divergence_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    kind: str,
    tail: str,
    temperature: float,
    coef: float,
    tail_loss: float,
    tail_grad: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The rows' (D, max_c, logsum_c, tail_scale), member_d and the label's log-prob of topk_divergence_op for
    the student logits softcap(hidden @ weight^T + bias), formed a chunk of rows at a time."""

    def chunk_rows(z, rows):
        return topk_divergence_op(
            z, indices[rows][None], teacher_logprobs[rows][None], valid[rows][None],
            None if labels is None else labels[rows][None], kind, tail, temperature, coef, tail_loss, tail_grad,
            backend,
        )  # fmt: skip

    rows = empty_rows(hidden, 4)
    member_d = torch.empty(indices.shape, dtype=torch.float32, device=hidden.device)
    return chunked_rows(hidden, weight, bias, softcap, (*rows, member_d, torch.empty_like(rows[0])), chunk_rows)


@linear_topk_divergence_op.register_fake
def _(hidden, weight, bias, indices, *rest):
    rows = empty_rows(hidden, 4)
    return (*rows, hidden.new_empty(indices.shape, dtype=torch.float32), rows[0].new_empty(rows[0].shape))


@torch.library.custom_op("klops::linear_topk_divergence_backward", mutates_args=())
def linear_topk_divergence_backward_op(
    grad: torch.Tensor,
    grad_logp: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    valid: torch.Tensor,
    labels: torch.Tensor | None,
    max_c: torch.Tensor,
    logsum_c: torch.Tensor,
    tail_scale: torch.Tensor,
    member_d: torch.Tensor,
    temperature: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) fp32 grads of D and of the label's log-prob (or None) -> (grad_hidden, grad_weight, grad_bias or
    [0]) of the student."""

    def chunk_grad(z, rows):
        chunk_grad_logp = None if grad_logp is None else grad_logp[rows][None]
        chunk_labels = None if grad_logp is None else labels[rows][None]
        stats = (x[rows][None] for x in (max_c, logsum_c, tail_scale, member_d))
        return topk_divergence_backward_op(
            grad[rows][None], chunk_grad_logp, z, indices[rows][None], valid[rows][None], chunk_labels, *stats,
            temperature, backend,
        )  # fmt: skip

    return chunked_backward(hidden, weight, bias, softcap, chunk_grad)


@linear_topk_divergence_backward_op.register_fake
def _(grad, grad_logp, hidden, weight, bias, *rest):
    return fake_grads(hidden, weight, bias)


def _linear_setup_context(ctx, inputs, output):
    hidden, weight, bias, indices, _, valid, labels, _, _, temperature, _, _, _, softcap, backend = inputs
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, indices, valid, labels, *output[1:5])
    ctx.params = (temperature, softcap, backend)


def _linear_backward(ctx, grad_rows, *grad_stats_and_logp):
    hidden, weight, bias, indices, valid, labels, *stats = ctx.saved_tensors
    grad_logp = None if labels is None else grad_stats_and_logp[-1]
    grad_hidden, grad_weight, grad_bias = linear_topk_divergence_backward_op(
        grad_rows, grad_logp, hidden, weight, bias, indices, valid, labels, *stats, *ctx.params
    )
    return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 12


torch.library.register_autograd("klops::linear_topk_divergence", _linear_backward, setup_context=_linear_setup_context)


@torch.library.custom_op("klops::linear_topk_divergence_total", mutates_args=())
def linear_topk_divergence_total_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    indices: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    valid: torch.Tensor,
    row_weight: torch.Tensor | None,
    kind: str,
    tail: str,
    temperature: float,
    coef: float,
    tail_loss: float,
    tail_grad: float,
    softcap: float | None,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, D, grad_hidden, grad_weight, grad_bias) for a scalar loss: the rows' D of linear_topk_divergence_op,
    total = sum_r w_r D_r (w = row_weight, or 1) and its fp32 gradient formed in the same sweep (klops/_chunked.py)."""

    def chunk_total(z, rows):
        chunk = (z, indices[rows][None], teacher_logprobs[rows][None], valid[rows][None], None)
        D, *stats, _ = topk_divergence_op(*chunk, kind, tail, temperature, coef, tail_loss, tail_grad, backend)
        g = chunk_row_weights(row_weight, rows, D)
        return (D,), topk_divergence_backward_op(g, None, *chunk[:2], chunk[3], None, *stats, temperature, backend)

    return chunked_total(hidden, weight, bias, softcap, row_weight, empty_rows(hidden, 1), chunk_total)


@linear_topk_divergence_total_op.register_fake
def _(hidden, weight, bias, *rest):
    return fake_total(hidden, weight, bias, 0)


register_total_autograd("klops::linear_topk_divergence_total", 6)


# ----------------------------------------------------------------------------------------------------
# the rows of fused_kl / fused_linear_kl with a TopK teacher (their checks of every other argument done)


def topk_rows(student_logits, topk, valid, kind, user_kind, coef, temperature, backend, labels=None):
    """(D, log q(label)) per row ``[...]`` fp32 between a TopK teacher and ``student_logits [..., V]``, 0 on
    invalid rows; the log-probs (with their gradient, in the same backward sweep) only with labels."""
    V = student_logits.shape[-1]
    tail_terms = renormalized_tail_terms(kind, coef, user_kind) if topk.tail == "renormalize" else (0.0, 0.0)
    indices, logprobs = sorted_topk(topk, "teacher_logits", "student_logits", student_logits, V, valid)
    backend = resolve("topk", backend, student_logits.device, vocab=V)
    student3, indices3, logprobs3 = _inputs.as_rows(student_logits, indices, logprobs)
    rows_shape = student3.shape[:2]
    rows, *_, logp = topk_divergence_op(
        student3, indices3, logprobs3, valid.reshape(rows_shape), _row_labels(labels, rows_shape),
        kind, topk.tail, temperature, coef, *tail_terms, backend,
    )  # fmt: skip
    return rows.reshape(valid.shape), logp.reshape(valid.shape)


def linear_topk_rows(hidden, weight, bias, topk, valid, kind, user_kind, coef, temperature, softcap, backend,
                     labels=None, row_weight=None, total=False):  # fmt: skip
    """topk_rows for the student logits softcap(hidden @ weight^T + bias), never formed; with total (a scalar loss,
    no labels), (sum_r w_r D_r with its gradient formed in the forward, None) instead, w = row_weight [...] or 1."""
    tail_terms = renormalized_tail_terms(kind, coef, user_kind) if topk.tail == "renormalize" else (0.0, 0.0)
    indices, logprobs = sorted_topk(topk, "teacher_hidden", "student_hidden", hidden, weight.shape[0], valid)
    backend = resolve("topk", backend, hidden.device, vocab=weight.shape[0])
    hidden3, indices3, logprobs3 = _inputs.as_rows(hidden, indices, logprobs)
    rows_shape = hidden3.shape[:2]
    options = (kind, topk.tail, temperature, coef, *tail_terms, softcap, backend)
    if total:
        row_weight = None if row_weight is None else row_weight.reshape(rows_shape)
        chunked = (hidden3, weight, bias, indices3, logprobs3, valid.reshape(rows_shape), row_weight)
        return linear_topk_divergence_total_op(*chunked, *options)[0], None
    rows, *_, logp = linear_topk_divergence_op(
        hidden3, weight, bias, indices3, logprobs3, valid.reshape(rows_shape), _row_labels(labels, rows_shape),
        *options,
    )  # fmt: skip
    return rows.reshape(valid.shape), logp.reshape(valid.shape)


def _row_labels(labels, rows_shape):
    """The int64 (B, L) labels of the ops (which do not read those of invalid rows), or None."""
    return None if labels is None else labels.long().reshape(rows_shape)
