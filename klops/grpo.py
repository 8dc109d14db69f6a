"""RL policy losses on per-token log-probs: group advantages, KL estimators and the GRPO family (docs/losses.md §3).

``grpo_loss`` takes the per-token log-probs of the sampled completion tokens (``[B, L]``, with gradient:
``klops.logprobs`` computes them with the entropy in one sweep over the vocabulary) and returns the loss
and its metrics; ``grpo_loss_from_logits`` does both steps from the ``[B, L, V]`` logits. Everything here is
``[B, L]``-sized torch math in fp32 (in float64 for float64 inputs): nothing of size ``[B, L, V]``, no host
sync (metrics are 0-d tensors), and ``torch.compile(fullgraph=True)`` traces it.

Each ``loss_type`` is one row of ``LOSS_TYPES``: its traits (ratio level, clipping, aggregation, normalizer, how
the rollout correction enters) and one short function giving its per-token loss from the quantities every type
shares (the table and the functions are in klops/_grpo_types.py). ``grpo_loss`` checks its inputs, forms those
quantities, calls the type's function, applies the corrections every type takes, aggregates by the type's traits
and adds the entropy bonus.

Conventions follow TRL's ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py, TRL 1.16.0, which
tests/test_trl.py runs on the same tensors) and Liger-Kernel's ``chunked_loss/grpo_loss.py`` (commit ead96b6);
verl's ``verl/trainer/ppo/core_algos.py`` for its types: commit b178a3c (volcengine/verl) for ``gpg``,
``geo_mean``, ``clip_cov``, ``kl_cov``; commit 1dda039 (verl-project/verl) for ``dppo_tv``, ``dppo_kl``,
``dro``, ``gspo_token`` (verl's ``gspo``) and ``kl_penalty``'s ``low_var_kl``.

Mapping from TRL's ``GRPOTrainer`` (one process; tests/test_trl.py checks it): ``epsilon`` is its ``epsilon``
(``epsilon_low``), ``mask`` its ``completion_mask * tool_mask``, ``rollout_logp`` its
``sampling_per_token_logps`` with ``rollout_correction = vllm_importance_sampling_mode``. TRL divides the loss
of grpo, bnpo, dr_grpo, sapo and luspo, and the entropy bonus, by the gradient-accumulation steps ``G`` in
training; here that is ``num_items = B G`` (grpo, dr_grpo, sapo, luspo), ``num_items = G sum m`` (bnpo) and
``entropy_coef / G``. For dapo, cispo and vespo ``num_items`` is TRL's ``num_items_in_batch G /
steps_per_generation`` (``num_items_in_batch`` in eval).

Differences from TRL: the log-ratios are clamped to [-20, 20] inside every exp; TRL's default is
``use_bias_correction_kl=True``, klops's ``False`` (the plain k3 term); clip metrics are taken before ``delta``
(as Liger) and token-weighted at sequence level (TRL averages sequences); the types whose ratio trait is
``"token"`` reject sequence-level ratios (their ratio is per sequence already, or none, or verl defines them per
token; TRL's sequence-level vespo differs from its token-level one only in the bias-corrected KL). The
sequence-level cispo / sapo that Liger rejects are computed as TRL does. A tie between the clipped and
unclipped branches (a ratio exactly on a clip bound) takes the whole unclipped gradient, where TRL's
``torch.min`` splits it. Differences from verl: its ``gspo`` clamps the sequence log-ratio at 10 from above,
klops at [-20, 20]; klops's clip metrics (below) replace verl's ``pg_clipfrac``; Clip-Cov / KL-Cov select
their tokens with a sort, without verl's host syncs.
"""

import math
import numbers
import textwrap
from collections.abc import Callable

import torch

from . import _inputs
from ._grpo_types import (
    LOG_RATIO_CLAMP,
    LOSS_TYPES,
    PPO_CLIP_TYPES,
    LossType,
    Metrics,
    _masked_mean,
    _Options,
    _Quantities,
)
from ._packed import packing
from .distributed import VOCAB_PARALLEL_FORMS, is_sharded
from .divergence import fused_kl
from .logprobs import logprobs

__all__ = ["group_advantages", "kl_estimate", "grpo_loss", "grpo_loss_from_logits"]

KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SCALES = ("group", "batch", "none")


