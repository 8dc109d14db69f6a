"""Distillation objectives of the literature klops serves (docs/losses.md §6), built on the fused ops: DCKD
(SFT on the chosen response plus the teacher's KL on chosen and rejected tokens) and KDRL (a GRPO loss plus
the KL of the student from the teacher on its own rollouts).

Skew KL, generalized JSD, AKL-style and BD-KD-style mixtures are per-row weighted sums of ``fused_kl``'s kinds:
``fused_kl(..., kind=..., weights=w, reduction="none")`` per kind, summed.
"""

import math

import torch

from . import _inputs
from .divergence import divergence_and_label_logprobs, fused_kl
from .grpo import grpo_loss_from_logits
from .linear import fused_linear_kl, fused_linear_logprobs, linear_divergence_and_label_logprobs
from .logprobs import logprobs
from .preference import _split_model, _token_mask

__all__ = ["dckd_loss", "kdrl_loss"]


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
    backend: str = "auto",
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

    Gradients flow to the student only. Metrics: ``nll``, ``kl/chosen``, ``kl/rejected`` (0-d fp32). At
    ``temperature=1`` the NLL and the KL come from one fused op (one sweep per direction, one gradient written);
    otherwise (the NLL is taken at temperature 1), and for a hidden-state student with teacher logits, from two.
    """
    for name, value in (("w_sft", w_sft), ("w_distil", w_distil), ("w_chosen", w_chosen), ("w_rejected", w_rejected)):
        _inputs.check_real(name, value, low=0.0, high=math.inf)
    z, weight, bias = _split_model("student", student)
    if not isinstance(chosen, torch.Tensor) or chosen.dtype != torch.bool or chosen.shape != labels.shape[:1]:
        raise ValueError(f"chosen must be a bool tensor of shape {tuple(labels.shape[:1])} (one flag per sequence)")
    common = dict(temperature=temperature, ignore_index=ignore_index, backend=backend)
    coef = dict(beta=beta, alpha=alpha)
    # At T = 1 the NLL's log-probs come from the KL's own sweep (one fused op, one gradient written); at another
    # temperature (the NLL is taken at 1), or for a hidden-state student with teacher logits, from a second op.
    one_sweep = temperature == 1.0
    if weight is None:
        if one_sweep:
            kl, logp, _ = divergence_and_label_logprobs(z, teacher, labels, kind, **coef, **common)
        else:
            kl = fused_kl(z, teacher, kind, labels=labels, reduction="none", **coef, **common)
            logp = logprobs(z, labels, ignore_index=ignore_index, backend=backend)
    elif isinstance(teacher, torch.Tensor):  # teacher logits beside a hidden-state student: two ops
        kl = fused_linear_kl(z, weight, teacher_logits=teacher, student_bias=bias, kind=kind, labels=labels,
                             reduction="none", **coef, **common)  # fmt: skip
        logp = fused_linear_logprobs(z, weight, labels, bias=bias, ignore_index=ignore_index, backend=backend)
    else:  # (teacher_hidden, teacher_weight[, bias]) or a TopK in the teacher_hidden position
        t_hidden, t_weight, t_bias = (teacher, None, None)
        if isinstance(teacher, tuple | list):
            t_hidden, t_weight, t_bias = _split_model("teacher", tuple(teacher))
        teacher_args = dict(student_bias=bias, teacher_bias=t_bias, **coef, **common)
        if one_sweep:
            kl, logp, _ = linear_divergence_and_label_logprobs(z, weight, t_hidden, t_weight, labels, kind,
                                                               **teacher_args)  # fmt: skip
        else:
            kl = fused_linear_kl(z, weight, t_hidden, t_weight, kind=kind, labels=labels, reduction="none",
                                 **teacher_args)  # fmt: skip
            logp = fused_linear_logprobs(z, weight, labels, bias=bias, ignore_index=ignore_index, backend=backend)
    tokens = _token_mask(labels, None, ignore_index)
    on_chosen = tokens * chosen[:, None].float()
    on_rejected = tokens * (~chosen)[:, None].float()
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
