"""Preference losses (docs/losses.md §4): DPO and f-DPO from sequence log-probs, the fused sequence log-probs
that feed them, and token-level DPO (TDPO1 / TDPO2) from logits or hidden states.

Nothing here forms a ``[tokens, vocab]`` tensor besides the gradient: the per-token log-probs and KLs come
from ``klops.logprobs`` / ``klops.fused_kl`` (or their fused-linear forms), the sequence-level steps work on
``[B]`` tensors. Where TRL's ``DPOTrainer`` defines a convention the spec does not, it is followed and said so.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from . import _inputs
from ._packed import packing
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded
from .divergence import divergence_and_label_logprobs
from .linear import fused_linear_logprobs
from .linear_divergence import linear_divergence_and_label_logprobs
from .logprobs import logprobs

__all__ = ["dpo_loss", "sequence_logprobs", "tdpo_loss", "DPO_LOSS_TYPES", "DPO_DIVERGENCES"]

DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge")
DPO_DIVERGENCES = ("reverse", "forward", "jsd", "alpha")
# The alpha score's exponent (alpha - 1) log-ratio is clamped here, as TRL does for fp32 / bf16, so that its
# exp stays finite.
ALPHA_EXPONENT_MAX = 80.0


def _check_float_rows(name: str, x, ref_name: str | None = None, ref: torch.Tensor | None = None) -> None:
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(
            f"{name} must be a float tensor, got {type(x).__name__ if not isinstance(x, torch.Tensor) else x.dtype}"
        )
    if ref is not None and (x.shape != ref.shape or x.device != ref.device):
        raise ValueError(
            f"{name} must have the shape {tuple(ref.shape)} of {ref_name} on {ref.device}, "
            f"got {tuple(x.shape)} on {x.device}"
        )


def dpo_scores(log_ratio: torch.Tensor, divergence: str, alpha: float) -> torch.Tensor:
    """The f-DPO score of a sequence log-ratio ``lr = log pi(y) - log ref(y)`` (docs/losses.md §4; TRL's
    ``f_divergence_type``): reverse ``lr``, forward ``-exp(-lr)``, jsd ``logsigmoid(lr)``, alpha
    ``exp((alpha - 1) lr) / (alpha - 1)`` with the exponent clamped at ``ALPHA_EXPONENT_MAX`` (alpha = 1 is the
    reverse limit, as in TRL)."""
    lr = log_ratio.float()
    if divergence == "reverse" or (divergence == "alpha" and abs(alpha - 1.0) < 1e-6):
        return lr
    if divergence == "forward":
        return -torch.exp(-lr)
    if divergence == "jsd":
        return F.logsigmoid(lr)
    return torch.exp(((alpha - 1.0) * lr).clamp(max=ALPHA_EXPONENT_MAX)) / (alpha - 1.0)


def dpo_loss(
    policy_chosen_logp: torch.Tensor,
    policy_rejected_logp: torch.Tensor,
    ref_chosen_logp: torch.Tensor,
    ref_rejected_logp: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    divergence: str = "reverse",
    alpha: float = 0.5,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO and f-DPO over ``P`` preference pairs: ``(loss, metrics)``, the loss the mean over pairs.

    With the scores ``s = dpo_scores(log pi - log ref)`` of the chosen (w) and rejected (l) sequences and
    ``delta = s_w - s_l`` (``divergence="reverse"``: DPO's ``h / beta``):

    - ``"sigmoid"``: ``-(1 - eps) logsigmoid(beta delta) - eps logsigmoid(-beta delta)``; ``eps = label_smoothing``
      is conservative DPO (cDPO). TRL 1.16's ``sigmoid`` takes no smoothing; its ``aot`` / ``aot_unpaired`` use
      this form on sorted log-ratios (the same when the sort keeps the pairs), and its ``robust`` type is Robust
      DPO's ``((1 - eps) l(h) - eps l(-h)) / (1 - 2 eps)``, a different loss, not offered here.
    - ``"ipo"``: ``(delta - 1 / (2 beta))^2``. TRL (with the IPO authors) divides each sequence's score by its
      completion's token count: pass ``sequence_logprobs(..., average=True)``, which equals TRL's IPO for
      ``divergence="reverse"`` (for the other divergences TRL divides the score, klops scores the averaged
      log-ratio); the reward metrics are then those of the averaged log-ratios.
    - ``"hinge"``: ``relu(1 - beta delta)`` (SLiC).

    TRL's scores for forward (``1 - exp(-lr)``), jsd (``log 2 + logsigmoid(lr)``) and alpha
    (``(exp((alpha - 1) lr) - 1) / (alpha - 1)``) differ from these by constants, which cancel in ``delta``;
    tests/test_trl.py checks loss, gradient and metrics against TRL 1.16's ``DPOTrainer._compute_loss``.

    Args:
        policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp: ``[P]`` float sequence
            log-probs (``klops.sequence_logprobs``); gradients flow to the policy's.
        beta: > 0. divergence: the f-DPO generator (``alpha``'s exponent clamped). label_smoothing: in [0, 0.5),
            sigmoid only.

    Returns ``(loss, metrics)``; metrics are 0-d fp32 tensors without a host sync, TRL's names:
    ``rewards/chosen`` and ``rewards/rejected`` (means of ``beta (log pi - log ref)``), ``rewards/margins``,
    ``rewards/accuracies`` (the fraction of pairs whose chosen reward is the larger).
    """
    _check_float_rows("policy_chosen_logp", policy_chosen_logp)
    if policy_chosen_logp.dim() != 1:
        raise ValueError(f"policy_chosen_logp must have shape [P], got {tuple(policy_chosen_logp.shape)}")
    for name, x in (("policy_rejected_logp", policy_rejected_logp), ("ref_chosen_logp", ref_chosen_logp),
                    ("ref_rejected_logp", ref_rejected_logp)):  # fmt: skip
        _check_float_rows(name, x, "policy_chosen_logp", policy_chosen_logp)
    beta = _inputs.check_real("beta", beta, low=0.0, high=math.inf, open_low=True)
    _inputs.check_choice("loss_type", loss_type, DPO_LOSS_TYPES)
    _inputs.check_choice("divergence", divergence, DPO_DIVERGENCES)
    alpha = _inputs.check_real("alpha", alpha, low=-math.inf, high=math.inf, open_low=True)
    label_smoothing = _inputs.check_real("label_smoothing", label_smoothing, low=0.0, high=0.5)
    if label_smoothing == 0.5:
        raise ValueError("label_smoothing must lie in [0, 0.5), got 0.5")
    if label_smoothing > 0 and loss_type != "sigmoid":
        raise ValueError(f"label_smoothing applies to loss_type='sigmoid', not {loss_type!r}")

    chosen_ratio = policy_chosen_logp.float() - ref_chosen_logp.float()
    rejected_ratio = policy_rejected_logp.float() - ref_rejected_logp.float()
    delta = dpo_scores(chosen_ratio, divergence, alpha) - dpo_scores(rejected_ratio, divergence, alpha)
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * delta) - label_smoothing * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1 / (2 * beta)).square()
    else:
        losses = torch.relu(1 - beta * delta)
    return losses.mean(), _reward_metrics(beta * chosen_ratio.detach(), beta * rejected_ratio.detach())


