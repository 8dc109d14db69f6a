"""Fused-linear losses: from the last hidden states and the LM head to the loss, never forming the
``[N, V]`` logits (docs/losses.md §1 and §2 on ``logits = softcap(hidden @ weight.T + bias)``).

Layers of these ops: the custom ops ``klops::linear_logprobs`` / ``klops::linear_cross_entropy`` /
``klops::linear_divergence`` and their backwards, over the fused Triton kernels (``backend="triton"``) or the
row ops of ``klops.logprobs`` and ``klops.divergence`` (the chunked path, on the CUDA or torch kernels), and
the public functions.

Two paths, chosen by the backend:

- ``backend="triton"``: fused kernels (kernels/linear.py for log-probs and cross-entropy,
  kernels/linear_divergence.py for the divergences). Each ``[BLOCK_M, BLOCK_V]`` logit tile is formed in
  registers by ``tl.dot`` (fp32 accumulation; fp32 operands as tf32 only when torch's matmuls are) and folded
  into per-row online statistics over vocabulary splits; the backward forms each tile again and adds
  ``dz @ W`` and ``dz^T h`` into fp32 ``grad_hidden`` / ``grad_weight`` with atomic adds. No ``[N, V]`` tile
  ever reaches global memory, and neither model's logits exist, not even a chunk of them. FLOPs in products
  of ``2 N D V``: log-probs / cross-entropy 1 forward + 3 backward; forward / reverse KL with the teacher
  from hidden states 2 + 4 = 6 (the issue's floor is 4: student and teacher logits, ``grad_hidden``,
  ``grad_weight``; recomputation, choice (b), costs the two logit products again), the other kinds 4 + 4 = 8
  (their second forward sweep needs both rows' log-sum-exp first). Choice (a), the gradient computed in the
  forward, needs those row statistics before any gradient entry, so it would not save the forward's extra
  sweep, would hold fp32 ``grad_hidden`` and ``grad_weight`` from the forward to the backward, and could not
  serve a loss with two upstream gradients (log-prob and entropy, or D and the label's log-prob).
- every other backend: the chunked path (klops/_chunked.py): rows in blocks of ``C = max(LINEAR_MIN_ROWS,
  LINEAR_CHUNK_ELEMENTS // V)`` (at least 256 rows on the CPU, 64 on a GPU: a block's matmuls read the whole
  ``[V, D]`` head, ``ceil(N / C)`` times per product, and a CPU BLAS runs 16-row products 5x slower per row than
  256-row ones). A block's logits ``[C, V]`` come from one matmul and are swept by the row ops of the backend the
  call resolves (CUDA, C++ CPU or torch). A scalar loss (``reduction`` "sum" / "mean", a gradient wanted) takes the
  gradient in that sweep: the row op's backward right after its forward gives ``dz``, then ``grad_hidden = dz @ W``
  and ``grad_weight += dz^T h``; fp32 ``grad_hidden [N, D]``, ``grad_weight [V, D]`` (and ``grad_bias``) are held
  from the forward to the backward, which scales them by the scalar upstream gradient (exact): 3 products of
  ``2 N V D``, 4 with a teacher's hidden states. Per-row outputs (``reduction="none"``, log-probs and entropy,
  ``return_lse``, the label log-probs of ``linear_divergence_and_label_logprobs``) keep row statistics and form
  each block's logits again in the backward: 4 products, 6 with a teacher's hidden states. Extra memory: the
  block's ``[C, V]`` logits and ``dz`` (and a teacher's logits; the torch row code adds a few temporaries of at
  most ``TORCH_CHUNK_ELEMENTS``) and the fp32 ``[V, D]`` weight gradient, twice in the backward of a scalar loss
  (the saved one and its scaled copy). The head is read once per block and product. A ``klops.TopK`` teacher
  always takes this path.

``backend="auto"`` takes the fused kernels on CUDA tensors wherever Triton is usable (``torch`` on the CPU;
the chunked CUDA path only without Triton), for every shape, because of memory, which is known without a
GPU: the fused path's extra memory is the fp32 ``grad_hidden`` ``[N, D]`` and an fp32 buffer of
``GRAD_WEIGHT_ROWS`` (8192) weight rows (384 MiB at N = 16384, D = 4096), where the chunked path holds an
fp32 ``[V, D]`` weight gradient (2 GiB at V = 128256; for a scalar loss held from the forward to the backward, with
fp32 ``grad_hidden``) and two ``[C, V]`` chunk temporaries (128 MiB). The fused path also saves the row kernels'
reads and writes of those chunks (about ``6 N V`` bytes in bf16); the chunked path runs its matmuls at cuBLAS rates
without atomics, and a scalar loss there needs 3 products where the fused path does 4. Neither has been timed
on a GPU yet: ``klops bench`` runs both (``klops[triton]``, ``klops[cuda]``) beside Liger-Kernel and Cut
Cross-Entropy, and its first GPU run decides whether ``auto`` should take the chunked path for some shapes.

``softcap`` is Gemma-2's final-logit soft-capping ``s tanh(z / s)``, applied before the temperature to the
logits formed from hidden states (student and teacher), with its derivative ``1 - tanh^2`` in the
gradient; logits given as ``teacher_logits`` are used as they are.
"""

