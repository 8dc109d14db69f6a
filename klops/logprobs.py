"""``klops.logprobs``: log-softmax-gather and entropy in one pass (docs/losses.md §2).

Layers of this op: ``kernels/logprobs.py`` (Triton), ``csrc/logprobs.cu`` (CUDA), the chunked torch
backend below, the custom ops ``klops::logprobs`` / ``klops::logprobs_backward``, and ``logprobs``.
The forward keeps only the raw row max, ``logsum = log sum exp((z - max)/T)`` and the entropy per
row (fp32); the backward recomputes ``q`` from them.
"""

import torch

from . import _inputs
from ._chunked import FLOAT32_MIN, log_softmax_from_stats, log_softmax_rows, row_chunks
from .backend import launcher_table, resolve

__all__ = ["logprobs"]


# ----------------------------------------------------------------------------------------------------
# torch backend, chunked over rows.


def logprobs_forward_torch(logits, labels, temperature: float, with_entropy: bool, ignore_index: int):
    """Chunked torch forward over (B, L, V) rows: (logprob, entropy, max, logsum), each (B, L) fp32."""
    B, L, V = logits.shape
    outputs = tuple(logits.new_zeros((B, L), dtype=torch.float32) for _ in range(4))
    for b, rows in row_chunks(B, L, V):
        keep = labels[b, rows] != ignore_index
        values = _logprobs_rows(logits[b, rows], torch.where(keep, labels[b, rows], 0), temperature, with_entropy)
        for out, value in zip(outputs, values):
            if value is not None:
                out[b, rows] = torch.where(keep, value, 0.0)
    return outputs


def _logprobs_rows(logits, labels, temperature: float, with_entropy: bool):
    """(logprob, entropy or None, max, logsum) of a chunk of rows [C, V] (its temporaries freed on return)."""
    log_q, q, row_max, logsum = log_softmax_rows(logits, temperature)
    picked = log_q.gather(-1, labels[:, None]).squeeze(-1)
    # -sum q log q, with log q = -inf (q = 0) entries clamped to a finite number so that they add 0
    entropy = -q.mul_(log_q.clamp_(min=FLOAT32_MIN)).sum(-1) if with_entropy else None
    return picked, entropy, row_max, logsum


def logprobs_backward_torch(
    grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy,
    temperature: float, with_entropy: bool, ignore_index: int,
):  # fmt: skip
    """Chunked torch backward: ((onehot - q) g_logp - q (log q + H) g_H) / T in the logits' dtype."""
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
    return chunk.scatter_add_(-1, labels[:, None], g)


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
    ignore_index: int,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, V) logits, (B, L) labels -> (logprob, entropy, max, logsum), each (B, L) fp32."""
    forward, _ = _launchers(backend)
    return forward(logits, labels, temperature, with_entropy, ignore_index)


@logprobs_op.register_fake
def _(logits, labels, temperature, with_entropy, ignore_index, backend):
    return tuple(logits.new_empty(logits.shape[:2], dtype=torch.float32) for _ in range(4))


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
    """(B, L) fp32 grads of logprob and entropy -> (B, L, V) gradient of the logits (logits dtype)."""
    _, backward = _launchers(backend)
    return backward(
        grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, temperature, with_entropy, ignore_index
    )


@logprobs_backward_op.register_fake
def _(grad_logp, grad_entropy, logits, *labels_stats_and_params):
    return torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)


def _setup_context(ctx, inputs, output):
    logits, labels, temperature, with_entropy, ignore_index, backend = inputs
    _, entropy, max_z, logsum = output
    ctx.save_for_backward(logits, labels, max_z, logsum, entropy)
    ctx.params = (temperature, with_entropy, ignore_index, backend)


def _backward(ctx, grad_logp, grad_entropy, *_grad_stats):
    logits, labels, max_z, logsum, entropy = ctx.saved_tensors
    grad_logp = torch.zeros_like(logsum) if grad_logp is None else grad_logp
    grad_entropy = torch.zeros_like(logsum) if grad_entropy is None else grad_entropy
    dz = logprobs_backward_op(grad_logp, grad_entropy, logits, labels, max_z, logsum, entropy, *ctx.params)
    return dz, None, None, None, None, None


torch.library.register_autograd("klops::logprobs", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------
# public function


def logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    return_entropy: bool = False,
    ignore_index: int = -100,
    backend: str = "auto",
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
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
        backend: "auto" | "cuda" | "triton" | "torch".

    Returns ``logprob`` of shape ``labels.shape`` (fp32), or ``(logprob, entropy)``.
    """
    _inputs.check_logits("logits", logits)
    labels = _inputs.as_labels("labels", labels, "logits", logits)
    _inputs.check_labels_in_range("labels", labels, logits.shape[-1], ignore_index)
    temperature = _inputs.check_temperature(temperature)
    _inputs.check_bool("return_entropy", return_entropy)
    backend = resolve("logprobs", backend, logits.device)

    (logits3,) = _inputs.as_rows(logits)
    rows_shape = labels.shape
    logp, entropy, *_ = logprobs_op(
        logits3, labels.reshape(logits3.shape[:2]), temperature, return_entropy, ignore_index, backend
    )
    if return_entropy:
        return logp.reshape(rows_shape), entropy.reshape(rows_shape)
    return logp.reshape(rows_shape)
