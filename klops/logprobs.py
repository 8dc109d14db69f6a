"""``klops.logprobs``: log-softmax-gather and entropy in one pass (docs/losses.md §2).

Layers of this op: ``kernels/logprobs.py`` (Triton), ``csrc/logprobs.cu`` (CUDA), ``csrc/cpu/logprobs.cpp``
(C++ CPU), the chunked torch backend below, the custom ops ``klops::logprobs`` / ``klops::logprobs_backward``,
and ``logprobs``. The forward keeps only the raw row max, ``logsum = log sum exp((z - max)/T)`` and the entropy
per row (fp32); the backward recomputes ``q`` from them. With ``with_stats`` the same sweep also gives the row
statistics of TRL's fused LM head (``LogprobOutputs``).
"""

from typing import NamedTuple

import torch

from . import _inputs
from ._chunked import FLOAT32_MIN, log_softmax_from_stats, log_softmax_rows, row_chunks
from .backend import launcher_table, resolve
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded

__all__ = ["LogprobOutputs", "logprobs"]


class LogprobOutputs(NamedTuple):
    """Per-token outputs of ``klops.logprobs`` / ``klops.fused_linear_logprobs`` with ``return_row_stats=True``,
    each ``labels.shape``, 0 (False) on ignored rows. With ``q = softmax(z / T)``:

    - ``logprob``: ``log q[label]`` (fp32, with gradient);
    - ``entropy``: ``-sum_v q_v log q_v`` (fp32, with gradient), None unless ``return_entropy``;
    - ``log_sum_sq_probs``: ``log sum_v q_v^2`` (fp32; WPO's weight, TRL's ``log_sum_sq_probs``);
    - ``mean_logits``: ``mean_v z_v / T`` (fp32; TRL's ``mean_logits``);
    - ``is_top1``: the label is the first argmax of ``z`` (bool; TRL's ``is_top1``, its token accuracy).

    The last three have no gradient.
    """

    logprob: torch.Tensor
    entropy: torch.Tensor | None
    log_sum_sq_probs: torch.Tensor
    mean_logits: torch.Tensor
    is_top1: torch.Tensor


# ----------------------------------------------------------------------------------------------------
# torch backend, chunked over rows.


def logprobs_forward_torch(
    logits, labels, temperature: float, with_entropy: bool, with_stats: bool, ignore_index: int
):  # fmt: skip
    """Chunked torch forward over (B, L, V) rows: (logprob, entropy, max, logsum, log_sum_sq, mean_logit,
    is_top1), each (B, L) fp32 (the last three with_stats, else 0)."""
    B, L, V = logits.shape
    outputs = tuple(logits.new_zeros((B, L), dtype=torch.float32) for _ in range(7))
    for b, rows in row_chunks(B, L, V):
        keep = labels[b, rows] != ignore_index
        chunk, chunk_labels = logits[b, rows], torch.where(keep, labels[b, rows], 0)
        values = _logprobs_rows(chunk, chunk_labels, temperature, with_entropy, with_stats)
        for out, value in zip(outputs, values):
            if value is not None:
                out[b, rows] = torch.where(keep, value, 0.0)
    return outputs


def _logprobs_rows(logits, labels, temperature: float, with_entropy: bool, with_stats: bool):
    """(logprob, entropy, max, logsum, log_sum_sq, mean_logit, is_top1) of a chunk of rows [C, V], None for what
    is not asked (its temporaries freed on return)."""
    log_q, q, row_max, logsum = log_softmax_rows(logits, temperature)
    picked = log_q.gather(-1, labels[:, None]).squeeze(-1)
    stats = (None, None, None)
    if with_stats:  # log sum q^2, mean z / T, and the first argmax (torch.argmax takes the first of ties)
        log_sum_sq = torch.logsumexp(log_q * 2.0, -1)
        mean_logit = logits.float().mean(-1) / temperature
        stats = (log_sum_sq, mean_logit, (logits.argmax(-1) == labels).float())
    # -sum q log q, with log q = -inf (q = 0) entries clamped to a finite number so that they add 0
    entropy = -q.mul_(log_q.clamp_(min=FLOAT32_MIN)).sum(-1) if with_entropy else None
    return picked, entropy, row_max, logsum, *stats