import math

import torch

from . import _inputs
from ._chunked import (
    cast_grads,
    chunk_logits,
    chunk_row_weights,
    chunked_backward,
    chunked_rows,
    chunked_total,
    empty_rows,
    fake_grads,
    fake_total,
    gradient_in_forward,
    reduction_row_weights,
    register_total_autograd,
)
from ._inputs import check_linear, check_softcap
from .backend import resolve
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded
from .divergence import (
    check_divergence_options,
    divergence_backward_op,
    divergence_op,
    reduce_rows,
    valid_rows_and_weights,
)
from .logprobs import LogprobOutputs, logprobs_backward_op, logprobs_op, per_token_outputs
from .topk import TopK, linear_topk_rows

__all__ = ["fused_linear_logprobs", "fused_linear_kl", "fused_linear_cross_entropy"]

# ----------------------------------------------------------------------------------------------------
# log-probs and entropy


@torch.library.custom_op("klops::linear_logprobs", mutates_args=())
def linear_logprobs_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    with_stats: bool,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, D) hidden, [V, D] weight, [V] bias or None, (B, L) labels -> (logprob, entropy, max, logsum,
    log_sum_sq, mean_logit, is_top1), each (B, L) fp32 as logprobs_op's, of the rows' logits, a chunk of rows at
    a time (a tile at a time, never stored, on the Triton backend)."""
    options = (temperature, with_entropy, with_stats, ignore_index)
    if backend == "triton":
        from .kernels import linear as fused

        return fused.linear_logprobs_forward(hidden, weight, bias, labels, temperature, softcap, *options[1:])
    return chunked_rows(
        hidden, weight, bias, softcap, empty_rows(hidden, 7),
        lambda z, rows: logprobs_op(z, labels[rows][None], *options, backend),
    )  # fmt: skip


@linear_logprobs_op.register_fake
def _(hidden, *rest):
    return empty_rows(hidden, 7)


@torch.library.custom_op("klops::linear_logprobs_backward", mutates_args=())
def linear_logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    max_z: torch.Tensor,
    logsum: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) fp32 grads of logprob and entropy -> (grad_hidden (B, L, D), grad_weight [V, D], grad_bias [V] or
    [0] without bias), recomputing each chunk's logits (or each tile's, on the Triton backend)."""
    if backend == "triton":  # dz = g/T onehot - q (g + g_H H)/T - g_H/T q log q
        from .kernels import linear as fused

        valid = labels != ignore_index
        g = torch.where(valid, grad_logp / temperature, 0.0)
        g_entropy = torch.where(valid, grad_entropy / temperature, 0.0) if with_entropy else torch.zeros_like(g)
        coefs = torch.stack((g, -(g + g_entropy * entropy), -g_entropy, torch.zeros_like(g)))
        grads = fused.linear_rows_backward(hidden, weight, bias, labels, max_z, logsum, coefs, temperature, softcap)
        return cast_grads(grads, weight, bias)

    def chunk_grad(z, rows):
        per_row = (grad_logp, grad_entropy, labels, max_z, logsum, entropy)
        g_logp, g_entropy, chunk_labels, *stats = (x[rows][None] for x in per_row)
        return logprobs_backward_op(
            g_logp, g_entropy, z, chunk_labels, *stats, temperature, with_entropy, ignore_index, backend
        )

    return chunked_backward(hidden, weight, bias, softcap, chunk_grad)


