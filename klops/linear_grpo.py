"""``fused_linear_grpo_loss``: the GRPO family (klops/grpo.py) from the policy's last hidden states and LM head. Where
it can, it takes the gradient in the forward (the chunked path's scalar-loss form, klops/_chunked.py): the loss of a
sequence reads only that sequence's log-probs and constants. Elsewhere it runs ``grpo_loss`` on the log-probs and
entropy of ``fused_linear_logprobs``, whose backward forms each chunk's logits again.

The loss is ``sum_i loss_i(logp_i)`` over sequences ``i`` (``logp_i [L]``, its tokens' log-probs), each term divided
by a global count known before the sweep (the valid tokens ``sum m`` or ``B``, or ``num_items``), plus the entropy
bonus ``-c sum_t m_t H_t / max(1, sum m)``. Chunks of whole sequences (``chunk_sweep(..., multiple=L)``) then hold
everything a chunk's gradient needs: per chunk of ``k`` sequences (``C = k L`` rows, logits ``z [C, V]``),

- ``logp, H`` of its rows (``logprobs_op``, the row kernels of the resolved backend);
- ``g_logp = d loss / d logp`` from ``grpo_loss`` on the chunk's ``[k, L]`` slices with ``num_items`` the global
  count (``torch.autograd.grad``), and ``g_H = -c m / max(1, sum m)``;
- ``dz = g_logp (onehot - q) / T - g_H q (log q + H) / T`` (``logprobs_grad_of_chunk``), which chunk_sweep turns
  into ``grad_hidden = dz' W``, ``grad_weight += dz'^T h`` and ``grad_bias += sum dz'`` (fp32; ``dz' = dz (1 - t^2)``
  under a soft cap) while the chunk's logits are in cache.

The loss and its metrics come from one ``grpo_loss`` on the detached ``[B, L]`` log-probs and entropies, and the
backward only scales the forward's gradients by the upstream gradient: 3 products of ``2 N V D`` where the
recomputing path (``fused_linear_logprobs``, whose backward forms each chunk's logits again) makes 4.

Not for losses that couple sequences (``takes_gradient_in_forward``): the entropy mask's batch quantile
(``top_entropy_quantile < 1``), clip_cov / kl_cov (batch covariance, top-k over the batch), the full-vocabulary KL
(``kl_estimator="full"``, a second sweep with its own gradient), packed sequences; nor for the fused Triton kernels,
vocabulary-parallel heads, torch.compile, or sequences longer than a chunk (``linear_chunk_rows``).
"""

import torch

from . import _inputs
from ._chunked import chunk_sweep, empty_rows, linear_chunk_rows, new_grads, scaled_total_grads
from ._grpo_types import LOSS_TYPES
from .backend import resolve
from .distributed import is_sharded
from .grpo import IGNORE, grpo_loss, loss_from_sweeps
from .linear import fused_linear_logprobs
from .linear_divergence import fused_linear_kl
from .logprobs import logprobs_grad_of_chunk, logprobs_op

__all__ = ["fused_linear_grpo_loss"]

# loss types whose per-token loss reads statistics of the whole batch (a covariance, a top-k over its tokens)
BATCH_COUPLED_TYPES = ("clip_cov", "kl_cov")
# grpo_loss arguments the path does not take: packed sequences, and what the sweep itself gives
UNTAKEN_ARGUMENTS = ("position_ids", "cu_seqlens", "per_token_kl", "entropy")


