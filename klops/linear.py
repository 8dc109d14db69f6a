"""Fused-linear losses: from the last hidden states and the LM head to the loss, never forming the
``[N, V]`` logits (docs/losses.md §1 and §2 on ``logits = softcap(hidden @ weight.T + bias)``).

Layers of these ops: the custom ops ``klops::linear_logprobs`` / ``klops::linear_cross_entropy`` (here) /
``klops::linear_divergence`` (klops/linear_divergence.py) and their backwards, over the fused Triton kernels
(``backend="triton"``) or the row ops of ``klops.logprobs`` and ``klops.divergence`` (the chunked path, on the
CUDA or torch kernels), and the public functions.

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
  each block's logits again in the backward: 4 products, 6 with a teacher's hidden states. Extra memory: one
  ``[C, V]`` buffer that every block's logits reuse (on the C++ CPU kernels ``dz`` is written over them; on the
  other backends ``dz`` is a second ``[C, V]``), one more for a teacher's logits formed from its hidden states (the
  torch row code adds a few temporaries of at most ``TORCH_CHUNK_ELEMENTS``), and the fp32 ``[V, D]`` weight
  gradient (a scalar loss folds the mean's scale into
  the rows' upstream gradient, so ``loss.backward()`` hands it over on the CPU; on a GPU, or under another
  upstream gradient, the backward scales it into a second copy). The head is read once per block and product. A
  ``klops.TopK`` teacher always takes this path.

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
    reduce_rows,
)
from .logprobs import LogprobOutputs, logprobs_grad_of_chunk, logprobs_op, per_token_outputs

__all__ = ["fused_linear_logprobs", "fused_linear_cross_entropy"]

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
        return logprobs_grad_of_chunk(
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
    smoothing = None
    if label_smoothing > 0 or g_lse is not None:  # q scale - eps g / V on valid rows, in fp32, read before dz
        valid = (labels != ignore_index).float()
        scale = (label_smoothing * g + (0.0 if g_lse is None else g_lse)) * valid
        smoothing = torch.exp(z.float() - (max_z + logsum)[..., None]).mul_(scale[..., None])
        smoothing.sub_((label_smoothing * g / z.shape[-1] * valid)[..., None])
    zeros = torch.zeros_like(g)
    dz = logprobs_grad_of_chunk(-(1.0 - label_smoothing) * g, zeros, z, labels, max_z, logsum, zeros, 1.0, False,
                                ignore_index, backend)  # fmt: skip
    return dz if smoothing is None else dz.add_(smoothing)


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