@linear_logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, hidden, weight, bias, *rest):
    return fake_grads(hidden, weight, bias)


def _logprobs_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, temperature, softcap, with_entropy, _, ignore_index, backend = inputs
    _, entropy, max_z, logsum, *row_stats = output
    ctx.mark_non_differentiable(max_z, logsum, *row_stats)
    ctx.save_for_backward(hidden, weight, bias, labels, max_z, logsum, entropy)
    ctx.params = (temperature, softcap, with_entropy, ignore_index, backend)


def _logprobs_backward(ctx, grad_logp, grad_entropy, *_grad_stats):
    hidden, weight, bias, labels, max_z, logsum, entropy = ctx.saved_tensors
    grad_logp = torch.zeros_like(logsum) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(logsum) if grad_entropy is None else grad_entropy
    grad_hidden, grad_weight, grad_bias = linear_logprobs_backward_op(
        grad_logp, grad_entropy, hidden, weight, bias, labels, max_z, logsum, entropy, *ctx.params
    )
    return (grad_hidden, grad_weight, grad_bias if bias is not None else None) + (None,) * 7


torch.library.register_autograd("klops::linear_logprobs", _logprobs_backward, setup_context=_logprobs_setup_context)


# ----------------------------------------------------------------------------------------------------
# cross-entropy


def _cross_entropy_chunk(z, labels, label_smoothing, ignore_index, backend):
    """(loss, lse, max, logsum) [1, C] of a chunk's logits z [1, C, V] with labels [1, C]: ``loss = (1 - eps) (lse
    - z_y) + eps (lse - mean_v z_v)`` and ``lse = log sum_v exp z_v``, 0 on ignored rows."""
    logp, _, max_z, logsum, _, mean_z, _ = logprobs_op(z, labels, 1.0, False, label_smoothing > 0, ignore_index,
                                                      backend)  # fmt: skip
    valid = labels != ignore_index
    lse = torch.where(valid, max_z + logsum, 0.0)
    loss = -(1.0 - label_smoothing) * logp
    if label_smoothing > 0:
        loss = loss + torch.where(valid, label_smoothing * (lse - mean_z), 0.0)
    return loss, lse, max_z, logsum


def _cross_entropy_chunk_grad(z, labels, max_z, logsum, g, g_lse, label_smoothing, ignore_index, backend):
    """dz [1, C, V] of sum_r g_r loss_r + g_lse_r lse_r over a chunk (per-row [1, C] tensors; g_lse may be None):
    ``g (1 - eps) (q - onehot)`` from the row kernel, plus ``q (eps g + g_lse) - eps g / V`` (a chunk-sized torch
    pass, only with label smoothing or a gradient of lse, e.g. from z_loss)."""
    zeros = torch.zeros_like(g)
    dz = logprobs_backward_op(-(1.0 - label_smoothing) * g, zeros, z, labels, max_z, logsum, zeros, 1.0, False,
                              ignore_index, backend)  # fmt: skip
    if label_smoothing > 0 or g_lse is not None:  # + q scale - eps g / V on valid rows, in fp32
        valid = (labels != ignore_index).float()
        scale = (label_smoothing * g + (0.0 if g_lse is None else g_lse)) * valid
        q = torch.exp(z.float() - (max_z + logsum)[..., None])
        dz.add_(q.mul_(scale[..., None]).sub_((label_smoothing * g / z.shape[-1] * valid)[..., None]))
    return dz