def _nanstd(x: torch.Tensor, dim=None) -> torch.Tensor:
    """Bessel-corrected std over the non-NaN entries (NaN where fewer than two)."""
    count = (~x.isnan()).sum(dim=dim, keepdim=dim is not None)
    mean = x.nanmean(dim=dim, keepdim=dim is not None)
    sq = ((x - mean) ** 2).nansum(dim=dim, keepdim=dim is not None)
    std = (sq / (count - 1)).sqrt()
    return torch.where(count > 1, std, torch.nan)


def group_advantages(
    rewards: torch.Tensor, group_size: int, *, scale: str = "group", eps: float = 1e-4
) -> torch.Tensor:
    """GRPO advantages of ``rewards [B]``, ``B / group_size`` consecutive groups of completions.

    ``A_i = r_i - mean_group(r)``, divided by ``std_group + eps`` (``scale="group"``), by the batch
    ``std + eps`` (``"batch"``, still centred on the group mean) or not at all (``"none"``). The std is
    Bessel-corrected. NaN rewards (unscorable completions) are left out of the means and stds and get
    ``A = 0``, as TRL does. Returns ``[B]`` fp32.
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.dtype.is_floating_point:
        raise TypeError(f"rewards must be a 1-D float tensor [B], got {getattr(rewards, 'shape', type(rewards))}")
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.numel() % group_size != 0:
        raise ValueError(f"group_size={group_size} must divide the number of rewards, {rewards.numel()}")
    _inputs.check_choice("scale", scale, SCALES)
    eps = _inputs.check_real("eps", eps, low=0.0, high=math.inf)
    r = rewards.float()
    grouped = r.view(-1, group_size)
    advantages = (grouped - grouped.nanmean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        advantages = advantages / (_nanstd(grouped, dim=1).repeat_interleave(group_size) + eps)
    elif scale == "batch":
        advantages = advantages / (_nanstd(r) + eps)
    return torch.nan_to_num(advantages, nan=0.0)


def kl_estimate(
    logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3", *, clamp: float | None = None
) -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled token, with ``rho = ref_logp - logp``:

    ``k1 = -rho``, ``k2 = rho^2 / 2``, ``k3 = exp(rho) - rho - 1`` (TRL's default), ``abs = |rho|``. ``rho`` is
    clamped to [-20, 20] inside the ``exp`` (docs/losses.md §3), where TRL does not clamp. Gradients flow to
    ``logp`` only: ``dk3/dlogp = 1 - exp(rho)``.

    ``clamp`` (default None: none) clamps the estimate to ``[-clamp, clamp]``, with a zero gradient outside.
    verl's ``low_var_kl`` is k3 with ``clamp=10``: at ``rho = 3.5`` it gives 10 with a zero gradient, where the
    unclamped k3 gives 28.6 with gradient -32.1. Same shape as ``logp``, fp32 (float64 for float64 inputs).
    """
    _inputs.check_choice("estimator", estimator, KL_ESTIMATORS)
    if not isinstance(ref_logp, torch.Tensor) or ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}")
    if clamp is not None:
        clamp = _inputs.check_real("clamp", clamp, low=0.0, high=math.inf, open_low=True)
    dtype = _compute_dtype(logp)
    rho = ref_logp.detach().to(dtype) - logp.to(dtype)
    if estimator == "k1":
        kl = -rho
    elif estimator == "k2":
        kl = 0.5 * rho.square()
    elif estimator == "abs":
        kl = rho.abs()
    else:
        kl = torch.exp(rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - rho - 1.0
    return kl if clamp is None else kl.clamp(-clamp, clamp)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _check_per_token(name: str, x, shape, device) -> None:
    if x is None:
        return
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        raise TypeError(f"{name} must be a float tensor of shape {tuple(shape)}, got {type(x).__name__}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have the shape of logp {tuple(shape)}, got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but logp is on {device}")


def _rollout_ratio(old, rollout_logp, m, mode: str, clip_min, clip_max) -> torch.Tensor:
    """TRL's vLLM importance-sampling correction pi_old / pi_rollout: per token, or per sequence
    from the summed log-ratio ([B, 1]); truncated to [clip_min, clip_max] or zeroed outside it."""
    diff = (old - rollout_logp.to(old.dtype)) * m
    if mode.startswith("sequence"):
        diff = diff.sum(-1, keepdim=True)
    ratio = torch.exp(diff.clamp(max=LOG_RATIO_CLAMP))
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    low = -math.inf if clip_min is None else clip_min
    high = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < low) | (ratio > high), 0.0)


