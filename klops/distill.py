"""Distillation objectives of the literature klops serves (docs/losses.md §6), built on the fused ops: DCKD
(SFT on the chosen response plus the teacher's KL on chosen and rejected tokens), KDRL (a GRPO loss plus
the KL of the student from the teacher on its own rollouts) and AKL (forward and reverse KL mixed per token
by the head / tail gaps of the teacher's distribution).

Layers of AKL and of the forward / reverse KL pair: ``kernels/distill.py`` (Triton: both KLs online in one sweep,
the weights by a radix select instead of a sort), the chunked torch backend below (a sort per chunk of rows), the
custom op ``klops::kl_pair`` (the KLs differentiable; the weights have no gradient: they are constants, as in the
authors' code). BD-KD-style mixtures weight ``forward_reverse_kl``'s two KLs per row.
"""

import math

import torch

from . import _inputs
from ._chunked import log_softmax_from_stats, log_softmax_rows, row_chunks
from ._packed import packing
from .backend import launcher_table, resolve
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded
from .divergence import divergence_and_label_logprobs, fused_kl, reduce_rows, valid_rows_and_weights
from .grpo import grpo_loss_from_logits
from .linear import fused_linear_logprobs
from .linear_divergence import fused_linear_kl, linear_divergence_and_label_logprobs
from .logprobs import logprobs

__all__ = ["dckd_loss", "kdrl_loss", "akl_weights", "akl_loss"]