def fused_linear_grpo_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ref_hidden: torch.Tensor | None = None,
    ref_weight: torch.Tensor | None = None,
    ref_bias: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    kl_estimator: str = "k3",
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_loss`` from the policy's last hidden states ``[B, L, D]`` and LM head ``weight [V, D]`` (and
    ``bias``): the log-probs and entropy come from one ``klops.fused_linear_logprobs`` pass, so the
    ``[B, L, V]`` logits are never formed, with gradients to ``hidden``, ``weight`` and ``bias``. The reference
    is ``ref_logp`` or the reference model's ``ref_hidden`` / ``ref_weight`` / ``ref_bias`` (no gradient);
    ``kl_estimator="full"`` takes the exact per-token reverse KL over the vocabulary from
    ``klops.fused_linear_kl``. ``softcap`` and ``logit_scale`` apply to both models' logits (``softcap(c (h W^T +
    b))``, as ``fused_linear_logprobs``). Other arguments: as ``grpo_loss``.

    On the chunked path (not ``backend="triton"``), in eager mode, a loss whose sequences are independent (no
    ``top_entropy_quantile < 1``, clip_cov / kl_cov or ``kl_estimator="full"``) and fit in a chunk of rows takes its
    gradient in the forward sweep, in chunks of whole sequences (linear_grpo_loss): 3 products of ``2 N V D``
    instead of 4.

    ``vocab_group`` / ``vocab_start``: both heads sharded over the vocabulary (``weight [V_r, D]``, ``bias [V_r]``,
    the same shards; hidden states replicated), as in ``fused_linear_logprobs``: each sweep is then that op's
    vocabulary-parallel form (a few fp32 per token all-gathered; in backward, ``grad_hidden`` all-reduced once per
    sweep with a gradient), every rank gets the same loss and metrics and its shard's gradient.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, L, D], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (the rows of hidden)")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("the reference model needs both ref_hidden and ref_weight")
    ids = _inputs.as_labels("completion_ids", completion_ids, "hidden", hidden)
    sample = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, backend=backend,
                  vocab_group=vocab_group, vocab_start=vocab_start)  # fmt: skip

    def sweep(labels):
        return fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **sample)

    def ref_sweep(labels):
        return fused_linear_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, **sample)

    def full_kl(labels):
        biases = dict(student_bias=bias, teacher_bias=ref_bias)
        return fused_linear_kl(hidden, weight, ref_hidden, ref_weight, kind="reverse", labels=labels,
                               ignore_index=IGNORE, reduction="none", **biases, **sample)  # fmt: skip

    reference = ref_sweep if ref_hidden is not None else None
    if takes_gradient_in_forward(hidden, weight, bias, advantages, mask, ref_logp, old_logp, reference, kl_estimator,
                                 sample, kwargs):  # fmt: skip
        return linear_grpo_loss(hidden, weight, bias, ids, advantages, mask, reference, ref_logp, old_logp,
                                kl_estimator, sample, kwargs)  # fmt: skip
    return loss_from_sweeps(sweep, reference, full_kl, ids, advantages, mask, ref_logp, old_logp, kl_estimator, kwargs)


def takes_gradient_in_forward(hidden, weight, bias, advantages, mask, ref_logp, old_logp, reference, kl_estimator,
                              sample, kwargs) -> bool:  # fmt: skip
    """Whether fused_linear_grpo_loss takes linear_grpo_loss (else its recomputing path, which also raises on bad
    inputs): a gradient to hidden / weight / bias wanted and to no other tensor; eager; the chunked path of a whole
    head (``sample``: the sweeps' keywords; not "triton", no vocab_group / vocab_start / DTensor); a loss whose
    sequences are independent (no entropy quantile, clip_cov / kl_cov, full KL, packing); 0 < L <= a chunk's rows;
    ``reference`` (the reference model's sweep) or ref_logp, not both."""
    tensors = (hidden, weight, bias, advantages, mask, ref_logp, old_logp)
    if not all(x is None or isinstance(x, torch.Tensor) and not is_sharded(x) for x in tensors) or advantages is None:
        return False
    wanted = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias))
    constants = (advantages, mask, ref_logp, old_logp, *kwargs.values())
    if not wanted or any(isinstance(x, torch.Tensor) and x.requires_grad for x in constants):
        return False
    loss_type = kwargs.get("loss_type", "dapo")
    independent = (
        loss_type in LOSS_TYPES
        and loss_type not in BATCH_COUPLED_TYPES
        and kl_estimator != "full"
        and kwargs.get("top_entropy_quantile", 1.0) == 1.0
        and all(kwargs.get(name) is None for name in UNTAKEN_ARGUMENTS)
    )
    chunked = sample["vocab_group"] is None and sample["vocab_start"] is None and not torch.compiler.is_compiling()
    if not independent or not chunked or (reference is not None and ref_logp is not None) or weight.dim() != 2:
        return False
    short = 0 < hidden.shape[1] <= linear_chunk_rows(weight.shape[0], hidden.device)
    return short and resolve("linear", sample["backend"], hidden.device) != "triton"