# torch.nanquantile rounds q to the values' dtype, then forms the rank q (n - 1) in that dtype up to torch 2.13
# and in float64 from torch 2.14 (the interpolation weight is then rounded to the values' dtype): an fp32
# cutoff differs by an ulp between the two in about a third of random cases, enough to move a token across the
# entropy mask.
_QUANTILE_RANK_FLOAT64 = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 14)


def _masked_quantile(values: torch.Tensor, keep: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation) of the kept entries of values; NaN when none is kept. Bitwise the
    same as torch.nanquantile(torch.where(keep, values, nan), q) of the installed torch, from a sort and gathers:
    nanquantile's check for NaNs is a data-dependent op that torch.compile(fullgraph=True) rejects before 2.13."""
    if values.numel() == 0:
        return values.new_full((), math.nan)
    ordered = torch.where(keep, values, math.inf).flatten().sort().values  # the kept entries first
    count = keep.sum()
    rank_dtype = torch.float64 if _QUANTILE_RANK_FLOAT64 else values.dtype
    rank = (count - 1).clamp(min=0).to(rank_dtype) * values.new_tensor(q).to(rank_dtype)
    below, above = ordered.gather(0, torch.stack([rank.floor(), rank.ceil()]).long())
    weight = (rank - rank.floor()).to(values.dtype)
    return torch.where(count > 0, torch.lerp(below, above, weight), math.nan)


# ---------------------------------------------------------------------------------------------------------------
# grpo_loss, step by step.


def _check_tensors(logp, advantages, mask, per_token: dict) -> None:
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a float tensor [B, L], got {getattr(logp, 'shape', type(logp))}")
    shape, device = logp.shape, logp.device
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must be a tensor of the shape of logp {tuple(shape)}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (tuple(shape), (shape[0],)):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)}, got {got}")
    for name, x in (("mask", mask), ("advantages", advantages)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but logp is on {device}")
    for name, x in per_token.items():
        _check_per_token(name, x, shape, device)


def _check_options(o: _Options, per_token: dict) -> LossType:
    """Check the scalar arguments and what they need of the tensors; returns the loss type's traits."""
    _inputs.check_choice("loss_type", o.loss_type, tuple(LOSS_TYPES))
    _inputs.check_choice("importance_sampling_level", o.importance_sampling_level, ("token", "sequence"))
    _inputs.check_choice("kl_estimator", o.kl_estimator, KL_ESTIMATORS)
    _inputs.check_choice("rollout_correction", o.rollout_correction, ROLLOUT_CORRECTIONS)
    spec, given = LOSS_TYPES[o.loss_type], {name for name, x in per_token.items() if x is not None}
    positive = dict(low=0.0, high=math.inf, open_low=True)
    _inputs.check_real("epsilon", o.epsilon, **positive)
    _inputs.check_real("epsilon_high", o.epsilon_high, **positive)
    if o.delta is not None:
        _inputs.check_real("delta", o.delta, **positive)
        if spec.clip != "ppo":
            raise ValueError(f"delta (two-sided clipping) applies to {', '.join(PPO_CLIP_TYPES)}, not {o.loss_type!r}")
    _inputs.check_real("beta", o.beta, low=0.0, high=math.inf)
    if o.beta > 0 and not given & {"ref_logp", "per_token_kl"}:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs of the same tokens)")
    if o.kl_clamp is not None:
        _inputs.check_real("kl_clamp", o.kl_clamp, **positive)
    _inputs.check_real("entropy_coef", o.entropy_coef, low=-math.inf, high=math.inf, open_low=True)
    _inputs.check_real("top_entropy_quantile", o.top_entropy_quantile, low=0.0, high=1.0)
    if (o.entropy_coef != 0 or o.top_entropy_quantile < 1) and "entropy" not in given:
        raise ValueError("entropy_coef != 0 and top_entropy_quantile < 1 need entropy (klops.logprobs returns it)")
    rollout_sequence = "rollout_logp" in given and o.rollout_correction.startswith("sequence")
    if spec.rollout == "in_weight" and rollout_sequence:
        raise ValueError(
            f"loss_type={o.loss_type!r} takes a token-level rollout_correction (its weight sums the log-ratios)"
        )
    if o.importance_sampling_level == "sequence" and spec.ratio == "token":
        raise ValueError(
            f"loss_type={o.loss_type!r} takes no sequence-level ratio; use importance_sampling_level='token'"
        )
    if "rollout_logp" in given and o.rollout_correction.endswith("truncate"):
        if o.rollout_clip_min is None and o.rollout_clip_max is None:
            raise ValueError(f"rollout_correction={o.rollout_correction!r} needs rollout_clip_min or rollout_clip_max")
    for name in ("rollout_clip_min", "rollout_clip_max"):
        if getattr(o, name) is not None:
            _inputs.check_real(name, getattr(o, name), low=0.0, high=math.inf)
    if o.rollout_clip_min is not None and o.rollout_clip_max is not None and o.rollout_clip_min >= o.rollout_clip_max:
        raise ValueError(f"rollout_clip_min={o.rollout_clip_min} must be below rollout_clip_max={o.rollout_clip_max}")
    for name in ("sapo_temperature_pos", "sapo_temperature_neg", "dppo_ratio_cap"):
        _inputs.check_real(name, getattr(o, name), **positive)
    if o.loss_type == "dro" and o.dro_beta is None:
        raise ValueError("loss_type='dro' needs dro_beta > 0 (verl's policy_loss.dro_beta, which has no default)")
    if o.dro_beta is not None:
        _inputs.check_real("dro_beta", o.dro_beta, **positive)
    if o.off_policy_mask_threshold is not None:
        _inputs.check_real("off_policy_mask_threshold", o.off_policy_mask_threshold, low=-math.inf, high=math.inf,
                           open_low=True)  # fmt: skip
    _inputs.check_num_items(o.num_items)
    length = o.max_completion_length
    if length is not None and (isinstance(length, bool) or not isinstance(length, numbers.Integral) or length < 1):
        raise ValueError(f"max_completion_length must be a positive int, got {length!r}")
    return spec


