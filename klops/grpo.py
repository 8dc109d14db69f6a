"""RL policy losses on per-token log-probs: group advantages, KL estimators and the GRPO family (docs/losses.md §3).

``grpo_loss`` takes the per-token log-probs of the sampled completion tokens (``[B, L]``, with gradient:
``klops.logprobs`` computes them with the entropy in one sweep over the vocabulary) and returns the loss
and its metrics; ``grpo_loss_from_logits`` does both steps from the ``[B, L, V]`` logits. Everything here is
``[B, L]``-sized torch math in fp32 (in float64 for float64 inputs): nothing of size ``[B, L, V]``, no host
sync (metrics are 0-d tensors), and ``torch.compile(fullgraph=True)`` traces it.

Conventions follow TRL's ``GRPOTrainer._compute_loss`` (trl/trainer/grpo_trainer.py, TRL 1.16.0, which
tests/test_trl.py runs on the same tensors) and Liger-Kernel's ``chunked_loss/grpo_loss.py`` (commit ead96b6);
verl's ``core_algos.py`` (commit b178a3c) for ``gpg``. Where klops differs from them, the docstring of
``grpo_loss`` says so.
"""

import math
import numbers

import torch

from . import _inputs
from .divergence import fused_kl
from .linear import fused_linear_kl, fused_linear_logprobs
from .logprobs import logprobs

__all__ = ["group_advantages", "kl_estimate", "grpo_loss", "grpo_loss_from_logits", "fused_linear_grpo_loss"]

# Aggregation of each loss type: the unit num_items counts ("tokens" or "sequences").
LOSS_TYPES = {
    "grpo": "sequences", "bnpo": "tokens", "dr_grpo": "sequences", "dapo": "tokens", "cispo": "tokens",
    "sapo": "sequences", "luspo": "sequences", "vespo": "tokens", "gpg": "tokens", "geo_mean": "sequences",
    "clip_cov": "tokens", "kl_cov": "tokens",
}  # fmt: skip
PPO_CLIP_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
KL_ESTIMATORS = ("k1", "k2", "k3", "abs")
ROLLOUT_CORRECTIONS = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
SCALES = ("group", "batch", "none")
LOG_RATIO_CLAMP = 20.0  # |rho| <= 20 before exp (docs/losses.md §3)


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


def kl_estimate(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) at the sampled token, with ``rho = ref_logp - logp``:

    ``k1 = -rho``, ``k2 = rho^2 / 2``, ``k3 = exp(rho) - rho - 1`` (TRL's default; verl's ``low_var_kl``),
    ``abs = |rho|``. ``rho`` is clamped to [-20, 20] inside the ``exp`` (docs/losses.md §3), where TRL does not
    clamp. Gradients flow to ``logp`` only: ``dk3/dlogp = 1 - exp(rho)``. Same shape as ``logp``, fp32 (float64
    for float64 inputs).
    """
    _inputs.check_choice("estimator", estimator, KL_ESTIMATORS)
    if not isinstance(ref_logp, torch.Tensor) or ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp must have the shape of logp {tuple(logp.shape)}")
    dtype = _compute_dtype(logp)
    rho = ref_logp.detach().to(dtype) - logp.to(dtype)
    if estimator == "k1":
        return -rho
    if estimator == "k2":
        return 0.5 * rho.square()
    if estimator == "abs":
        return rho.abs()
    return torch.exp(rho.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)) - rho - 1.0


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """fp32, or float64 for float64 inputs."""
    return torch.promote_types(x.dtype, torch.float32)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(x weight) / max(1, sum(weight)) over broadcast [B, L] (x may be [B, 1]); detached, fp32."""
    x, weight = torch.broadcast_tensors(x.detach().float(), weight.float())
    return (x * weight).sum() / weight.sum().clamp(min=1.0)


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