def _reward_metrics(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
    }


def sequence_logprobs(
    logits_or_hidden: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    average: bool = False,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> torch.Tensor:
    """Per-sequence log-probs ``sum_t m_t log q(y_t)`` (``average``: divided by ``max(1, sum_t m_t)``), fused.

    ``logits_or_hidden`` is ``[B, L, V]`` logits, or ``[B, L, D]`` hidden states with the head ``weight [V, D]``
    (and ``bias``, ``softcap``, ``logit_scale``): then the logits are never formed (``klops.fused_linear_logprobs``).
    ``labels
    [B, L]`` are the next tokens (already shifted); ``m`` is 1 where the label is not ``ignore_index`` and
    ``mask`` (optional, ``[B, L]``) is nonzero. Returns fp32 ``[B]`` with gradients to the logits (or hidden
    states, weight and bias); an all-masked sequence gives 0. A packed batch (``B = 1``, several sequences end to
    end, ``position_ids [1, L]`` restarting at 0 or ``cu_seqlens [S + 1]``: klops/_packed.py) gives ``[S]``, as the
    same sequences padded would.

    ``vocab_group`` / ``vocab_start``: the vocabulary sharded over a process group (logits ``[B, L, V_r]``, or a
    head shard ``weight [V_r, D]``), as in ``klops.logprobs`` / ``fused_linear_logprobs``; a logits DTensor placed
    ``Shard(-1)`` needs none. Every rank gets the same ``[B]`` (klops/vocab_parallel_rl.py).
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(logits_or_hidden) or is_sharded(weight):
        return VOCAB_PARALLEL_FORMS["sequence_logprobs"](
            logits_or_hidden, labels, mask, weight=weight, bias=bias, average=average, temperature=temperature,
            softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index, position_ids=position_ids,
            cu_seqlens=cu_seqlens, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
        )  # fmt: skip
    packed = packing(position_ids, cu_seqlens, labels)
    check_head_options(weight, bias, softcap, logit_scale)
    _inputs.check_bool("average", average)
    if weight is None:
        token_logp = logprobs(logits_or_hidden, labels, temperature=temperature, ignore_index=ignore_index,
                              backend=backend)  # fmt: skip
    else:
        token_logp = fused_linear_logprobs(logits_or_hidden, weight, labels, bias=bias, temperature=temperature,
                                           softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                                           backend=backend)  # fmt: skip
    return sequence_totals(token_logp, labels, mask, average, ignore_index, packed)


def check_head_options(weight, bias, softcap, logit_scale) -> None:
    """bias, softcap and logit_scale only with a weight (hidden states), never with logits."""
    if weight is None and (bias is not None or softcap is not None or logit_scale != 1.0):
        raise ValueError(
            "bias, softcap and logit_scale apply to hidden states with a weight; logits are used as they are"
        )


def sequence_totals(token_logp, labels, mask, average: bool, ignore_index: int, packed) -> torch.Tensor:
    """sequence_logprobs from the per-token log-probs [B, L]: their masked sums per sequence (or means)."""
    keep = _inputs.token_mask(labels, mask, ignore_index)
    total, count = _sequence_sums(token_logp * keep, packed), _sequence_sums(keep, packed)
    return total / count.clamp(min=1) if average else total


def _sequence_sums(x: torch.Tensor, packed) -> torch.Tensor:
    """Per-sequence sums of token values x [B, L]: [B], or [S] of a packed row (klops/_packed.py)."""
    return x.sum(-1) if packed is None else packed.sums(x)


def _pair_index(name: str, index, batch: int, device) -> torch.Tensor:
    if (
        not isinstance(index, torch.Tensor)
        or index.dim() != 1
        or index.dtype.is_floating_point
        or index.dtype == torch.bool
    ):
        raise TypeError(f"{name} must be a 1-D integer tensor of sequence indices")
    if index.device != device:
        raise ValueError(f"{name} is on {index.device} but the logits are on {device}")
    _inputs.check_none((index < 0) | (index >= batch), index, f"{name} must lie in [0, {batch})")
    return index


def tdpo_loss(
    policy,
    ref,
    labels: torch.Tensor,
    mask: torch.Tensor | None,
    chosen_index: torch.Tensor,
    rejected_index: torch.Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: int = 2,
    temperature: float = 1.0,
    softcap: float | None = None,
    logit_scale: float = 1.0,
    ignore_index: int = -100,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Token-level DPO (TDPO1 / TDPO2, docs/losses.md §4): ``(loss, metrics)``, the loss the mean over pairs.

    Per token, with ``q`` the policy's and ``p`` the reference's softmax at temperature ``T``: the log-ratio
    ``log q(y_t) - log p(y_t)`` and the full-vocabulary ``KL_t = KL(p || q)``; per sequence their masked sums
    ``margin`` and ``SeqKL``. For the pairs ``(w, l) = (chosen_index[i], rejected_index[i])`` (rows of the
    batch: chosen and rejected responses may sit anywhere in it), ``M = margin_w - margin_l`` and

        TDPO1: ``-logsigmoid(beta (M - (SeqKL_l - SeqKL_w)))``
        TDPO2: ``-logsigmoid(beta (M - alpha (SeqKL_l - sg(SeqKL_w))))``   (sg: no gradient)

    as in the TDPO authors' code. Gradients flow to the policy only.

    Args:
        policy, ref: ``[B, L, V]`` logits, or ``(hidden [B, L, D], weight [V, D][, bias])`` (neither model's
            logits are then formed; ``softcap`` and ``logit_scale`` apply to both, as in ``fused_linear_kl``).
        labels: ``[B, L]`` next tokens; mask: ``[B, L]`` or None (with labels != ignore_index, the response tokens).
        chosen_index, rejected_index: ``[P]`` integer indices into the batch.
        position_ids, cu_seqlens: a packed batch (``B = 1``; klops/_packed.py): the indices are then the packed
            sequences', and the loss is that of the same sequences padded.
        vocab_group, vocab_start: both models' logits sharded over the vocabulary (``[B, L, V_r]``, the same
            shards), as in ``klops.fused_kl``; logits DTensors placed ``Shard(-1)`` need none. Every rank gets the
            same loss and metrics, and its shard's gradient (klops/vocab_parallel_rl.py).

    Metrics (0-d fp32): TRL's reward metrics with TDPO's rewards ``beta (margin + SeqKL)``, and ``kl/chosen``,
    ``kl/rejected``: mean SeqKL. One fused sweep over each token's policy and reference rows gives the KL and
    both log-probs, and one backward sweep writes the policy's gradient (``a_t (onehot - q) + b_t (q - p)``);
    nothing of size [B, L, V] besides it.
    """
    if (
        vocab_group is not None
        or vocab_start is not None
        or any(map(is_sharded, _inputs.split_model("policy", policy)))
    ):
        return VOCAB_PARALLEL_FORMS["tdpo_loss"](
            policy, ref, labels, mask, chosen_index, rejected_index, beta=beta, alpha=alpha, variant=variant,
            temperature=temperature, softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
            position_ids=position_ids, cu_seqlens=cu_seqlens, backend=backend, vocab_group=vocab_group,
            vocab_start=vocab_start,
        )  # fmt: skip
    policy_z, policy_w, policy_b = _inputs.split_model("policy", policy)
    ref_z, ref_w, ref_b = _inputs.split_model("ref", ref)
    if (policy_w is None) != (ref_w is None):
        raise ValueError("give policy and ref both as logits or both as (hidden, weight)")
    if policy_w is None and (softcap is not None or logit_scale != 1.0):
        raise ValueError("softcap and logit_scale apply to models given as (hidden, weight); logits are used as given")
    pairs = TdpoPairs.check(policy_z, labels, mask, chosen_index, rejected_index, beta, alpha, variant, ignore_index,
                            position_ids, cu_seqlens)  # fmt: skip
    common = dict(temperature=temperature, mask=mask, ignore_index=ignore_index, backend=backend)
    if policy_w is None:
        kl, policy_logp, ref_logp = divergence_and_label_logprobs(policy_z, ref_z.detach(), labels, **common)
    else:
        ref_b = None if ref_b is None else ref_b.detach()
        policy_z, policy_b = _inputs.scale_head_inputs("logit_scale", logit_scale, policy_z, policy_b)
        ref_z, ref_b = _inputs.scale_head_inputs("logit_scale", logit_scale, ref_z.detach(), ref_b)
        kl, policy_logp, ref_logp = linear_divergence_and_label_logprobs(
            policy_z, policy_w, ref_z, ref_w.detach(), labels, student_bias=policy_b, teacher_bias=ref_b,
            softcap=softcap, **common,
        )  # fmt: skip
    return pairs.loss(kl, policy_logp, ref_logp)


class TdpoPairs(NamedTuple):
    """tdpo_loss's checked options and pairs, and its sequence-level steps from the per-token terms."""

    beta: float
    alpha: float
    variant: int
    keep: torch.Tensor  # [B, L] fp32: the response tokens
    packed: object  # klops/_packed.py's packing, or None
    chosen: torch.Tensor  # [P]
    rejected: torch.Tensor  # [P]

    @classmethod
    def check(cls, policy_z, labels, mask, chosen_index, rejected_index, beta, alpha, variant, ignore_index,
              position_ids, cu_seqlens) -> "TdpoPairs":  # fmt: skip
        """The checks of tdpo_loss's options and pair indices (policy_z: its logits or hidden states)."""
        beta = _inputs.check_real("beta", beta, low=0.0, high=math.inf, open_low=True)
        alpha = _inputs.check_real("alpha", alpha, low=0.0, high=math.inf)
        if variant not in (1, 2) or isinstance(variant, bool):
            raise ValueError(f"variant must be 1 (TDPO1) or 2 (TDPO2), got {variant!r}")
        if policy_z.dim() != 3:
            raise ValueError(f"policy must have shape [B, L, V] (or hidden [B, L, D]), got {tuple(policy_z.shape)}")
        keep = _inputs.token_mask(labels, mask, ignore_index)
        packed = packing(position_ids, cu_seqlens, labels)
        B = policy_z.shape[0] if packed is None else packed.count
        chosen = _pair_index("chosen_index", chosen_index, B, policy_z.device)
        rejected = _pair_index("rejected_index", rejected_index, B, policy_z.device)
        if chosen.shape != rejected.shape:
            raise ValueError(f"chosen_index and rejected_index must pair up: shapes {tuple(chosen.shape)} and "
                             f"{tuple(rejected.shape)}")  # fmt: skip
        return cls(beta, alpha, variant, keep, packed, chosen, rejected)

    def loss(self, kl, policy_logp, ref_logp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, metrics) from the per-token KL(p || q) and both models' label log-probs [B, L]."""
        chosen, rejected = self.chosen, self.rejected
        margin = _sequence_sums((policy_logp - ref_logp) * self.keep, self.packed)
        seq_kl = _sequence_sums(kl * self.keep, self.packed)
        m = margin[chosen] - margin[rejected]
        if self.variant == 1:
            logits = m - (seq_kl[rejected] - seq_kl[chosen])
        else:
            logits = m - self.alpha * (seq_kl[rejected] - seq_kl[chosen].detach())
        loss = -F.logsigmoid(self.beta * logits).mean()
        values = (self.beta * (margin + seq_kl)).detach()
        metrics = _reward_metrics(values[chosen], values[rejected])
        metrics["kl/chosen"] = seq_kl[chosen].detach().mean()
        metrics["kl/rejected"] = seq_kl[rejected].detach().mean()
        return loss, metrics