def _quantities(logp, advantages, mask, per_token: dict, spec: LossType, o: _Options) -> _Quantities:
    """The tensors every loss type reads, in the compute dtype: the token or sequence ratio by the type's ratio
    trait, and the rollout IS ratio when rollout_logp is given."""
    dtype = _compute_dtype(logp)
    m = (mask != 0).to(dtype)
    A = advantages.to(dtype)[:, None] if advantages.dim() == 1 else advantages.to(dtype)
    lp = logp.to(dtype)
    old = lp.detach() if per_token["old_logp"] is None else per_token["old_logp"].to(dtype)
    log_ratio = lp - old
    level = o.importance_sampling_level if spec.ratio == "either" else spec.ratio
    if level == "sequence":
        log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    rollout = per_token["rollout_logp"]
    is_ratio = None
    if rollout is not None:
        is_ratio = _rollout_ratio(old.detach(), rollout, m, o.rollout_correction, o.rollout_clip_min,
                                  o.rollout_clip_max)  # fmt: skip
    rest = {name: None if per_token[name] is None else per_token[name].to(dtype)
            for name in ("rollout_logp", "ref_logp", "entropy", "per_token_kl")}  # fmt: skip
    return _Quantities(lp, old, log_ratio, ratio, A, m, is_ratio, rest["rollout_logp"], rest["ref_logp"],
                       rest["entropy"], rest["per_token_kl"])  # fmt: skip