def _vespo_weights(log_ratio, m, advantages, log_is, k_pos, lambda_pos, k_neg, lambda_neg) -> torch.Tensor:
    """VESPO's detached sequence weight phi = exp(lambda + k log w - lambda w), w the sequence's summed
    (clamped) log-ratio, plus the rollout IS log-ratio; (k, lambda) by the sign of A (A >= 0: pos)."""
    lower = math.log(1e-8)
    log_w = (log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * m).sum(-1, keepdim=True)
    if log_is is not None:
        log_w = log_w + log_is.clamp(lower, LOG_RATIO_CLAMP).sum(-1, keepdim=True)
    log_w = log_w.clamp(lower, LOG_RATIO_CLAMP)
    nonneg = advantages >= 0
    k = torch.where(nonneg, advantages.new_tensor(k_pos), advantages.new_tensor(k_neg))
    lam = torch.where(nonneg, advantages.new_tensor(lambda_pos), advantages.new_tensor(lambda_neg)).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


def _top_entries(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k (a 0-d tensor) highest-scoring eligible entries of score, ties to the first position: a
    boolean of score's shape, from a sort (no host sync, whatever k)."""
    flat = torch.where(eligible, score, -math.inf).flatten()
    order = flat.argsort(descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank.view(score.shape) < k) & eligible


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


def _batch_covariance(A: torch.Tensor, lp: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Per-token (A - mean A)(logp - mean logp), the means over the valid tokens of the batch (verl's
    Clip-Cov / KL-Cov); detached."""
    A = A.expand_as(lp)
    count = m.sum().clamp(min=1.0)
    mean_A = (A * m).sum() / count
    mean_lp = (lp.detach() * m).sum() / count
    return (A - mean_A) * (lp.detach() - mean_lp)


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
    generator: torch.Generator | None = None,
    per_token_kl: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO-family policy loss from per-token log-probs; returns ``(loss, metrics)``.

    Inputs, ``[B, L]`` unless said: ``logp`` (policy, with gradient), ``advantages`` ``[B]`` or ``[B, L]``,
    ``mask`` (0 = padding / prompt), ``old_logp`` (absent: ``logp.detach()``, one iteration per batch),
    ``ref_logp`` (for ``beta > 0``), ``rollout_logp`` (the sampler's log-probs, for the correction below),
    ``entropy`` (for the bonus and the entropy mask).

    Ratio ``r = exp(logp - old_logp)`` per token, or per sequence (GSPO,
    ``importance_sampling_level="sequence"``) ``exp(sum_t m (logp - old_logp) / max(1, |o|))``.
    Per-token loss ``l`` by ``loss_type``:

    - grpo, bnpo, dr_grpo, dapo, luspo: ``-min(min(r, delta) A, clip(r, 1 - epsilon, 1 + epsilon_high) A)``
      (``epsilon_high`` defaults to ``epsilon``; ``delta`` unset: no cap). A tie between the branches counts
      as unclipped: it takes the unclipped branch's gradient (Liger's convention; ``torch.min`` would
      halve it).
    - cispo: ``-sg(min(r, epsilon_high)) A logp`` (TRL / Liger: ``epsilon_high`` is the cap itself; MiniMax
      uses 5.0).
    - sapo: ``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau = sapo_temperature_pos`` if ``A > 0`` else ``_neg``.
    - vespo: ``-phi A logp``, ``phi = exp(lambda + k log w - lambda w)`` detached, ``w`` the sequence's
      summed log-ratio (times the rollout IS ratio), ``(k, lambda)`` by ``A >= 0``.
    - gpg (verl): ``-A logp``.
    - geo_mean (verl's GMPO): per sequence ``-mean_t(A) exp(mean_t d)``, ``d = log r`` clipped in log space to
      ``[-epsilon, epsilon_high]`` on the side the advantage's sign selects (``s min(s d, s clip(d))``,
      ``s = sign A``); the rollout IS ratio enters as its geometric mean over the sequence.
    - clip_cov (verl): the PPO clip loss, with ``max(1, floor(clip_cov_ratio n_tok))`` tokens drawn at random
      (``generator``) among the unclipped ones whose batch covariance ``(A - mean A)(logp - mean logp)`` lies in
      ``(clip_cov_lb, clip_cov_ub)`` taken out of the loss.
    - kl_cov (verl): ``-r A``, plus ``kl_cov_coef |logp - old_logp|`` on the ``max(1, floor(kl_cov_ratio n_tok))``
      tokens of largest covariance. Both select with a sort, without verl's host syncs.

    Then, in TRL's order: times the off-policy sequence mask (``off_policy_mask_threshold``: keep a sequence
    when ``A >= 0`` or ``mean_t(log pi_sampler - log pi) <= threshold``, DeepSeek-V3.2), times the entropy
    mask (``top_entropy_quantile < 1``: only tokens whose entropy is at least the ``1 - q`` quantile of the
    valid tokens' entropies), times the rollout IS ratio ``pi_old / pi_rollout`` when ``rollout_logp`` is
    given (``rollout_correction`` token_/sequence_ truncate or mask, with ``rollout_clip_min/max``, as TRL's
    ``vllm_importance_sampling_*``; sequence modes sum the log-ratio; not for vespo, which takes it in
    ``w``), plus ``beta * kl_estimate(logp, ref_logp, kl_estimator)`` (times ``r`` if
    ``use_bias_correction_kl``; ``per_token_kl`` replaces the estimate, e.g. the full-vocabulary KL of
    ``grpo_loss_from_logits``). Aggregation, ``m`` the mask:

    - grpo, sapo, geo_mean: ``sum_i (sum_t m l / max(1, |o_i|)) / n_seq``;  luspo: ``sum_i sum_t m l / n_seq``;
    - dr_grpo: ``sum m l / (n_seq * max_completion_length)`` (default: ``L``);
    - bnpo: ``sum m l / max(1, n_tok)``;  dapo, cispo, vespo, gpg, clip_cov, kl_cov: ``sum m l / n_tok``;

    ``n_seq = B`` and ``n_tok = sum m`` unless ``num_items`` (an int or 0-d tensor) gives the global count of
    the type's unit (sequences or tokens; ``LOSS_TYPES``), so that micro-batch losses add up to the
    full-batch loss. The entropy bonus subtracts ``entropy_coef`` times the mean entropy of the kept tokens
    (valid and, with ``top_entropy_quantile < 1``, entropy-masked), whatever the loss type (TRL 1.16).

    Mapping from TRL's ``GRPOTrainer`` (one process; tests/test_trl.py checks it): ``epsilon`` is its
    ``epsilon`` (``epsilon_low``), ``mask`` its ``completion_mask * tool_mask``, ``rollout_logp`` its
    ``sampling_per_token_logps`` with ``rollout_correction = vllm_importance_sampling_mode``. TRL divides the
    loss of grpo, bnpo, dr_grpo, sapo and luspo, and the entropy bonus, by the gradient-accumulation steps
    ``G`` in training; here that is ``num_items = B G`` (grpo, dr_grpo, sapo, luspo), ``num_items = G sum m``
    (bnpo) and ``entropy_coef / G``. For dapo, cispo and vespo ``num_items`` is TRL's
    ``num_items_in_batch G / steps_per_generation`` (``num_items_in_batch`` in eval).

    Differences from TRL: the log-ratios are clamped to [-20, 20] inside every exp; TRL's default is
    ``use_bias_correction_kl=True``, klops's ``False`` (the plain k3 term); clip metrics are taken before
    ``delta`` (as Liger) and token-weighted at sequence level (TRL averages sequences); vespo, gpg,
    geo_mean, clip_cov and kl_cov reject sequence-level ratios (their ratio is per sequence already, or
    none, or verl defines them per token; TRL's sequence-level vespo differs from its token-level one only
    in the bias-corrected KL). The sequence-level cispo / sapo that Liger rejects are computed as TRL does.
    A tie between the clipped and unclipped branches (a ratio exactly on a clip bound) takes the whole
    unclipped gradient, where TRL's ``torch.min`` splits it.

    Metrics (0-d fp32, detached, token means over valid tokens): ``ratio``; ``clip_ratio/low``, ``/high``,
    ``/region`` (``r < 1 - epsilon`` with ``A < 0``, ``r > 1 + epsilon_high`` with ``A > 0``, for the clipped
    types; cispo: ``clip_ratio/high`` = ``r > epsilon_high`` with ``A > 0``); ``kl`` when ``beta > 0``;
    ``entropy`` when given; ``is_ratio`` with ``rollout_logp``; ``phi`` for vespo; geo_mean's ``clip_ratio/low``
    and ``/high`` count clipped log-ratios with ``A < 0`` and ``A > 0`` (verl); ``cov_fraction`` for clip_cov /
    kl_cov (the tokens taken out or penalized).
    """
    if not isinstance(logp, torch.Tensor) or logp.dim() != 2 or not logp.dtype.is_floating_point:
        raise TypeError(f"logp must be a float tensor [B, L], got {getattr(logp, 'shape', type(logp))}")
    shape, device = logp.shape, logp.device
    _inputs.check_choice("loss_type", loss_type, tuple(LOSS_TYPES))
    _inputs.check_choice("importance_sampling_level", importance_sampling_level, ("token", "sequence"))
    _inputs.check_choice("kl_estimator", kl_estimator, KL_ESTIMATORS)
    _inputs.check_choice("rollout_correction", rollout_correction, ROLLOUT_CORRECTIONS)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(shape):
        raise ValueError(f"mask must be a tensor of the shape of logp {tuple(shape)}")
    if not isinstance(advantages, torch.Tensor) or tuple(advantages.shape) not in (tuple(shape), (shape[0],)):
        got = tuple(advantages.shape) if isinstance(advantages, torch.Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must have shape ({shape[0]},) or {tuple(shape)}, got {got}")
    for name, x in (("mask", mask), ("advantages", advantages)):
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but logp is on {device}")
    per_token = {"old_logp": old_logp, "ref_logp": ref_logp, "rollout_logp": rollout_logp, "entropy": entropy,
                 "per_token_kl": per_token_kl}  # fmt: skip
    for name, x in per_token.items():
        _check_per_token(name, x, shape, device)
    epsilon = _inputs.check_real("epsilon", epsilon, low=0.0, high=math.inf, open_low=True)
    epsilon_high = epsilon if epsilon_high is None else epsilon_high
    epsilon_high = _inputs.check_real("epsilon_high", epsilon_high, low=0.0, high=math.inf, open_low=True)
    if delta is not None:
        delta = _inputs.check_real("delta", delta, low=0.0, high=math.inf, open_low=True)
        if loss_type not in PPO_CLIP_TYPES:
            raise ValueError(f"delta (two-sided clipping) applies to {', '.join(PPO_CLIP_TYPES)}, not {loss_type!r}")
    beta = _inputs.check_real("beta", beta, low=0.0, high=math.inf)
    if beta > 0 and ref_logp is None and per_token_kl is None:
        raise ValueError("beta > 0 needs ref_logp (the reference model's log-probs of the same tokens)")
    entropy_coef = _inputs.check_real("entropy_coef", entropy_coef, low=-math.inf, high=math.inf, open_low=True)
    top_entropy_quantile = _inputs.check_real("top_entropy_quantile", top_entropy_quantile, low=0.0, high=1.0)
    if (entropy_coef != 0 or top_entropy_quantile < 1) and entropy is None:
        raise ValueError("entropy_coef != 0 and top_entropy_quantile < 1 need entropy (klops.logprobs returns it)")
    if loss_type == "vespo" and rollout_logp is not None and rollout_correction.startswith("sequence"):
        raise ValueError("loss_type='vespo' takes a token-level rollout_correction (its weight sums the log-ratios)")
    if importance_sampling_level == "sequence" and loss_type in ("vespo", "gpg", "geo_mean", "clip_cov", "kl_cov"):
        raise ValueError(
            f"loss_type={loss_type!r} takes no sequence-level ratio; use importance_sampling_level='token'"
        )
    if rollout_logp is not None and rollout_correction.endswith("truncate"):
        if rollout_clip_min is None and rollout_clip_max is None:
            raise ValueError(f"rollout_correction={rollout_correction!r} needs rollout_clip_min or rollout_clip_max")
    for name, value in (("rollout_clip_min", rollout_clip_min), ("rollout_clip_max", rollout_clip_max)):
        if value is not None:
            _inputs.check_real(name, value, low=0.0, high=math.inf)
    if rollout_clip_min is not None and rollout_clip_max is not None and rollout_clip_min >= rollout_clip_max:
        raise ValueError(f"rollout_clip_min={rollout_clip_min} must be below rollout_clip_max={rollout_clip_max}")
    for name, value in (("sapo_temperature_pos", sapo_temperature_pos), ("sapo_temperature_neg", sapo_temperature_neg)):
        _inputs.check_real(name, value, low=0.0, high=math.inf, open_low=True)
    if off_policy_mask_threshold is not None:
        off_policy_mask_threshold = _inputs.check_real(
            "off_policy_mask_threshold", off_policy_mask_threshold, low=-math.inf, high=math.inf, open_low=True
        )
    _inputs.check_num_items(num_items)
    if max_completion_length is not None and (
        isinstance(max_completion_length, bool) or not isinstance(max_completion_length, numbers.Integral)
        or max_completion_length < 1
    ):  # fmt: skip
        raise ValueError(f"max_completion_length must be a positive int, got {max_completion_length!r}")

    dtype = _compute_dtype(logp)
    m = (mask != 0).to(dtype)
    A = advantages.to(dtype)[:, None] if advantages.dim() == 1 else advantages.to(dtype)
    lp = logp.to(dtype)
    old = lp.detach() if old_logp is None else old_logp.to(dtype)
    log_ratio = lp - old
    if importance_sampling_level == "sequence":
        log_w = (log_ratio * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
    else:
        log_w = log_ratio
    ratio = torch.exp(log_w.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    metrics = {"ratio": _masked_mean(ratio, m)}

    is_ratio = None
    if rollout_logp is not None:
        is_ratio = _rollout_ratio(old.detach(), rollout_logp, m, rollout_correction, rollout_clip_min, rollout_clip_max)
        metrics["is_ratio"] = _masked_mean(is_ratio, m)

    if loss_type in PPO_CLIP_TYPES:
        clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high) * A
        unclipped = (ratio if delta is None else ratio.clamp(max=delta)) * A
        loss_t = -torch.where(unclipped <= clipped, unclipped, clipped)
        low = (ratio < 1 - epsilon) & (A < 0)
        high = (ratio > 1 + epsilon_high) & (A > 0)
        metrics |= {"clip_ratio/low": _masked_mean(low, m), "clip_ratio/high": _masked_mean(high, m),
                    "clip_ratio/region": _masked_mean(low | high, m)}  # fmt: skip
    elif loss_type == "cispo":
        loss_t = -ratio.clamp(max=epsilon_high).detach() * A * lp
        metrics["clip_ratio/high"] = _masked_mean((ratio > epsilon_high) & (A > 0), m)
    elif loss_type == "sapo":
        tau = torch.where(A > 0, A.new_tensor(sapo_temperature_pos), A.new_tensor(sapo_temperature_neg))
        loss_t = -torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A
    elif loss_type == "vespo":
        log_is = None if is_ratio is None else is_ratio.clamp(min=1e-30).log()
        phi = _vespo_weights(log_ratio, m, A, log_is, vespo_k_pos, vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg)
        loss_t = -phi * A * lp
        metrics["phi"] = _masked_mean(phi, m)
    elif loss_type == "geo_mean":
        sign = torch.sign(A)
        d = log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
        d_clipped = sign * torch.minimum(sign * d, sign * d.clamp(-epsilon, epsilon_high))
        n_i = m.sum(-1, keepdim=True).clamp(min=1.0)
        log_seq = (d_clipped * m).sum(-1, keepdim=True) / n_i
        if is_ratio is not None:  # verl: the geometric mean of the IS weights over the sequence
            log_seq = log_seq + (is_ratio.clamp(min=1e-10).log().expand_as(m) * m).sum(-1, keepdim=True) / n_i
        loss_t = -((A.expand_as(m) * m).sum(-1, keepdim=True) / n_i) * torch.exp(log_seq)
        clipped = d != d.clamp(-epsilon, epsilon_high)
        metrics |= {"clip_ratio/low": _masked_mean(clipped & (A < 0), m),
                    "clip_ratio/high": _masked_mean(clipped & (A > 0), m)}  # fmt: skip
    elif loss_type == "clip_cov":
        clipped = ratio.clamp(1 - epsilon, 1 + epsilon_high) * A
        unclipped = ratio * A
        cov = _batch_covariance(A, lp, m)
        eligible = (m > 0) & ~(clipped < unclipped) & (cov > clip_cov_lb) & (cov < clip_cov_ub)
        k = (clip_cov_ratio * m.sum()).floor().clamp(min=1.0)
        priority = torch.rand(m.shape, generator=generator, device=device)
        dropped = _top_entries(priority, eligible, k)
        loss_t = -torch.where(unclipped <= clipped, unclipped, clipped) * (~dropped).to(dtype)
        metrics["cov_fraction"] = _masked_mean(dropped, m)
    elif loss_type == "kl_cov":
        k = (kl_cov_ratio * m.sum()).floor().clamp(min=1.0)
        penalized = _top_entries(_batch_covariance(A, lp, m), m > 0, k)
        loss_t = -ratio * A + kl_cov_coef * penalized.to(dtype) * (lp - old).abs()
        metrics["cov_fraction"] = _masked_mean(penalized, m)
    else:  # gpg
        loss_t = -A * lp

    if off_policy_mask_threshold is not None:
        sampler = old if rollout_logp is None else rollout_logp.to(dtype)
        drift = ((sampler - lp.detach()) * m).sum(-1, keepdim=True) / m.sum(-1, keepdim=True).clamp(min=1.0)
        loss_t = loss_t * ((A >= 0) | (drift <= off_policy_mask_threshold)).to(dtype)
    token_weight = m
    if top_entropy_quantile < 1.0:
        h = entropy.detach().to(dtype)
        # The cutoff is the quantile of the fp32 entropies whatever their dtype, as TRL forms it.
        cutoff = _masked_quantile(h.float(), m > 0, 1.0 - top_entropy_quantile)
        token_weight = m * (h >= cutoff.to(dtype)).to(dtype)  # no valid token: cutoff NaN, nothing kept
        loss_t = loss_t * token_weight
    if is_ratio is not None and loss_type not in ("vespo", "geo_mean"):
        loss_t = loss_t * is_ratio
    if beta > 0 or per_token_kl is not None or ref_logp is not None:
        kl = kl_estimate(lp, ref_logp, kl_estimator) if per_token_kl is None else per_token_kl.to(dtype)
        if use_bias_correction_kl:
            kl = kl * ratio
        metrics["kl"] = _masked_mean(kl, m)
        if beta > 0:
            loss_t = loss_t + beta * kl

    unit = LOSS_TYPES[loss_type]
    B, L = shape
    if unit == "tokens":
        count = m.sum() if num_items is None else num_items
        denominator = torch.as_tensor(count, dtype=dtype, device=device).clamp(min=1.0)
        loss = (loss_t * m).sum() / denominator
    else:
        n_seq = B if num_items is None else num_items
        per_seq = (loss_t * m).sum(-1)
        if loss_type in ("grpo", "sapo", "geo_mean"):
            per_seq = per_seq / m.sum(-1).clamp(min=1.0)
        elif loss_type == "dr_grpo":
            per_seq = per_seq / (L if max_completion_length is None else max_completion_length)
        loss = per_seq.sum() / torch.as_tensor(n_seq, dtype=dtype, device=device).clamp(min=1.0)

    if entropy is not None:
        h = entropy.to(dtype)
        metrics["entropy"] = _masked_mean(h, m)
        if entropy_coef != 0:  # TRL: the mean entropy of the kept tokens, whatever the loss's normalizer
            loss = loss - entropy_coef * (h * token_weight).sum() / token_weight.sum().clamp(min=1.0)
    return loss, metrics


IGNORE = -100  # completion positions outside the mask are never read by the sweeps


def _loss_from_sweeps(sweep, ref_sweep, full_kl, ids, advantages, mask, ref_logp, old_logp, kl_estimator, kwargs):
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
    """
    _inputs.check_logits("logits", logits)
    if logits.dim() != 3:
        raise ValueError(f"logits must have shape [B, L, V], got {tuple(logits.shape)}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(logits.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(logits.shape[:2])} (the rows of logits)")
    ids = _inputs.as_labels("completion_ids", completion_ids, "logits", logits)
    sample = dict(temperature=temperature, backend=backend)

    def sweep(labels):
        return logprobs(logits, labels, return_entropy=True, **sample)

    def ref_sweep(labels):
        return logprobs(ref_logits, labels, **sample)

    def full_kl(labels):
        return fused_kl(logits, ref_logits, "reverse", labels=labels, ignore_index=IGNORE, reduction="none", **sample)

    reference = ref_sweep if ref_logits is not None else None
    return _loss_from_sweeps(sweep, reference, full_kl, ids, advantages, mask, ref_logp, old_logp, kl_estimator, kwargs)


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
    kl_estimator: str = "k3",
    backend: str = "auto",
    **kwargs,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``grpo_loss`` from the policy's last hidden states ``[B, L, D]`` and LM head ``weight [V, D]`` (and
    ``bias``): the log-probs and entropy come from one ``klops.fused_linear_logprobs`` pass, so the
    ``[B, L, V]`` logits are never formed, with gradients to ``hidden``, ``weight`` and ``bias``. The reference
    is ``ref_logp`` or the reference model's ``ref_hidden`` / ``ref_weight`` / ``ref_bias`` (no gradient);
    ``kl_estimator="full"`` takes the exact per-token reverse KL over the vocabulary from
    ``klops.fused_linear_kl``. ``softcap`` applies to both models' logits. Other arguments: as ``grpo_loss``.
    """
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"hidden must have shape [B, L, D], got {getattr(hidden, 'shape', type(hidden))}")
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"mask must have shape {tuple(hidden.shape[:2])} (the rows of hidden)")
    if (ref_hidden is None) != (ref_weight is None):
        raise ValueError("the reference model needs both ref_hidden and ref_weight")
    ids = _inputs.as_labels("completion_ids", completion_ids, "hidden", hidden)
    sample = dict(temperature=temperature, softcap=softcap, backend=backend)

    def sweep(labels):
        return fused_linear_logprobs(hidden, weight, labels, bias=bias, return_entropy=True, **sample)

    def ref_sweep(labels):
        return fused_linear_logprobs(ref_hidden, ref_weight, labels, bias=ref_bias, **sample)

    def full_kl(labels):
        biases = dict(student_bias=bias, teacher_bias=ref_bias)
        return fused_linear_kl(hidden, weight, ref_hidden, ref_weight, kind="reverse", labels=labels,
                               ignore_index=IGNORE, reduction="none", **biases, **sample)  # fmt: skip

    reference = ref_sweep if ref_hidden is not None else None
    return _loss_from_sweeps(sweep, reference, full_kl, ids, advantages, mask, ref_logp, old_logp, kl_estimator, kwargs)