@torch.library.custom_op("klops::linear_cross_entropy", mutates_args=())
def linear_cross_entropy_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    softcap: float | None,
    label_smoothing: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) rows -> (loss, lse, max, logsum), each (B, L) fp32: ``loss = (1 - eps) (lse - z_y) + eps (lse -
    mean_v z_v)`` and ``lse = log sum_v exp z_v`` per row, 0 for ignored rows."""
    if backend != "triton":
        return chunked_rows(
            hidden, weight, bias, softcap, empty_rows(hidden, 4),
            lambda z, rows: _cross_entropy_chunk(z, labels[rows][None], label_smoothing, ignore_index, backend),
        )  # fmt: skip
    from .kernels import linear as fused

    logp, _, max_z, logsum, _, mean_z, _ = fused.linear_logprobs_forward(
        hidden, weight, bias, labels, 1.0, softcap, False, label_smoothing > 0, ignore_index
    )
    valid = labels != ignore_index
    lse = torch.where(valid, max_z + logsum, 0.0)
    loss = -(1.0 - label_smoothing) * logp
    if label_smoothing > 0:
        loss = loss + torch.where(valid, label_smoothing * (lse - mean_z), 0.0)
    return loss, lse, max_z, logsum


@linear_cross_entropy_op.register_fake
def _(hidden, weight, bias, labels, softcap, label_smoothing, ignore_index, backend):
    return empty_rows(hidden, 4)


@torch.library.custom_op("klops::linear_cross_entropy_backward", mutates_args=())
def linear_cross_entropy_backward_op(
    grad_loss: torch.Tensor,
    grad_lse: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    max_z: torch.Tensor,
    logsum: torch.Tensor,
    softcap: float | None,
    label_smoothing: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L) fp32 grads of loss and lse (or None) -> (grad_hidden, grad_weight, grad_bias or [0]), each chunk's
    logits formed again (_cross_entropy_chunk_grad)."""
    if backend == "triton":  # dz = -(1 - eps) g onehot + (g + g_lse) q - eps g / V
        from .kernels import linear as fused

        valid = labels != ignore_index
        g = torch.where(valid, grad_loss, 0.0)
        g_lse = torch.zeros_like(g) if grad_lse is None else torch.where(valid, grad_lse, 0.0)
        V = weight.shape[0]
        coefs = torch.stack((-(1.0 - label_smoothing) * g, g + g_lse, torch.zeros_like(g), -label_smoothing * g / V))
        grads = fused.linear_rows_backward(hidden, weight, bias, labels, max_z, logsum, coefs, 1.0, softcap)
        return cast_grads(grads, weight, bias)

    def chunk_grad(z, rows):
        chunk_grad_lse = None if grad_lse is None else grad_lse[rows][None]
        per_row = (labels[rows][None], max_z[rows][None], logsum[rows][None], grad_loss[rows][None])
        return _cross_entropy_chunk_grad(z, *per_row, chunk_grad_lse, label_smoothing, ignore_index, backend)

    return chunked_backward(hidden, weight, bias, softcap, chunk_grad)


@linear_cross_entropy_backward_op.register_fake
def _(grad_loss, grad_lse, hidden, weight, bias, *rest):
    return fake_grads(hidden, weight, bias)


def _cross_entropy_setup_context(ctx, inputs, output):
    hidden, weight, bias, labels, softcap, label_smoothing, ignore_index, backend = inputs
    _, _, max_z, logsum = output
    ctx.has_bias = bias is not None
    ctx.save_for_backward(hidden, weight, bias, labels, max_z, logsum)
    ctx.params = (softcap, label_smoothing, ignore_index, backend)
    ctx.set_materialize_grads(False)  # an unused lse has no gradient (None), not zeros that cost a pass over q


def _cross_entropy_backward(ctx, grad_loss, grad_lse, *_grad_stats):
    hidden, weight, bias, labels, max_z, logsum = ctx.saved_tensors
    grad_loss = torch.zeros_like(logsum) if grad_loss is None else grad_loss
    grad_hidden, grad_weight, grad_bias = linear_cross_entropy_backward_op(
        grad_loss, grad_lse, hidden, weight, bias, labels, max_z, logsum, *ctx.params
    )
    return (grad_hidden, grad_weight, grad_bias if ctx.has_bias else None) + (None,) * 5


torch.library.register_autograd(
    "klops::linear_cross_entropy", _cross_entropy_backward, setup_context=_cross_entropy_setup_context
)


