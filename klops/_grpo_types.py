"""The GRPO loss types (docs/losses.md §3): the quantities and options every type reads, one function per type
giving its per-token loss and metrics, and the table ``LOSS_TYPES`` of each type's traits. ``grpo_loss`` in
klops/grpo.py checks its inputs, forms the quantities, and calls the type's function from this table."""

import dataclasses
import math
from collections.abc import Callable

import torch

LOG_RATIO_CLAMP = 20.0  # |rho| <= 20 before exp (docs/losses.md §3)


def _masked_mean(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """sum(x weight) / max(1, sum(weight)) over broadcast [B, L] (x may be [B, 1]); detached, fp32."""
    x, weight = torch.broadcast_tensors(x.detach().float(), weight.float())
    return (x * weight).sum() / weight.sum().clamp(min=1.0)


def _top_entries(score: torch.Tensor, eligible: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """The k (a 0-d tensor) highest-scoring eligible entries of score, ties to the first position: a
    boolean of score's shape, from a sort (no host sync, whatever k)."""
    flat = torch.where(eligible, score, -math.inf).flatten()
    order = flat.argsort(descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=order.device))
    return (rank.view(score.shape) < k) & eligible


# ---------------------------------------------------------------------------------------------------------------
# What every loss type's function reads: the shared [B, L] quantities and the scalar options.


@dataclasses.dataclass
class _Quantities:
    """Tensors in the compute dtype; ratio and is_ratio are [B, 1] at sequence level; None when not given."""

    lp: torch.Tensor  # logp, with gradient
    old: torch.Tensor  # old_logp (logp.detach() when absent)
    log_ratio: torch.Tensor  # lp - old, per token
    ratio: torch.Tensor  # exp(clamp(log w)), w the token or sequence ratio (with gradient)
    A: torch.Tensor  # advantages, [B, 1] or [B, L]
    m: torch.Tensor  # the mask as 0 / 1
    is_ratio: torch.Tensor | None  # the rollout correction pi_old / pi_rollout (detached)
    rollout: torch.Tensor | None
    ref: torch.Tensor | None
    entropy: torch.Tensor | None  # with gradient (the bonus); detach it for masks
    per_token_kl: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class _Options:
    """grpo_loss's scalar arguments, under their names (epsilon_high resolved)."""

    loss_type: str
    importance_sampling_level: str
    epsilon: float
    epsilon_high: float
    delta: float | None
    beta: float
    kl_estimator: str
    kl_clamp: float | None
    use_bias_correction_kl: bool
    rollout_correction: str
    rollout_clip_min: float | None
    rollout_clip_max: float | None
    entropy_coef: float
    top_entropy_quantile: float
    off_policy_mask_threshold: float | None
    num_items: int | torch.Tensor | None
    max_completion_length: int | None
    sapo_temperature_pos: float
    sapo_temperature_neg: float
    vespo_k_pos: float
    vespo_lambda_pos: float
    vespo_k_neg: float
    vespo_lambda_neg: float
    clip_cov_ratio: float
    clip_cov_lb: float
    clip_cov_ub: float
    kl_cov_ratio: float
    kl_cov_coef: float
    dppo_ratio_cap: float
    dro_beta: float | None
    generator: torch.Generator | None


Metrics = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# One function per loss type: the per-token loss l ([B, L], or [B, 1] for a per-sequence value) and the type's
# metrics. The first paragraph of each docstring is the formula grpo_loss's docstring lists.


def _clip_metrics(low: torch.Tensor, high: torch.Tensor, m: torch.Tensor) -> Metrics:
    return {"clip_ratio/low": _masked_mean(low, m), "clip_ratio/high": _masked_mean(high, m),
            "clip_ratio/region": _masked_mean(low | high, m)}  # fmt: skip


def _ppo_clip(q: _Quantities, o: _Options, ratio: torch.Tensor | None = None) -> tuple[torch.Tensor, Metrics]:
    """``-min(min(r, delta) A, clip(r, 1 - epsilon, 1 + epsilon_high) A)`` (``delta`` unset: no cap); a tie counts
    as unclipped and takes the unclipped branch's gradient (Liger's convention; ``torch.min`` would halve it)."""
    r = q.ratio if ratio is None else ratio
    clipped = r.clamp(1 - o.epsilon, 1 + o.epsilon_high) * q.A
    unclipped = (r if o.delta is None else r.clamp(max=o.delta)) * q.A
    loss = -torch.where(unclipped <= clipped, unclipped, clipped)
    low = (r < 1 - o.epsilon) & (q.A < 0)
    high = (r > 1 + o.epsilon_high) & (q.A > 0)
    return loss, _clip_metrics(low, high, q.m)


def _gspo_token(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """GSPO-token (verl's ``gspo``): the clipped loss of ``s_t = sg(s) pi_t / sg(pi_t)``, ``s`` the sequence
    ratio: the value of ``gspo``, each token's gradient from its own advantage."""
    return _ppo_clip(q, o, q.ratio.detach() * torch.exp(q.lp - q.lp.detach()))


def _cispo(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """``-sg(min(r, epsilon_high)) A logp`` (TRL / Liger: ``epsilon_high`` is the cap itself; MiniMax uses 5.0)."""
    loss = -q.ratio.clamp(max=o.epsilon_high).detach() * q.A * q.lp
    return loss, {"clip_ratio/high": _masked_mean((q.ratio > o.epsilon_high) & (q.A > 0), q.m)}


def _sapo(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """``-sigmoid(tau (r - 1)) 4 / tau A``, ``tau = sapo_temperature_pos`` if ``A > 0`` else ``_neg``."""
    A = q.A
    tau = torch.where(A > 0, A.new_tensor(o.sapo_temperature_pos), A.new_tensor(o.sapo_temperature_neg))
    return -torch.sigmoid(tau * (q.ratio - 1)) * 4 / tau * A, {}


def _vespo(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """``-phi A logp``, ``phi = exp(lambda + k log w - lambda w)`` detached, ``w`` the sequence's summed
    log-ratio (times the rollout IS ratio), ``(k, lambda)`` the ``vespo_*_pos`` pair if ``A >= 0``."""
    lower = math.log(1e-8)
    log_w = (q.log_ratio.detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP) * q.m).sum(-1, keepdim=True)
    if q.is_ratio is not None:
        log_w = log_w + q.is_ratio.clamp(min=1e-30).log().clamp(lower, LOG_RATIO_CLAMP).sum(-1, keepdim=True)
    log_w = log_w.clamp(lower, LOG_RATIO_CLAMP)
    A, nonneg = q.A, q.A >= 0
    k = torch.where(nonneg, A.new_tensor(o.vespo_k_pos), A.new_tensor(o.vespo_k_neg))
    lam = torch.where(nonneg, A.new_tensor(o.vespo_lambda_pos), A.new_tensor(o.vespo_lambda_neg)).clamp(min=1e-4)
    phi = torch.exp(lam + k * log_w - lam * log_w.exp()).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)
    return -phi * A * q.lp, {"phi": _masked_mean(phi, q.m)}


def _gpg(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """``-A logp`` (verl)."""
    return -q.A * q.lp, {}


def _geo_mean(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """GMPO (verl): per sequence ``-mean_t(A) exp(mean_t d)``, ``d = log r`` clipped in log space to
    ``[-epsilon, epsilon_high]`` on the side the advantage's sign selects (``s min(s d, s clip(d))``,
    ``s = sign A``); the rollout IS ratio enters as its geometric mean over the sequence."""
    A, m = q.A, q.m
    sign = torch.sign(A)
    d = q.log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    d_clipped = sign * torch.minimum(sign * d, sign * d.clamp(-o.epsilon, o.epsilon_high))
    n_i = m.sum(-1, keepdim=True).clamp(min=1.0)
    log_seq = (d_clipped * m).sum(-1, keepdim=True) / n_i
    if q.is_ratio is not None:  # verl: the geometric mean of the IS weights over the sequence
        log_seq = log_seq + (q.is_ratio.clamp(min=1e-10).log().expand_as(m) * m).sum(-1, keepdim=True) / n_i
    loss = -((A.expand_as(m) * m).sum(-1, keepdim=True) / n_i) * torch.exp(log_seq)
    clipped = d != d.clamp(-o.epsilon, o.epsilon_high)
    return loss, {"clip_ratio/low": _masked_mean(clipped & (A < 0), m),
                  "clip_ratio/high": _masked_mean(clipped & (A > 0), m)}  # fmt: skip


def _batch_covariance(q: _Quantities) -> torch.Tensor:
    """Per-token (A - mean A)(logp - mean logp), the means over the valid tokens of the batch (verl's
    Clip-Cov / KL-Cov); detached."""
    lp, m = q.lp.detach(), q.m
    A = q.A.expand_as(lp)
    count = m.sum().clamp(min=1.0)
    return (A - (A * m).sum() / count) * (lp - (lp * m).sum() / count)


def _clip_cov(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """Clip-Cov (verl): the clipped loss (without ``delta``), with ``max(1, floor(clip_cov_ratio n_tok))`` tokens
    drawn at random (``generator``) among the unclipped ones whose batch covariance ``(A - mean A)(logp - mean
    logp)`` lies in ``(clip_cov_lb, clip_cov_ub)`` taken out of the loss."""
    clipped = q.ratio.clamp(1 - o.epsilon, 1 + o.epsilon_high) * q.A
    unclipped = q.ratio * q.A
    cov = _batch_covariance(q)
    eligible = (q.m > 0) & ~(clipped < unclipped) & (cov > o.clip_cov_lb) & (cov < o.clip_cov_ub)
    k = (o.clip_cov_ratio * q.m.sum()).floor().clamp(min=1.0)
    dropped = _top_entries(torch.rand(q.m.shape, generator=o.generator, device=q.m.device), eligible, k)
    loss = -torch.where(unclipped <= clipped, unclipped, clipped) * (~dropped).to(q.m.dtype)
    return loss, {"cov_fraction": _masked_mean(dropped, q.m)}


def _kl_cov(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """KL-Cov (verl): ``-r A``, plus ``kl_cov_coef |logp - old_logp|`` on the ``max(1, floor(kl_cov_ratio
    n_tok))`` tokens of largest batch covariance."""
    k = (o.kl_cov_ratio * q.m.sum()).floor().clamp(min=1.0)
    penalized = _top_entries(_batch_covariance(q), q.m > 0, k)
    loss = -q.ratio * q.A + o.kl_cov_coef * penalized.to(q.m.dtype) * q.log_ratio.abs()
    return loss, {"cov_fraction": _masked_mean(penalized, q.m)}


def _dppo(q: _Quantities, o: _Options, keep_pos: torch.Tensor, keep_neg: torch.Tensor) -> tuple[torch.Tensor, Metrics]:
    """DPPO's ``-A sg(min(r, dppo_ratio_cap)) logp`` on the kept tokens: ``keep_pos`` where ``A > 0``, else
    ``keep_neg``; metrics count the dropped tokens by the sign of ``A`` and the kept ones whose ratio is capped."""
    A, m = q.A, q.m
    keep = torch.where(A > 0, keep_pos, keep_neg)
    loss = -A * q.ratio.clamp(max=o.dppo_ratio_cap).detach() * q.lp * keep.to(m.dtype)
    metrics = _clip_metrics(~keep & (A < 0), ~keep & (A > 0), m)
    return loss, metrics | {"clip_ratio/truncated": _masked_mean(keep & (q.ratio > o.dppo_ratio_cap), m)}


def _dppo_tv(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """DPPO-Binary-TV (verl): ``-A sg(min(r, dppo_ratio_cap)) logp``, dropping the tokens whose probability moved
    past the threshold on the advantage's side: ``pi - pi_old > epsilon_high`` (``A > 0``), ``< -epsilon``
    (``A <= 0``)."""
    shift = q.lp.detach().exp() - q.old.exp()
    return _dppo(q, o, shift <= o.epsilon_high, shift >= -o.epsilon)


def _dppo_kl(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """DPPO-Binary-KL (verl): as dppo_tv, dropping the tokens whose probability moved on the advantage's side
    with ``KL(Bern(pi_old) || Bern(pi))`` above ``epsilon_high`` (``A > 0``) or ``epsilon`` (``A <= 0``)."""
    lp, old = q.lp.detach(), q.old
    p, p_old = lp.exp(), old.exp()
    binary_kl = p_old * (old - lp) + (1 - p_old) * torch.log((1 - p_old + 1e-8) / (1 - p + 1e-8))  # verl's 1e-8
    return _dppo(q, o, (binary_kl <= o.epsilon_high) | (p <= p_old), (binary_kl <= o.epsilon) | (p >= p_old))


def _dro(q: _Quantities, o: _Options) -> tuple[torch.Tensor, Metrics]:
    """DRO (verl): ``-(A logp - dro_beta / 2 (logp - old_logp)^2)``."""
    return -(q.A * q.lp - 0.5 * o.dro_beta * q.log_ratio.square()), {}


# ---------------------------------------------------------------------------------------------------------------
# The table of loss types.


@dataclasses.dataclass(frozen=True)
class LossType:
    """The traits of one ``loss_type``; docs/losses.md §3 explains each value.

    - ``per_token``: the function of the shared quantities and options giving the per-token loss and metrics.
    - ``ratio``: the importance ratio's level, ``"token"``, ``"sequence"`` (whatever
      ``importance_sampling_level`` says), or ``"either"`` (``importance_sampling_level`` picks).
    - ``clip``: how the update is bounded; ``"ppo"`` types also take ``delta``.
    - ``aggregation``: ``"tokens"`` (the sum over valid tokens divided by their count) or ``"sequences"`` (the
      mean over sequences of their normalized sums): the unit ``num_items`` counts.
    - ``normalizer``: what a sequence's sum is divided by: ``"length"`` (its valid tokens), ``"max_length"``
      (``max_completion_length``), ``"none"``; ``"count"`` for token aggregation.
    - ``rollout``: how the rollout IS ratio enters: ``"multiply"`` (``l`` times it), ``"in_weight"`` (vespo's
      weight; token-level corrections only), ``"geometric_mean"`` (geo_mean's sequence value).
    """

    per_token: Callable[[_Quantities, _Options], tuple[torch.Tensor, Metrics]]
    ratio: str
    clip: str
    aggregation: str
    normalizer: str
    rollout: str = "multiply"


# fmt: off
LOSS_TYPES: dict[str, LossType] = {
    #                      per_token    ratio       clip         aggregation  normalizer    rollout
    "grpo":       LossType(_ppo_clip,   "either",   "ppo",       "sequences", "length"),
    "bnpo":       LossType(_ppo_clip,   "either",   "ppo",       "tokens",    "count"),
    "dr_grpo":    LossType(_ppo_clip,   "either",   "ppo",       "sequences", "max_length"),
    "dapo":       LossType(_ppo_clip,   "either",   "ppo",       "tokens",    "count"),
    "cispo":      LossType(_cispo,      "either",   "ratio_cap", "tokens",    "count"),
    "sapo":       LossType(_sapo,       "either",   "soft_gate", "sequences", "length"),
    "luspo":      LossType(_ppo_clip,   "either",   "ppo",       "sequences", "none"),
    "vespo":      LossType(_vespo,      "token",    "weight",    "tokens",    "count",      "in_weight"),
    "gpg":        LossType(_gpg,        "token",    "none",      "tokens",    "count"),
    "geo_mean":   LossType(_geo_mean,   "token",    "log_ratio", "sequences", "length",     "geometric_mean"),
    "clip_cov":   LossType(_clip_cov,   "token",    "ppo_cov",   "tokens",    "count"),
    "kl_cov":     LossType(_kl_cov,     "token",    "kl_cov",    "tokens",    "count"),
    "gspo":       LossType(_ppo_clip,   "sequence", "ppo",       "sequences", "length"),
    "gspo_token": LossType(_gspo_token, "sequence", "ppo",       "sequences", "length"),
    "dppo_tv":    LossType(_dppo_tv,    "token",    "tv_mask",   "tokens",    "count"),
    "dppo_kl":    LossType(_dppo_kl,    "token",    "kl_mask",   "tokens",    "count"),
    "dro":        LossType(_dro,        "token",    "quadratic", "tokens",    "count"),
}
# fmt: on
PPO_CLIP_TYPES = tuple(name for name, spec in LOSS_TYPES.items() if spec.clip == "ppo")