def linear_grpo_loss(hidden, weight, bias, ids, advantages, mask, reference, ref_logp, old_logp, kl_estimator,
                     sample, kwargs):  # fmt: skip
    """(loss, metrics) of fused_linear_grpo_loss where takes_gradient_in_forward: hidden [B, L, D], weight [V, D],
    bias [V] or None, ids / mask [B, L]; ``reference(labels)`` the reference model's log-probs (no gradient) or
    None; ``sample`` the temperature, softcap, logit_scale and backend; ``kwargs`` grpo_loss's other keywords. The
    loss carries the gradients formed in its forward (module docstring)."""
    _inputs.check_linear("hidden", hidden, "weight", weight, "bias", bias)
    labels = torch.where(mask != 0, ids, IGNORE)
    _inputs.check_labels_in_range("labels", labels, weight.shape[0], IGNORE)
    temperature = _inputs.check_temperature(sample["temperature"])
    softcap = _inputs.check_softcap(sample["softcap"])
    hidden, bias = _inputs.scale_head_inputs("logit_scale", sample["logit_scale"], hidden, bias)
    backend = resolve("linear", sample["backend"], hidden.device)
    if reference is not None:
        with torch.no_grad():
            ref_logp = reference(labels)
    (hidden_rows,) = _inputs.as_rows(hidden)  # (1, B L, D), or (B, L, D) for e.g. hidden[:, :-1]: a view
    grads = new_grads(hidden_rows, weight, bias, torch.float32)
    chunk_total = _chunk_total_of(labels.view(hidden_rows.shape[:2]), advantages, mask, ref_logp, old_logp,
                                  kl_estimator, temperature, backend, kwargs)  # fmt: skip
    head = (hidden_rows.detach(), weight.detach(), None if bias is None else bias.detach(), softcap)
    logp, entropy = chunk_sweep(*head, empty_rows(hidden_rows, 2), chunk_total, grads, multiple=mask.shape[1])
    loss, metrics = grpo_loss(logp.view(mask.shape), advantages, mask, old_logp=old_logp, ref_logp=ref_logp,
                              kl_estimator=kl_estimator, entropy=entropy.view(mask.shape), **kwargs)  # fmt: skip
    return _LossWithGradients.apply(loss, hidden_rows, weight, bias, *grads), metrics


def _chunk_total_of(labels, advantages, mask, ref_logp, old_logp, kl_estimator, temperature: float, backend: str,
                    kwargs):  # fmt: skip
    """chunk_sweep's ``chunk_fn(z [1, C, V], rows) -> ((logp, H) [1, C], dz [1, C, V])`` for chunks of whole
    sequences of the (B, L) batch, whose rows are the (1, B L) or (B, L) ``labels``: the chunk's loss is grpo_loss on
    its [k, L] slices with num_items the batch's count of the loss type's unit (so that the chunks' losses add up to
    the batch's), dz its gradient plus the entropy bonus's."""
    B, L = mask.shape
    valid = mask != 0
    unit = LOSS_TYPES[kwargs.get("loss_type", "dapo")].aggregation
    count = kwargs.get("num_items")
    if count is None:
        count = valid.sum() if unit == "tokens" else B
    entropy_coef = kwargs.get("entropy_coef", 0.0)
    per_token = dict(old_logp=old_logp, ref_logp=ref_logp, rollout_logp=kwargs.get("rollout_logp"))
    options = {**kwargs, "num_items": count, "kl_estimator": kl_estimator}

    def chunk_total(z, rows):
        row, span = rows  # the chunk's rows: labels[row, span]
        first = (row * labels.shape[1] + span.start) // L
        sequences = slice(first, first + (span.stop - span.start) // L)
        chunk_labels = labels[rows][None]
        logp, entropy, max_z, logsum, *_ = logprobs_op(z, chunk_labels, temperature, True, False, IGNORE, backend)
        chunk_logp = logp.detach().view(-1, L).requires_grad_()
        sliced = {name: None if x is None else x[sequences] for name, x in per_token.items()}
        # the entropy goes in without a gradient: its bonus is divided by the chunk's valid tokens there
        chunk_loss, _ = grpo_loss(chunk_logp, advantages[sequences], mask[sequences], entropy=entropy.view(-1, L),
                                  **options | sliced)  # fmt: skip
        (grad_logp,) = torch.autograd.grad(chunk_loss, chunk_logp)
        if entropy_coef != 0:  # d/dH of -c sum m H / max(1, sum m), over the batch's valid tokens
            grad_entropy = valid[sequences].float() * (-entropy_coef / valid.sum().clamp(min=1))
        else:
            grad_entropy = torch.zeros_like(grad_logp)
        dz = logprobs_grad_of_chunk(grad_logp.view(1, -1), grad_entropy.view(1, -1), z, chunk_labels, max_z, logsum,
                                    entropy, temperature, entropy_coef != 0, IGNORE, backend)  # fmt: skip
        return (logp, entropy), dz

    return chunk_total


class _LossWithGradients(torch.autograd.Function):
    """The 0-d loss, differentiable to hidden / weight / bias by the fp32 gradients its forward formed: d(g loss)/dx
    = g d loss/dx, scaled_total_grads. Once differentiable, as the chunked path's other scalar losses."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, grad_hidden, grad_weight, grad_bias):
        ctx.save_for_backward(grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        grads = scaled_total_grads(ctx.saved_tensors, grad_loss, ctx.dtypes, ctx.needs_input_grad[1:4])
        return None, *grads, None, None, None