def logprobs_backward_torch(
    grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy,
    temperature: float, with_entropy: bool, ignore_index: int,
):  # fmt: skip
    """Chunked torch backward: ((onehot - q) g_logp - q (log q + H) g_H) / T in the logits' dtype (a label outside
    [0, V) other than ignore_index: no one-hot, as in the kernels)."""
    B, L, V = logits.shape
    dz = torch.empty((B, L, V), dtype=logits.dtype, device=logits.device)
    for b, rows in row_chunks(B, L, V):
        keep = labels[b, rows] != ignore_index
        dz[b, rows] = _logprobs_grad_rows(
            logits[b, rows], torch.where(keep, labels[b, rows], 0), max_z[b, rows], logsum[b, rows], entropy[b, rows],
            grad_logp[b, rows], grad_entropy[b, rows] if with_entropy else None, temperature,
        ).masked_fill_(~keep[:, None], 0.0)  # fmt: skip
    return dz


def _logprobs_grad_rows(logits, labels, row_max, logsum, entropy, grad_logp, grad_entropy, temperature: float):
    """The fp32 gradient [C, V] of a chunk of rows, built in place in its log q (and q, with a gradient of the
    entropy); the temporaries are freed on return."""
    g = (grad_logp / temperature)[:, None]
    log_q = log_softmax_from_stats(logits, row_max, logsum, temperature)
    if grad_entropy is None:
        chunk = log_q.exp_().mul_(-g)
    else:  # q (log q + H), 0 where q = 0 (log q clamped to a finite number), times -g_H / T
        q = log_q.exp()
        chunk = log_q.clamp_(min=FLOAT32_MIN).add_(entropy[:, None]).mul_(q)
        chunk.mul_((-grad_entropy / temperature)[:, None]).addcmul_(q, g, value=-1.0)
    held = (labels >= 0) & (labels < logits.shape[-1])  # a label outside [0, V): no one-hot
    return chunk.scatter_add_(-1, torch.where(held, labels, 0)[:, None], torch.where(held[:, None], g, 0.0))


# ----------------------------------------------------------------------------------------------------
# custom ops


_launchers = launcher_table(  # (forward, backward)
    triton=("klops.kernels.logprobs:logprobs_forward", "klops.kernels.logprobs:logprobs_backward"),
    cuda=("torch:ops.klops_C.logprobs_forward", "torch:ops.klops_C.logprobs_backward"),
    cpu=("torch:ops.klops_cpu.logprobs_forward", "torch:ops.klops_cpu.logprobs_backward"),
    torch=(logprobs_forward_torch, logprobs_backward_torch),
)