@torch.library.custom_op("klops::linear_cross_entropy_total", mutates_args=())
def linear_cross_entropy_total_op(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    row_weight: torch.Tensor | None,
    softcap: float | None,
    label_smoothing: float,
    z_loss: float,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(total, rows, grad_hidden, grad_weight, grad_bias) of the chunked path for a scalar loss: the (B, L) rows'
    ``loss + z_loss lse^2``, total = sum_r w_r rows_r (w = row_weight, or 1), and its fp32 gradient formed in the
    same sweep (klops/_chunked.py)."""

    def chunk_total(z, rows):
        chunk_labels = labels[rows][None]
        loss, lse, max_z, logsum = _cross_entropy_chunk(z, chunk_labels, label_smoothing, ignore_index, backend)
        g = chunk_row_weights(row_weight, rows, loss)
        g_lse = 2.0 * z_loss * lse * g if z_loss > 0 else None
        dz = _cross_entropy_chunk_grad(z, chunk_labels, max_z, logsum, g, g_lse, label_smoothing, ignore_index,
                                       backend)  # fmt: skip
        return (loss + z_loss * lse.square(),), dz

    return chunked_total(hidden, weight, bias, softcap, row_weight, empty_rows(hidden, 1), chunk_total)


@linear_cross_entropy_total_op.register_fake
def _(hidden, weight, bias, *rest):
    return fake_total(hidden, weight, bias, 0)


register_total_autograd("klops::linear_cross_entropy_total", 4)


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

    def chunk_rows(z, rows):
        y = _teacher_chunk(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap, rows)
        chunk_labels = None if labels is None else labels[rows][None]
        return divergence_op(z, y, valid[rows][None], chunk_labels, kind, target_is, temperature, coef, backend)

    return chunked_rows(hidden, weight, bias, softcap, empty_rows(hidden, 7), chunk_rows)


def _teacher_chunk(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap, rows):
    """The teacher's logits [1, C, V] of a chunk of rows (under its own soft cap when formed from hidden states)."""
    if teacher_logits is not None:
        return teacher_logits[rows][None]
    return chunk_logits(teacher_hidden[rows], teacher_weight, teacher_bias, teacher_softcap)[0][None]


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

    def chunk_grad(z, rows):
        y = _teacher_chunk(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap, rows)
        stats = (x[rows][None] for x in (max_q, logsum_q, max_t, logsum_t, gbar))
        chunk_grad_logp = None if grad_logp is None else grad_logp[rows][None]
        chunk_labels = None if grad_logp is None else labels[rows][None]
        return divergence_backward_op(
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

    def chunk_total(z, rows):
        y = _teacher_chunk(teacher_hidden, teacher_weight, teacher_bias, teacher_logits, teacher_softcap, rows)
        options = (kind, target_is, temperature, coef, backend)
        D, *stats, _ = divergence_op(z, y, valid[rows][None], None, *options)
        g = chunk_row_weights(row_weight, rows, D)
        return (D, *stats[2:4]), divergence_backward_op(g, None, z, y, valid[rows][None], None, *stats, *options)

    return chunked_total(hidden, weight, bias, softcap, row_weight, empty_rows(hidden, 3), chunk_total)


@linear_divergence_total_op.register_fake
def _(hidden, weight, bias, *rest):
    return fake_total(hidden, weight, bias, 2)


register_total_autograd("klops::linear_divergence_total", 8)


# ----------------------------------------------------------------------------------------------------
# public functions


def fused_linear_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    return_entropy: bool = False,
    return_row_stats: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LogprobOutputs:
    """``klops.logprobs`` of ``logits = softcap(logit_scale * (hidden @ weight.T + bias))`` without forming them.

    ``logprob = log softmax(logits / T)[label]`` and ``entropy = -sum q log q`` per row, with gradients to
    ``hidden [..., D]``, ``weight [V, D]`` and ``bias [V]`` (``softcap``: ``c tanh(z / c)`` before ``T``;
    ``logit_scale``: a multiplier before the soft cap, ``klops._inputs.scale_head_inputs``). Labels: ``[...]``
    of any integer dtype, ``ignore_index`` rows give 0 and no gradient. Returns ``logprob`` (fp32,
    ``labels.shape``), ``(logprob, entropy)``, or with ``return_row_stats`` a ``klops.LogprobOutputs`` (also
    ``log sum q^2``, the mean of ``logits / T`` and whether the label is the first argmax, from the same sweep).

    ``vocab_group`` / ``vocab_start``: a head sharded over the vocabulary, as in ``fused_linear_cross_entropy``.
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(weight):
        return VOCAB_PARALLEL_FORMS["fused_linear_logprobs"](
            hidden, weight, labels, bias=bias, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
            return_entropy=return_entropy, return_row_stats=return_row_stats, ignore_index=ignore_index,
            backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    check_linear("hidden", hidden, "weight", weight, "bias", bias)
    labels = _inputs.as_labels("labels", labels, "hidden", hidden)
    _inputs.check_labels_in_range("labels", labels, weight.shape[0], ignore_index)
    temperature = _inputs.check_temperature(temperature)
    softcap = check_softcap(softcap)
    _inputs.check_bool("return_entropy", return_entropy)
    _inputs.check_bool("return_row_stats", return_row_stats)
    hidden, bias = _inputs.scale_head_inputs("logit_scale", logit_scale, hidden, bias)
    backend = resolve("linear", backend, hidden.device)
    (hidden3,) = _inputs.as_rows(hidden)  # (B, L, D) without a copy, e.g. of hidden[:, :-1]
    rows = (hidden3, weight, bias, labels.reshape(hidden3.shape[:2]))
    options = (temperature, softcap, return_entropy, return_row_stats, ignore_index, backend)
    return per_token_outputs(linear_logprobs_op(*rows, *options), labels.shape, return_entropy, return_row_stats)


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


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    num_items: int | torch.Tensor | None = None,
    return_lse: bool = False,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy of ``logits = softcap(logit_scale * (hidden @ weight.T + bias))`` without forming them; the
    one-line replacement of Liger-Kernel's ``LigerFusedLinearCrossEntropyLoss`` and Cut Cross-Entropy's
    ``linear_cross_entropy``.

    Per row, with ``lse = log sum_v exp z_v``: ``(1 - eps) (lse - z_y) + eps (lse - mean_v z_v) + z_loss lse^2``
    (``eps = label_smoothing``, as ``torch.nn.functional.cross_entropy``; ``z_loss`` is PaLM's auxiliary loss,
    Liger's ``lse_square_scale``). Rows whose label is ``ignore_index`` give 0 and no gradient. ``reduction``
    "mean" divides by the valid rows (``num_items`` by a global count), "sum", or "none" (``[...]``).
    Gradients to ``hidden [..., D]``, ``weight [V, D]`` and ``bias [V]``. ``return_lse`` also returns the
    per-row ``lse`` ``[...]`` (0 for ignored rows), with its gradient.

    ``vocab_group``: the process group over which the head is sharded: ``weight [V_r, D]`` (and ``bias [V_r]``) is
    this rank's contiguous slice of the vocabulary, in rank order (or from ``vocab_start``), ``hidden`` is replicated,
    labels are global ids; every rank gets the same loss, the gradient of its shard and ``grad_hidden`` summed over
    the group (klops/vocab_parallel.py).
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(weight):
        return VOCAB_PARALLEL_FORMS["fused_linear_cross_entropy"](
            hidden, weight, labels, bias=bias, ignore_index=ignore_index, reduction=reduction,
            label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, logit_scale=logit_scale,
            num_items=num_items, return_lse=return_lse, backend=backend, vocab_group=vocab_group,
            vocab_start=vocab_start,
        )  # fmt: skip
    check_linear("hidden", hidden, "weight", weight, "bias", bias)
    labels = _inputs.as_labels("labels", labels, "hidden", hidden)
    _inputs.check_labels_in_range("labels", labels, weight.shape[0], ignore_index)
    _inputs.check_choice("reduction", reduction, ("none", "sum", "mean"))
    label_smoothing = _inputs.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = _inputs.check_real("z_loss", z_loss, low=0.0, high=math.inf)
    softcap = check_softcap(softcap)
    _inputs.check_num_items(num_items, reduction)
    _inputs.check_bool("return_lse", return_lse)
    hidden, bias = _inputs.scale_head_inputs("logit_scale", logit_scale, hidden, bias)
    backend = resolve("linear", backend, hidden.device)
    (hidden3,) = _inputs.as_rows(hidden)
    inputs = (hidden3, weight, bias, labels.reshape(hidden3.shape[:2]))
    if backend != "triton" and not return_lse and gradient_in_forward(reduction, hidden, weight, bias):
        valid = (labels != ignore_index).reshape(hidden3.shape[:2])
        row_weight = reduction_row_weights(valid, None, reduction, num_items)
        options = (softcap, label_smoothing, z_loss, ignore_index, backend)
        return linear_cross_entropy_total_op(*inputs, row_weight, *options)[0]  # the reduced loss itself
    rows, lse, *_ = linear_cross_entropy_op(*inputs, softcap, label_smoothing, ignore_index, backend)
    rows, lse = rows.reshape(labels.shape), lse.reshape(labels.shape)
    if z_loss > 0:
        rows = rows + z_loss * lse.square()
    loss = reduce_rows(rows, labels != ignore_index, reduction, num_items)
    return (loss, lse) if return_lse else loss


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