def _corrections(loss_t, q: _Quantities, spec: LossType, o: _Options, metrics: Metrics):
    """TRL's order: the off-policy sequence mask, the entropy mask, the rollout IS ratio, the KL term. Returns the
    corrected per-token loss and the token weight of the entropy bonus (the valid, entropy-kept tokens)."""
    m, dtype = q.m, q.m.dtype
    if o.off_policy_mask_threshold is not None:
        sampler = q.old if q.rollout is None else q.rollout
        drift = ((sampler - q.lp.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        loss_t = loss_t * ((q.A >= 0) | (drift <= o.off_policy_mask_threshold)).to(dtype)
    token_weight = m
    if o.top_entropy_quantile < 1.0:
        h = q.entropy.detach()
        # The cutoff is the quantile of the fp32 entropies whatever their dtype, as TRL forms it.
        cutoff = _masked_quantile(h.float(), m > 0, 1.0 - o.top_entropy_quantile)
        token_weight = m * (h >= cutoff.to(dtype)).to(dtype)  # no valid token: cutoff NaN, nothing kept
        loss_t = loss_t * token_weight
    if q.is_ratio is not None and spec.rollout == "multiply":
        loss_t = loss_t * q.is_ratio
    if o.beta > 0 or q.per_token_kl is not None or q.ref is not None:
        if q.per_token_kl is None:
            kl = kl_estimate(q.lp, q.ref, o.kl_estimator, clamp=o.kl_clamp)
        else:
            kl = q.per_token_kl
        if o.use_bias_correction_kl:
            kl = kl * q.ratio
        metrics["kl"] = _masked_mean(kl, m)
        if o.beta > 0:
            loss_t = loss_t + o.beta * kl
    return loss_t, token_weight


def _aggregate(loss_t: torch.Tensor, m: torch.Tensor, spec: LossType, o: _Options) -> torch.Tensor:
    """The loss from the per-token losses by the type's aggregation and normalizer (num_items: the global count of
    the aggregation's unit)."""
    B, L = m.shape
    if spec.aggregation == "tokens":
        count = m.sum() if o.num_items is None else o.num_items
        return (loss_t * m).sum() / torch.as_tensor(count, dtype=m.dtype, device=m.device).clamp(min=1.0)
    per_seq = (loss_t * m).sum(-1)
    if spec.normalizer == "length":
        per_seq = per_seq / m.sum(-1).clamp(min=1.0)
    elif spec.normalizer == "max_length":
        per_seq = per_seq / (L if o.max_completion_length is None else o.max_completion_length)
    n_seq = B if o.num_items is None else o.num_items
    return per_seq.sum() / torch.as_tensor(n_seq, dtype=m.dtype, device=m.device).clamp(min=1.0)


def grpo_loss(
    logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    old_logp: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    loss_type: str = "dapo",
    epsilon: float = 0.2,
    epsilon_high: float | None = None,
    delta: float | None = None,
    beta: float = 0.0,
    kl_estimator: str = "k3",
    kl_clamp: float | None = None,
    use_bias_correction_kl: bool = False,
    importance_sampling_level: str = "token",
    rollout_correction: str = "sequence_mask",
    rollout_clip_min: float | None = None,
    rollout_clip_max: float | None = 3.0,
    entropy: torch.Tensor | None = None,
    entropy_coef: float = 0.0,
    top_entropy_quantile: float = 1.0,
    off_policy_mask_threshold: float | None = None,
    num_items: int | torch.Tensor | None = None,
    max_completion_length: int | None = None,
    sapo_temperature_pos: float = 1.0,
    sapo_temperature_neg: float = 1.05,
    vespo_k_pos: float = 2.0,
    vespo_lambda_pos: float = 3.0,
    vespo_k_neg: float = 3.0,
    vespo_lambda_neg: float = 2.0,
    clip_cov_ratio: float = 2e-4,
    clip_cov_lb: float = 1.0,
    clip_cov_ub: float = 5.0,
    kl_cov_ratio: float = 2e-4,
    kl_cov_coef: float = 0.1,
    dppo_ratio_cap: float = 20.0,
    dro_beta: float | None = None,
    generator: torch.Generator | None = None,
    per_token_kl: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss from per-token log-probs; returns ``(loss, metrics)``.

    Inputs, ``[B, L]`` unless said: ``logp`` (policy, with gradient), ``advantages`` ``[B]`` or ``[B, L]``,
    ``mask`` (0 = padding / prompt), ``old_logp`` (absent: ``logp.detach()``, one iteration per batch),
    ``ref_logp`` (for ``beta > 0``), ``rollout_logp`` (the sampler's log-probs, for the correction below),
    ``entropy`` (for the bonus and the entropy mask). A packed batch (``B = 1``, ``position_ids`` restarting at 0 or
    ``cu_seqlens``: klops/_packed.py; ``advantages`` ``[S]`` or per token) gives the loss of the same sequences
    padded, one row each, to the longest.

    Ratio ``r = exp(logp - old_logp)`` per token, or per sequence ``exp(sum_t m (logp - old_logp) / max(1, |o|))``
    (``importance_sampling_level="sequence"``, for the types whose ratio trait is ``"either"``; ``gspo`` and
    ``gspo_token`` always take it). The per-token loss ``l`` of each ``loss_type`` (the list at the end; the
    traits in ``LOSS_TYPES``) reads ``epsilon`` / ``epsilon_high`` (the clip bounds; ``epsilon_high`` defaults to
    ``epsilon``; dppo's divergence thresholds), ``delta`` and its type's ``sapo_*``, ``vespo_*``, ``clip_cov_*``,
    ``kl_cov_*`` (token selection by ``generator``), ``dppo_ratio_cap`` (verl's ``clip_ratio_c``) or ``dro_beta``.

    Then, in TRL's order: times the off-policy sequence mask (``off_policy_mask_threshold``: keep a sequence
    when ``A >= 0`` or ``mean_t(log pi_sampler - log pi) <= threshold``, DeepSeek-V3.2), times the entropy
    mask (``top_entropy_quantile < 1``: only tokens whose entropy is at least the ``1 - q`` quantile of the
    valid tokens' entropies), times the rollout IS ratio ``pi_old / pi_rollout`` when ``rollout_logp`` is
    given (``rollout_correction`` token_/sequence_ truncate or mask, with ``rollout_clip_min/max``, as TRL's
    ``vllm_importance_sampling_*``; sequence modes sum the log-ratio; vespo and geo_mean take it inside),
    plus ``beta * kl_estimate(logp, ref_logp, kl_estimator, clamp=kl_clamp)`` (times ``r`` if
    ``use_bias_correction_kl``; ``per_token_kl`` replaces the estimate, e.g. the full-vocabulary KL of
    ``grpo_loss_from_logits``).

    Aggregation by the type's traits, ``m`` the mask: ``"tokens"``: ``sum m l / max(1, n_tok)``; ``"sequences"``:
    ``sum_i (sum_t m l / norm_i) / n_seq`` with ``norm_i = max(1, |o_i|)`` (``"length"``),
    ``max_completion_length`` (``"max_length"``, default ``L``) or 1 (``"none"``). ``n_seq = B`` and
    ``n_tok = sum m`` unless ``num_items`` (an int or 0-d tensor) gives the global count of the unit, so that
    micro-batch losses add up to the full-batch loss. The entropy bonus subtracts ``entropy_coef`` times the mean
    entropy of the kept tokens (valid and, with ``top_entropy_quantile < 1``, entropy-masked), whatever the loss
    type (TRL 1.16). The module docstring maps TRL's ``GRPOTrainer`` arguments and lists the differences.

    Metrics (0-d fp32, detached, token means over valid tokens): ``ratio``; ``clip_ratio/low``, ``/high``,
    ``/region`` (``r < 1 - epsilon`` with ``A < 0``, ``r > 1 + epsilon_high`` with ``A > 0``, for the ``"ppo"``
    types; cispo: ``clip_ratio/high`` = ``r > epsilon_high`` with ``A > 0``; geo_mean: clipped log-ratios by the
    sign of ``A``; dppo: the dropped tokens by the sign of ``A``, and ``clip_ratio/truncated``, the kept tokens
    with ``r > dppo_ratio_cap``); ``kl`` when a reference is given; ``entropy`` when given; ``is_ratio`` with
    ``rollout_logp``; ``phi`` for vespo; ``cov_fraction`` for clip_cov / kl_cov (the tokens taken out or
    penalized).

    Loss types:
    """
    per_token = dict(old_logp=old_logp, ref_logp=ref_logp, rollout_logp=rollout_logp, entropy=entropy,
                     per_token_kl=per_token_kl)  # fmt: skip
    packed = packing(position_ids, cu_seqlens, mask)
    if packed is not None:
        logp, advantages, mask, per_token = _unpacked(packed, logp, advantages, mask, per_token)
    _check_tensors(logp, advantages, mask, per_token)
    o = _Options(
        loss_type=loss_type, importance_sampling_level=importance_sampling_level, epsilon=epsilon,
        epsilon_high=epsilon if epsilon_high is None else epsilon_high, delta=delta, beta=beta,
        kl_estimator=kl_estimator, kl_clamp=kl_clamp, use_bias_correction_kl=use_bias_correction_kl,
        rollout_correction=rollout_correction, rollout_clip_min=rollout_clip_min, rollout_clip_max=rollout_clip_max,
        entropy_coef=entropy_coef, top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, num_items=num_items,
        max_completion_length=max_completion_length, sapo_temperature_pos=sapo_temperature_pos,
        sapo_temperature_neg=sapo_temperature_neg, vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos,
        vespo_k_neg=vespo_k_neg, vespo_lambda_neg=vespo_lambda_neg, clip_cov_ratio=clip_cov_ratio,
        clip_cov_lb=clip_cov_lb, clip_cov_ub=clip_cov_ub, kl_cov_ratio=kl_cov_ratio, kl_cov_coef=kl_cov_coef,
        dppo_ratio_cap=dppo_ratio_cap, dro_beta=dro_beta, generator=generator,
    )  # fmt: skip
    spec = _check_options(o, per_token)
    q = _quantities(logp, advantages, mask, per_token, spec, o)
    metrics = {"ratio": _masked_mean(q.ratio, q.m)}
    if q.is_ratio is not None:
        metrics["is_ratio"] = _masked_mean(q.is_ratio, q.m)
    loss_t, type_metrics = spec.per_token(q, o)
    metrics |= type_metrics
    loss_t, token_weight = _corrections(loss_t, q, spec, o, metrics)
    loss = _aggregate(loss_t, q.m, spec, o)
    if q.entropy is not None:
        metrics["entropy"] = _masked_mean(q.entropy, q.m)
        if o.entropy_coef != 0:  # TRL: the mean entropy of the kept tokens, whatever the loss's normalizer
            loss = loss - o.entropy_coef * (q.entropy * token_weight).sum() / token_weight.sum().clamp(min=1.0)
    return loss, metrics


def _unpacked(packed, logp, advantages, mask, per_token):
    """A packed row's per-token inputs [1, T] as the same sequences padded, [S, L_max]; advantages [S] as given."""
    for name, x in {"logp": logp, **per_token}.items():
        if x is not None and (not isinstance(x, torch.Tensor) or x.shape != mask.shape):
            raise ValueError(f"{name} must have the packed mask's shape {tuple(mask.shape)}, got "
                             f"{tuple(getattr(x, 'shape', ()))}")  # fmt: skip
    length = int(packed.lengths.max())  # the host sync that sizes the padded view

    def unpack(x):
        return None if x is None else packed.unpack(x, length)

    if isinstance(advantages, torch.Tensor) and advantages.shape == mask.shape:
        advantages = unpack(advantages)
    return unpack(logp), advantages, unpack(mask), {name: unpack(x) for name, x in per_token.items()}


def _describe_loss_types() -> str:
    """The list that ends grpo_loss's docstring: the loss types of each function, and its formula."""
    by_function: dict[Callable, list[str]] = {}
    for name, spec in LOSS_TYPES.items():
        by_function.setdefault(spec.per_token, []).append(name)
    items = []
    for function, names in by_function.items():
        formula = " ".join(function.__doc__.split("\n\n")[0].split())
        item = f"- {', '.join(names)}: {formula}"
        items.append(textwrap.fill(item, width=116, subsequent_indent="      ", break_on_hyphens=False))
    return "\n    ".join(items) + "\n"  # the docstring ends in "Loss types:\n    "


if grpo_loss.__doc__ is not None:  # None under python -OO
    grpo_loss.__doc__ += _describe_loss_types()


IGNORE = -100  # completion positions outside the mask are never read by the sweeps


def loss_from_sweeps(sweep, ref_sweep, full_kl, ids, advantages, mask, ref_logp, old_logp, kl_estimator, kwargs):
    """grpo_loss on the log-probs and entropy of ``sweep(labels)``, the reference log-probs of
    ``ref_sweep(labels)`` (no gradient; None without a reference model) or the full-vocabulary reverse KL
    ``full_kl(labels)``; labels are ``ids`` with the positions outside ``mask`` ignored."""
    labels = torch.where(mask != 0, ids, IGNORE)
    needs_entropy = kwargs.get("entropy_coef", 0.0) != 0 or kwargs.get("top_entropy_quantile", 1.0) < 1
    logp, entropy = sweep(labels)
    if not needs_entropy:
        entropy = entropy.detach()
    per_token_kl = None
    if kl_estimator == "full":
        if ref_sweep is None or ref_logp is not None:
            raise ValueError(
                'kl_estimator="full" needs the reference model (its logits or hidden states), not ref_logp'
            )
        if kwargs.get("beta", 0.0) > 0:
            per_token_kl = full_kl(labels)
        kl_estimator = "k3"  # not used: per_token_kl replaces the estimate
    elif ref_sweep is not None:
        if ref_logp is not None:
            raise ValueError("give the reference model or ref_logp, not both")
        with torch.no_grad():
            ref_logp = ref_sweep(labels)
    return grpo_loss(logp, advantages, mask, old_logp=old_logp, ref_logp=ref_logp, kl_estimator=kl_estimator,
                     entropy=entropy, per_token_kl=per_token_kl, **kwargs)  # fmt: skip


def grpo_loss_from_logits(
    logits: torch.Tensor,
    completion_ids: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    ref_logits: torch.Tensor | None = None,
    ref_logp: torch.Tensor | None = None,
    old_logp: torch.Tensor | None = None,
    temperature: float = 1.0,
    kl_estimator: str = "k3",
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
    vocab_start: int | None = None,
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_loss`` from the policy logits ``[B, L, V]`` of the completion tokens ``completion_ids [B, L]``.

    The log-probs and (when the loss or the metrics need it) the entropy of ``softmax(logits / T)`` come
    from one ``klops.logprobs`` sweep (nothing of size ``[B, L, V]`` besides the gradient), with gradients
    to ``logits`` through both. The reference is ``ref_logp`` or ``ref_logits`` (log-probs taken in the same
    sweep kind, no gradient). ``kl_estimator="full"`` uses the exact reverse KL(pi || pi_ref) over the
    whole vocabulary per token (``klops.fused_kl(kind="reverse")``, needs ``ref_logits``) instead of an
    estimate at the sampled token. Masked positions (``mask == 0``) are not read. Other arguments: as
    ``grpo_loss``.

    ``vocab_group`` / ``vocab_start``: the policy's (and reference's) logits sharded over the vocabulary
    (``[B, L, V_r]``, the same shards), as in ``klops.logprobs``; logits DTensors placed ``Shard(-1)`` need none.
    Every rank gets the same loss and metrics, and its shard's gradient (klops/vocab_parallel_rl.py).
    """
    if vocab_group is not None or vocab_start is not None or is_sharded(logits):
        return VOCAB_PARALLEL_FORMS["grpo_loss_from_logits"](
            logits, completion_ids, advantages, mask, ref_logits=ref_logits, ref_logp=ref_logp, old_logp=old_logp,
            temperature=temperature, kl_estimator=kl_estimator, backend=backend, vocab_group=vocab_group,
            vocab_start=vocab_start, **kwargs,
        )  # fmt: skip
    sample = dict(temperature=temperature, backend=backend)
    return loss_from_logits(logits, completion_ids, advantages, mask, ref_logits, ref_logp, old_logp, kl_estimator,
                            sample, kwargs)  # fmt: skip


def loss_from_logits(logits, completion_ids, advantages, mask, ref_logits, ref_logp, old_logp, kl_estimator, sample,
                     kwargs):  # fmt: skip
    """grpo_loss_from_logits's checks and sweeps; ``sample``: the keywords of its ``logprobs`` / ``fused_kl`` calls
    (the temperature and backend; in its vocabulary-parallel form also vocab_group and vocab_start)."""
    _inputs.check_logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, L, V], got {tuple(logits.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(logits.shape[:2])} (the rows of logits)")
    if ref_logits is not None:
        _inputs.check_logits("ref_logits", ref_logits)
        if ref_logits.shape[:-1] != logits.shape[:-1]:
            raise ValueError(f"ref_logits must have the rows of logits {tuple(logits.shape[:-1])}, got "
                             f"{tuple(ref_logits.shape[:-1])}")  # fmt: skip
    ids = _inputs.as_labels("completion_ids", completion_ids, "logits", logits)

    def sweep(labels):
        return logprobs(logits, labels, return_entropy=True, **sample)

    def ref_sweep(labels):
        return logprobs(ref_logits, labels, **sample)

    def full_kl(labels):
        return fused_kl(logits, ref_logits, "reverse", labels=labels, ignore_index=IGNORE, reduction="none", **sample)

    reference = ref_sweep if ref_logits is not None else None
    return loss_from_sweeps(sweep, reference, full_kl, ids, advantages, mask, ref_logp, old_logp, kl_estimator, kwargs)