@torch.library.custom_op("klops::logprobs", mutates_args=())
def logprobs_op(
    logits: torch.Tensor,
    labels: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    with_stats: bool,
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, V) logits, (B, L) labels -> (logprob, entropy, max, logsum, log_sum_sq, mean_logit, is_top1), each
    (B, L) fp32; the last three (LogprobOutputs, is_top1 as 0 / 1) with_stats, else 0."""
    forward, _ = _launchers(backend)
    return forward(logits, labels, temperature, with_entropy, with_stats, ignore_index)


@logprobs_op.register_fake
def _(logits, labels, temperature, with_entropy, with_stats, ignore_index, backend):
    return tuple(logits.new_empty(logits.shape[:2], dtype=torch.float32) for _ in range(7))


@torch.library.custom_op("klops::logprobs_backward", mutates_args=())
def logprobs_backward_op(
    grad_logp: torch.Tensor,
    grad_entropy: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor,
    max_z: torch.Tensor,
    logsum: torch.Tensor,
    entropy: torch.Tensor,
    temperature: float,
    with_entropy: bool,
    ignore_index: int,
    backend: str,
) -> torch.Tensor:
    """(B, L) fp32 grads of logprob and entropy -> (B, L, V) gradient of the logits (logits dtype). A row whose
    label is outside [0, V) (and not ignore_index) gets no one-hot: a vocabulary shard whose row's label another
    shard holds (klops/vocab_parallel.py)."""
    _, backward = _launchers(backend)
    return backward(
        grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, temperature, with_entropy, ignore_index
    )


@logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, *labels_stats_and_params):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def logprobs_grad_of_chunk(grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, temperature: float,
                           with_entropy: bool, ignore_index: int, backend: str) -> torch.Tensor:  # fmt: skip
    """logprobs_backward_op's gradient for the chunked fused-linear path, where the chunk's (1, C, V) logits are not
    read again: on the C++ CPU kernels it is written over them (contiguous logits), which spares the chunk's second
    [C, V] buffer; the other backends return a new tensor."""
    if backend == "cpu" and logits.is_contiguous():
        torch.ops.klops_cpu.logprobs_backward_over_logits(grad_logp, grad_entropy, logits, labels, max_z, logsum,
                                                          entropy, temperature, with_entropy, ignore_index)  # fmt: skip
        return logits
    return logprobs_backward_op(grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, temperature,
                                with_entropy, ignore_index, backend)  # fmt: skip


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, with_entropy, _, ignore_index, backend = inputs
    _, entropy, max_z, logsum, *row_stats = output
    ctx.mark_non_differentiable(max_z, logsum, *row_stats)
    ctx.save_for_backward(logits, labels, max_z, logsum, entropy)
    ctx.params = (temperature, with_entropy, ignore_index, backend)


def _backward(ctx, grad_logp, grad_entropy, *_grad_stats):
    logits, labels, max_z, logsum, entropy = ctx.saved_tensors
    grad_logp = torch.zeros_like(logsum) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(logsum) if grad_entropy is None else grad_entropy
    dz = logprobs_backward_op(grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, *ctx.params)
    return dz, None, None, None, None, None, None


torch.library.register_autograd("klops::logprobs", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public function


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    return_row_stats: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | LogprobOutputs:
    """Log-probability of each label, and optionally the entropy, in one pass over the vocabulary.

    With ``q = softmax(logits / T)``: ``logprob = log q[label]`` (TRL's ``selective_log_softmax``) and
    ``entropy = -sum q log q``, both from ``log q = (z - max z)/T - log sum exp((z - max z)/T)``.
    Gradients: ``(onehot - q) / T`` and ``-q (log q + entropy) / T``.

    Args:
        logits: [..., V] fp32/bf16/fp16, stride 1 along V.
        labels: [...] any integer dtype, in [0, V) or ``ignore_index`` (those rows give 0 and a zero
            gradient). On GPU tensors the range is checked by a device-side assertion, without a host
            sync; ``klops.set_host_checks(True)`` makes it a ValueError at the cost of one sync.
        temperature: the sampling temperature T > 0 the logits are divided by.
        return_entropy: also return the per-token entropy.
        return_row_stats: also compute, in the same sweep, ``log sum q^2``, the mean of ``logits / T`` and
            whether the label is the first argmax, and return a ``LogprobOutputs``.
        backend: "auto" | "cuda" | "triton" | "cpu" | "torch".
        vocab_group: the process group over which the vocabulary is sharded: ``logits [..., V_r]`` is this rank's
            contiguous slice, in rank order (or from ``vocab_start``); labels are global ids; every rank gets the same
            outputs and the gradient of its shard (klops/vocab_parallel.py). A logits DTensor placed ``Shard(-1)`` on
            a 1-D mesh needs none. Outputs are plain tensors.

    Returns ``logprob`` of shape ``labels.shape`` (fp32), ``(logprob, entropy)``, or ``LogprobOutputs``.
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(logits):
        return VOCAB_PARALLEL_FORMS["logprobs"](
            logits, labels, temperature=temperature, return_entropy=return_entropy, return_row_stats=return_row_stats,
            ignore_index=ignore_index, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    _inputs.check_logits("logits", logits)
    labels = _inputs.as_labels("labels", labels, "logits", logits)
    _inputs.check_labels_in_range("labels", labels, logits.shape[-1], ignore_index)
    temperature = _inputs.check_temperature(temperature)
    _inputs.check_bool("return_entropy", return_entropy)
    _inputs.check_bool("return_row_stats", return_row_stats)
    backend = resolve("logprobs", backend, logits.device)

    (logits3,) = _inputs.as_rows(logits)
    outputs = logprobs_op(
        logits3, labels.reshape(logits3.shape[:2]), temperature, return_entropy, return_row_stats, ignore_index,
        backend,
    )  # fmt: skip
    return per_token_outputs(outputs, labels.shape, return_entropy, return_row_stats)


def per_token_outputs(outputs, shape, return_entropy: bool, return_row_stats: bool):
    """What logprobs / fused_linear_logprobs return, shaped as the labels, from their op's 7 (B, L) rows."""
    logp, entropy, _, _, log_sum_sq, mean_logit, is_top1 = (x.reshape(shape) for x in outputs)
    if return_row_stats:
        return LogprobOutputs(logp, entropy if return_entropy else None, log_sum_sq, mean_logit, is_top1.bool())
    return (logp, entropy) if return_entropy else logp