def _masked_mean(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return (values * keep).sum() / keep.sum().clamp(min=1)


def dckd_loss(
    student,
    teacher,
    labels: torch.Tensor,
    chosen: torch.Tensor,
    *,
    w_sft: float = 1.0,
    w_distil: float = 1.0,
    w_chosen: float = 1.0,
    w_rejected: float = 1.0,
    kind: str = "forward",
    beta: float | None = None,
    alpha: float | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dual-constrained KD (DCKD, the first stage of ADPA): ``(loss, metrics)`` with

        loss = w_sft NLL(chosen) + w_distil (w_chosen KL(chosen) + w_rejected KL(rejected))

    where ``NLL(chosen)`` is the mean of ``-log q(y_t)`` (at temperature 1) over the tokens of the chosen
    responses, and ``KL(chosen)`` / ``KL(rejected)`` the means of the per-token divergence ``kind`` (forward
    KL(p_T || q), DCKD's, by default; any ``fused_kl`` kind with its coefficient) at ``temperature`` over the
    tokens of the chosen / rejected responses. Tokens are those whose label is not ``ignore_index``. The
    weights default to 1 (a neutral choice: set them as your recipe does).

    Args:
        student: ``[B, L, V]`` logits, or ``(hidden [B, L, D], weight [V, D][, bias])`` (no logits formed).
        teacher: ``[B, L, V]`` logits, a ``klops.TopK`` (DCKD / ADPA store top-50 + a tail bin), or, with a
            hidden-state student, ``(teacher_hidden, teacher_weight[, teacher_bias])``.
        labels: ``[B, L]`` next tokens. chosen: ``[B]`` bool, True for the chosen responses' sequences.
        position_ids, cu_seqlens: a packed batch (``B = 1``; klops/_packed.py): ``chosen`` then has one flag per
            packed sequence ``[S]``, and the loss is that of the same sequences padded.

    Gradients flow to the student only. Metrics: ``nll``, ``kl/chosen``, ``kl/rejected`` (0-d fp32). At
    ``temperature=1`` the NLL and the KL come from one fused op (one sweep per direction, one gradient written);
    otherwise (the NLL is taken at temperature 1), and for a hidden-state student with teacher logits, from two.

    ``vocab_group`` / ``vocab_start``: vocabulary-sharded student and teacher logits, as ``fused_kl`` takes them
    (labels are global ids); the ops above then run vocabulary-parallel. Not with a hidden-state student.
    """
    for name, value in (("w_sft", w_sft), ("w_distil", w_distil), ("w_chosen", w_chosen), ("w_rejected", w_rejected)):
        _inputs.check_real(name, value, low=0.0, high=math.inf)
    z, weight, bias = _inputs.split_model("student", student)
    sharded = dict(vocab_group=vocab_group, vocab_start=vocab_start)
    if weight is not None and (vocab_group is not None or vocab_start is not None):
        raise ValueError("dckd_loss: vocab_group / vocab_start take sharded student and teacher logits, not hidden "
                         "states: pass each rank's logits [B, L, V_r]")  # fmt: skip
    packed = packing(position_ids, cu_seqlens, labels)
    sequences = labels.shape[:1] if packed is None else (packed.count,)
    if not isinstance(chosen, torch.Tensor) or chosen.dtype != torch.bool or chosen.shape != sequences:
        raise ValueError(f"chosen must be a bool tensor of shape {tuple(sequences)} (one flag per sequence)")
    chosen_tokens = chosen[:, None] if packed is None else packed.per_token(chosen)
    common = dict(temperature=temperature, ignore_index=ignore_index, backend=backend)
    coef = dict(beta=beta, alpha=alpha)
    # At T = 1 the NLL's log-probs come from the KL's own sweep (one fused op, one gradient written); at another
    # temperature (the NLL is taken at 1), or for a hidden-state student with teacher logits, from a second op.
    one_sweep = temperature == 1.0
    if weight is None:
        if one_sweep:
            kl, logp, _ = divergence_and_label_logprobs(z, teacher, labels, kind, **coef, **common, **sharded)
        else:
            kl = fused_kl(z, teacher, kind, labels=labels, reduction="none", **coef, **common, **sharded)
            logp = logprobs(z, labels, ignore_index=ignore_index, backend=backend, **sharded)
    elif isinstance(teacher, torch.Tensor):  # teacher logits beside a hidden-state student: two ops
        kl = fused_linear_kl(z, weight, teacher_logits=teacher, student_bias=bias, kind=kind, labels=labels,
                             reduction="none", **coef, **common)  # fmt: skip
        logp = fused_linear_logprobs(z, weight, labels, bias=bias, ignore_index=ignore_index, backend=backend)
    else:  # (teacher_hidden, teacher_weight[, bias]) or a TopK in the teacher_hidden position
        t_hidden, t_weight, t_bias = (teacher, None, None)
        if isinstance(teacher, tuple | list):
            t_hidden, t_weight, t_bias = _inputs.split_model("teacher", tuple(teacher))
        teacher_args = dict(student_bias=bias, teacher_bias=t_bias, **coef, **common)
        if one_sweep:
            kl, logp, _ = linear_divergence_and_label_logprobs(z, weight, t_hidden, t_weight, labels, kind,
                                                               **teacher_args)  # fmt: skip
        else:
            kl = fused_linear_kl(z, weight, t_hidden, t_weight, kind=kind, labels=labels, reduction="none",
                                 **teacher_args)  # fmt: skip
            logp = fused_linear_logprobs(z, weight, labels, bias=bias, ignore_index=ignore_index, backend=backend)
    tokens = _inputs.token_mask(labels, None, ignore_index)
    on_chosen = tokens * chosen_tokens.float()
    on_rejected = tokens * (~chosen_tokens).float()
    nll = _masked_mean(-logp, on_chosen)
    kl_chosen, kl_rejected = _masked_mean(kl, on_chosen), _masked_mean(kl, on_rejected)
    loss = w_sft * nll + w_distil * (w_chosen * kl_chosen + w_rejected * kl_rejected)
    metrics = {"nll": nll.detach(), "kl/chosen": kl_chosen.detach(), "kl/rejected": kl_rejected.detach()}
    return loss, metrics


def kdrl_loss(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    kl_coef: float,
    kl_estimator: str = "k3",
    **grpo_kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """KDRL: a GRPO-family loss on the student's rollouts plus ``kl_coef * KL(pi_student || pi_teacher)``
    (docs/losses.md §6), ``(loss, metrics)``.

    The KL is estimated per token at the sampled token with ``kl_estimator`` "k1", "k2", "k3" (default) or
    "abs" (``rho = log pi_teacher(y_t) - log pi(y_t)``, clamped to [-20, 20]), or is the exact reverse KL over
    the whole vocabulary with ``"full"`` (``fused_kl(kind="reverse")``); either way it is aggregated with the
    loss's ``loss_type``, as GRPO's KL to a reference is: this is ``grpo_loss_from_logits`` with the teacher in
    the reference's place and ``beta = kl_coef``. ``grpo_kwargs`` are its other arguments (``loss_type``,
    ``epsilon``, ``old_logp``, ``temperature``, ``backend``, ...). From hidden states:
    ``fused_linear_grpo_loss(..., ref_hidden=teacher_hidden, ref_weight=teacher_weight, beta=kl_coef)``.
    """
    taken = {"ref_logits", "ref_logp", "beta"} & grpo_kwargs.keys()
    if taken:
        raise ValueError(f"kdrl_loss sets {', '.join(sorted(taken))} itself (the teacher is the reference)")
    kl_coef = _inputs.check_real("kl_coef", kl_coef, low=0.0, high=math.inf)
    return grpo_loss_from_logits(logits, completion_ids, advantages, mask, ref_logits=teacher_logits, beta=kl_coef,
                                 kl_estimator=kl_estimator, **grpo_kwargs)  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# AKL (Wu et al. 2024, "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for LLMs")


def akl_split(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    """[rows] forward-KL weights of [rows, V] probabilities (any float dtype): the boundary entry is the first
    whose descending running sum of p exceeds mu; entries above it (and the argmax) are head, entries tied with
    it count in the head in the proportion of them that fits under mu (the average over tie orders)."""
    p_sorted = p.sort(dim=-1, descending=True).values
    boundary = (p_sorted.cumsum(-1) <= mu).sum(-1, keepdim=True).clamp(max=p.shape[-1] - 1)
    p_boundary = p_sorted.gather(-1, boundary)
    above, tie, gap = p > p_boundary, p == p_boundary, (p - q).abs()
    ties = tie.sum(-1)
    fit = torch.floor((mu - (p * above).sum(-1)) / p_boundary[:, 0]).clamp(min=0).minimum(ties.to(p.dtype))
    fit = torch.where(p_boundary[:, 0] == p_sorted[:, 0], fit.clamp(min=1), fit)
    head = (gap * above).sum(-1) + torch.where(ties > 0, fit / ties.clamp(min=1), 0.0) * (gap * tie).sum(-1)
    total = gap.sum(-1)
    return torch.where(total > 0, head / torch.where(total > 0, total, 1.0), 0.5)


def kl_pair_torch(student, teacher, valid, temperature: float, mu: float, akl_weights: bool):
    """Chunked torch backend of ``kl_pair_op``: both KLs from each chunk's log-probabilities, the AKL weights by a
    sort of the chunk's rows."""
    B, L, V = student.shape
    w = student.new_zeros((B, L), dtype=torch.float32)
    stats = student.new_zeros((B, L, 6), dtype=torch.float32)
    for b, rows in row_chunks(B, L, V):
        log_p, p, max_p, logsum_p = log_softmax_rows(teacher[b, rows], temperature)
        log_q, q, max_q, logsum_q = log_softmax_rows(student[b, rows], temperature)
        kl_pq = torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)
        kl_qp = torch.where(q > 0, q * (log_q - log_p), 0.0).sum(-1)
        keep = valid[b, rows]
        row_stats = torch.stack((kl_pq, kl_qp, max_q, logsum_q, max_p, logsum_p), -1)
        stats[b, rows] = torch.where(keep[:, None], row_stats, 0.0)
        if akl_weights:
            w[b, rows] = torch.where(keep, akl_split(p, q, mu), 0.0)
    return w.reshape(-1), stats.reshape(-1, 6)


def kl_pair_backward_torch(grad, student, teacher, valid, stats, temperature: float):
    """Chunked torch backend of ``kl_pair_backward_op``."""
    B, L, V = student.shape
    dz = torch.empty_like(student)
    stats = stats.reshape(B, L, 6)
    scale = (grad.reshape(B, L, 2) * valid[..., None]) / temperature
    for b, rows in row_chunks(B, L, V):
        _, kl_qp, max_q, logsum_q, max_p, logsum_p = stats[b, rows].unbind(-1)
        log_q = log_softmax_from_stats(student[b, rows], max_q, logsum_q, temperature)
        log_p = log_softmax_from_stats(teacher[b, rows], max_p, logsum_p, temperature)
        q, g_pq, g_qp = log_q.exp(), scale[b, rows, 0, None], scale[b, rows, 1, None]
        reverse = torch.where(q > 0, q * (log_q - log_p - kl_qp[:, None]), 0.0)
        dz[b, rows] = (g_pq * (q - log_p.exp()) + g_qp * reverse).to(dz.dtype)
    return dz


_kl_pair_launchers = launcher_table(  # (forward, backward)
    triton=("klops.kernels.distill:kl_pair_forward", "klops.kernels.distill:kl_pair_backward"),
    torch=(kl_pair_torch, kl_pair_backward_torch),
    cpu=("torch:ops.klops_cpu.kl_pair_forward", "torch:ops.klops_cpu.kl_pair_backward"),
)


@torch.library.custom_op("klops::kl_pair", mutates_args=())
def kl_pair_op(
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    temperature: float,
    mu: float,
    akl_weights: bool,
    backend: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L, V) logits, (B, L) valid -> (B*L,) fp32 AKL forward-KL weights (with ``akl_weights``, else 0; no
    gradient) and (B*L, 6) fp32 per row: KL(p||q), KL(q||p) (differentiable), then max_q, logsum_q, max_p,
    logsum_p; 0 on invalid rows."""
    return _kl_pair_launchers(backend)[0](student, teacher, valid, temperature, mu, akl_weights)


@kl_pair_op.register_fake
def _(student, teacher, valid, temperature, mu, akl_weights, backend):
    rows = student.shape[0] * student.shape[1]
    return student.new_empty(rows, dtype=torch.float32), student.new_empty((rows, 6), dtype=torch.float32)


@torch.library.custom_op("klops::kl_pair_backward", mutates_args=())
def kl_pair_backward_op(
    grad: torch.Tensor,
    student: torch.Tensor,
    teacher: torch.Tensor,
    valid: torch.Tensor,
    stats: torch.Tensor,
    temperature: float,
    backend: str,
) -> torch.Tensor:
    """(B*L, 2) fp32 grads of KL(p||q), KL(q||p) -> (B, L, V) gradient of the student logits (its dtype):
    ``(g_pq (q - p) + g_qp q (log q - log p - KL(q||p))) / T``."""
    return _kl_pair_launchers(backend)[1](grad, student, teacher, valid, stats, temperature)


@kl_pair_backward_op.register_fake
def _(grad, student, *rest):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _kl_pair_setup_context(ctx, inputs, output):
    student, teacher, valid, temperature, mu, akl_weights, backend = inputs
    ctx.save_for_backward(student, teacher, valid, output[1])
    ctx.params = (temperature, backend)


def _kl_pair_backward(ctx, grad_w, grad_stats):
    student, teacher, valid, stats = ctx.saved_tensors
    grad = grad_stats[:, :2].contiguous()  # the weights and the row statistics are constants
    return (kl_pair_backward_op(grad, student, teacher, valid, stats, *ctx.params),) + (None,) * 6


torch.library.register_autograd("klops::kl_pair", _kl_pair_backward, setup_context=_kl_pair_setup_context)


def forward_reverse_kl(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per token ``KL(p || q)`` and ``KL(q || p)`` ([...] fp32 each, 0 on invalid rows), both from one sweep of
    the two rows, for any per-row mixture of forward and reverse KL (BD-KD-style weighting, or your own):
    ``loss = (w_f * kl_forward + w_r * kl_reverse).sum() / n``, with weights that may depend on the tokens.

    ``q = softmax(student_logits / T)``, ``p = softmax(teacher_logits / T)`` ([..., V] logits of the same shape;
    the teacher gets no gradient). Both outputs are differentiable; the backward is one sweep writing
    ``(g_f (q - p) + g_r q (log q - log p - KL(q || p))) / T`` for their upstream gradients ``g_f``, ``g_r``, where
    two ``fused_kl`` calls read both rows twice forward and backward and write two gradients. Rows whose label is
    ``ignore_index`` or whose mask is 0 give 0. Backends: "triton" (GPU or interpreter), "cpu" (C++) and "torch".
    ``vocab_group`` / ``vocab_start``: vocabulary-sharded logits, as ``fused_kl`` takes them
    (klops/vocab_parallel_distill.py).
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(student_logits):
        return VOCAB_PARALLEL_FORMS["forward_reverse_kl"](
            student_logits, teacher_logits, temperature=temperature, labels=labels, mask=mask,
            ignore_index=ignore_index, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    valid, temperature, backend = _kl_pair_checks(
        "forward_reverse_kl", student_logits, teacher_logits, temperature, labels, mask, ignore_index, backend
    )
    student3, teacher3 = _inputs.as_rows(student_logits, teacher_logits.detach())
    _, stats = kl_pair_op(student3, teacher3, valid.reshape(student3.shape[:2]), temperature, 0.5, False, backend)
    return stats[:, 0].reshape(valid.shape), stats[:, 1].reshape(valid.shape)


def _kl_pair_checks(op, student_logits, teacher_logits, temperature, labels, mask, ignore_index, backend):
    """(valid [...], temperature, backend) of forward_reverse_kl / akl_weights / akl_loss (``op``)."""
    _inputs.check_logits("student_logits", student_logits)
    _inputs.check_dense_teacher(teacher_logits, student_logits)
    temperature = _inputs.check_temperature(temperature)
    valid, _ = valid_rows_and_weights(
        "student_logits", student_logits, student_logits.shape[-1], labels, mask, None, ignore_index
    )
    return valid, temperature, resolve("kl_pair", backend, student_logits.device, name=op)


def _akl_checks(op, student_logits, teacher_logits, mu, temperature, labels, mask, ignore_index, backend):
    """(valid [...], mu, temperature, backend) of akl_weights / akl_loss (``op``), raising on bad input."""
    valid, temperature, backend = _kl_pair_checks(
        op, student_logits, teacher_logits, temperature, labels, mask, ignore_index, backend
    )
    mu = _inputs.check_real("mu", mu, low=0.0, high=1.0, open_low=True)
    if mu == 1.0:
        raise ValueError("mu must lie in (0, 1), got 1.0")
    return valid, mu, temperature, backend


def akl_weights(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """AKL's per-token weight of the forward KL (the reverse KL's is ``1 - w``), [...] fp32, no gradient.

    With ``p = softmax(teacher / T)``, ``q = softmax(student / T)`` and p sorted in descending order, the head is
    the first entry and every entry whose running sum of p is ``<= mu``, the tail the rest (the authors'
    ``cumsum > mu`` mask with its first entry cleared); ``g_head = sum_head |p - q|``, ``g_tail`` likewise, and
    ``w = g_head / (g_head + g_tail)`` (1/2 where p = q, where the authors' code divides 0 by 0). Invalid rows
    (``ignore_index`` labels, ``mask`` 0) get 0. ``-inf`` logits are probability 0 here; the authors' code sets
    them to logit 0 before its softmax. Entries tied in p with the boundary entry (frequent with bf16 logits)
    count in the head in the proportion of them that fits under mu, the average over the orders in which a sort
    may put them: the authors' split depends on how their sort breaks the tie.

    The Triton kernel finds the boundary without sorting (kernels/distill.py): 10 sweeps of the teacher row, 2
    of the student's; it is ``akl_loss``'s kernel, whose KLs are dropped here. The C++ CPU kernel
    (csrc/cpu/kl_pair.cpp) keeps the row's p in a buffer and binary-searches the boundary's fp32 bits, one
    vectorized pass over that buffer per step. The torch backend sorts each chunk of rows.

    ``vocab_group`` / ``vocab_start``: vocabulary-sharded logits, as ``fused_kl`` takes them; the boundary is then
    bisected over its fp32 bits, each of 30 rounds an all-reduce of 4 bytes per token
    (klops/vocab_parallel_distill.py).
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(student_logits):
        return VOCAB_PARALLEL_FORMS["akl_weights"](
            student_logits, teacher_logits, mu=mu, temperature=temperature, labels=labels, mask=mask,
            ignore_index=ignore_index, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    valid, mu, temperature, backend = _akl_checks(
        "akl_weights", student_logits, teacher_logits, mu, temperature, labels, mask, ignore_index, backend
    )
    student3, teacher3 = _inputs.as_rows(student_logits.detach(), teacher_logits.detach())
    weights, _ = kl_pair_op(student3, teacher3, valid.reshape(student3.shape[:2]), temperature, mu, True, backend)
    return weights.reshape(valid.shape)


def akl_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    mu: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Adaptive KL (AKL): per token ``w KL(p || q) + (1 - w) KL(q || p)`` with ``w = akl_weights(...)``, reduced
    over the valid tokens as ``fused_kl`` does (``"mean"``: the authors' mean over non-ignored labels).

    The weights are constants (the authors detach the student's probabilities and never differentiate the
    teacher), so the gradient is ``w`` times forward KL's plus ``1 - w`` times reverse KL's. One op: on the Triton
    backend the weights' kernel also accumulates both KLs online in its first sweep (``forward_reverse_kl``'s, no
    further read of either row) and the backward is one sweep writing
    ``(w (q - p) + (1 - w) q (log q - log p - KL(q||p))) / T``; the torch backend sorts each chunk of rows for the
    weights and forms both KLs from its log-probabilities. ``vocab_group`` / ``vocab_start``: as ``akl_weights``.
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(student_logits):
        return VOCAB_PARALLEL_FORMS["akl_loss"](
            student_logits, teacher_logits, mu=mu, temperature=temperature, labels=labels, mask=mask,
            ignore_index=ignore_index, reduction=reduction, num_items=num_items, backend=backend,
            vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    _inputs.check_choice("reduction", reduction, _inputs.REDUCTIONS)
    _inputs.check_num_items(num_items, reduction)
    valid, mu, temperature, backend = _akl_checks(
        "akl_loss", student_logits, teacher_logits, mu, temperature, labels, mask, ignore_index, backend
    )
    student3, teacher3 = _inputs.as_rows(student_logits, teacher_logits.detach())
    w, stats = kl_pair_op(student3, teacher3, valid.reshape(student3.shape[:2]), temperature, mu, True, backend)
    rows = w * stats[:, 0] + (1 - w) * stats[:, 1]
    return reduce_rows(rows.reshape(valid.shape), valid, reduction, num_items)
