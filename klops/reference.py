"""Float64 reference of every klops op, written plainly from docs/losses.md.

This is the oracle of the tests: it materializes full [N, V] float64 tensors, uses torch autograd for
its gradients and shares no code with the kernels. It is not a backend (the chunked ``torch`` backend
lives beside each op); keep it short and obvious rather than fast.
"""

import math

import torch

__all__ = [
    "divergence_reference", "fused_kl_reference", "topk_as_dense", "dpo_loss_reference", "tdpo_loss_reference",
    "dckd_loss_reference", "logprobs_reference", "group_advantages_reference",
    "grpo_loss_reference",
]  # fmt: skip


def _sum_xlogy(x: torch.Tensor, log_x: torch.Tensor, log_y: torch.Tensor) -> torch.Tensor:
    """sum_v x_v (log_x_v - log_y_v), taking 0 where x_v = 0 (with a NaN-free gradient)."""
    pos = x > 0
    diff = torch.where(pos, log_x, 0.0) - torch.where(pos, log_y, 0.0)
    return (x * diff).sum(-1)


def _safe_log(x: torch.Tensor) -> torch.Tensor:
    """log x, with a zero gradient (not NaN) where x = 0; callers weight those entries by 0."""
    return torch.where(x > 0, x, 1.0).log().where(x > 0, -torch.inf)


def _teacher_logprobs(teacher: torch.Tensor, target_is: str, temperature: float) -> torch.Tensor:
    y = teacher.double()
    if target_is == "logits":
        return torch.log_softmax(y / temperature, dim=-1)
    if target_is == "logprobs":
        return y
    return torch.log(y)


def divergence_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward",
    *,
    beta: float = 0.5,
    alpha: float = 0.5,
    temperature: float = 1.0,
    target_is: str = "logits",
) -> torch.Tensor:
    """Per-row divergence D(p, q) of docs/losses.md §1 in float64, shape ``student_logits.shape[:-1]``; the
    teacher dense, or a ``klops.TopK`` (``topk_as_dense``)."""
    if not isinstance(teacher_logits, torch.Tensor):
        student_logits, teacher_logits, target_is, temperature = topk_as_dense(
            student_logits, teacher_logits, temperature
        )
    log_q = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    log_p = _teacher_logprobs(teacher_logits, target_is, temperature)
    q, p = log_q.exp(), log_p.exp()
    if kind == "jsd" and beta == 0.0:
        kind = "forward"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse"
    if kind == "forward":
        return _sum_xlogy(p, log_p, log_q)
    if kind == "reverse":
        return _sum_xlogy(q, log_q, log_p)
    if kind == "jsd":
        m = beta * p + (1 - beta) * q
        log_m = _safe_log(m)
        return beta * _sum_xlogy(p, log_p, log_m) + (1 - beta) * _sum_xlogy(q, log_q, log_m)
    if kind == "skew_forward":
        m = alpha * p + (1 - alpha) * q
        return _sum_xlogy(p, log_p, _safe_log(m))
    if kind == "skew_reverse":
        n = (1 - alpha) * p + alpha * q
        return _sum_xlogy(q, log_q, _safe_log(n))
    if kind == "tv":
        return 0.5 * (p - q).abs().sum(-1)
    if kind == "alpha":
        both_zero = (p == 0) & (q == 0)
        exponent = alpha * torch.where(both_zero, 0.0, log_p) + (1 - alpha) * torch.where(both_zero, 0.0, log_q)
        s = torch.where(both_zero, 0.0, exponent.exp()).sum(-1)
        return (1 - s) / (alpha * (1 - alpha))
    raise ValueError(f"unknown kind {kind!r}")


def topk_as_dense(student_logits: torch.Tensor, topk, temperature: float):
    """(student, teacher, target_is, temperature) of the dense problem a TopK teacher defines, in float64.

    tail="bin": distributions over the k top ids plus one tail outcome, the student's log-probs
    (log q_S, log sum_{v not in S} q_v) as "logits" at T = 1 (log_softmax leaves them as they are) and the
    teacher's (log p_S, log max(0, 1 - sum p_S)) as log-probs; no tail outcome when k = V.
    tail="renormalize": the student as given, the teacher p_S / sum p_S scattered into zeros of [..., V].
    """
    idx = topk.indices.long()
    log_p = topk.logprobs.double()
    V, k = student_logits.shape[-1], idx.shape[-1]
    if topk.tail == "renormalize":
        p = torch.zeros(student_logits.shape, dtype=torch.float64, device=student_logits.device)
        return student_logits, p.scatter(-1, idx, torch.softmax(log_p, dim=-1)), "probs", temperature
    log_q = torch.log_softmax(student_logits.double() / temperature, dim=-1)
    if k == V:
        return log_q.gather(-1, idx), log_p, "logprobs", 1.0
    outside = torch.ones_like(log_q, dtype=torch.bool).scatter(-1, idx, False)
    log_tail_q = torch.logsumexp(log_q.masked_fill(~outside, -math.inf), dim=-1, keepdim=True)
    log_tail_p = torch.log((1 - log_p.exp().sum(-1, keepdim=True)).clamp(min=0))
    student = torch.cat([log_q.gather(-1, idx), log_tail_q], dim=-1)
    return student, torch.cat([log_p, log_tail_p], dim=-1), "logprobs", 1.0


def _valid_rows(shape, labels, mask, ignore_index, device) -> torch.Tensor:
    valid = torch.ones(shape, dtype=torch.bool, device=device)
    if labels is not None:
        valid &= labels != ignore_index
    if mask is not None:
        valid &= mask != 0
    return valid


def fused_kl_reference(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str = "forward",
    *,
    beta: float = 0.5,
    alpha: float = 0.5,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    weights: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    num_items: int | torch.Tensor | None = None,
    target_is: str = "logits",
) -> torch.Tensor:
    """What ``klops.fused_kl`` returns, in float64: masked, weighted and reduced as docs/losses.md §0 says."""
    rows = divergence_reference(
        student_logits, teacher_logits, kind, beta=beta, alpha=alpha, temperature=temperature, target_is=target_is
    )
    valid = _valid_rows(rows.shape, labels, mask, ignore_index, rows.device)
    rows = torch.where(valid, rows, 0.0)
    if weights is not None:
        rows = rows * weights.double().reshape(rows.shape)
    if reduction == "none":
        return rows
    total = rows.sum()
    if num_items is not None:
        return total / num_items
    if reduction == "sum":
        return total
    return total / max(1, int(valid.sum()))


def logprobs_reference(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-prob of the label, entropy) per row in float64 (docs/losses.md §2); ignored rows give 0, 0."""
    log_q = torch.log_softmax(logits.double() / temperature, dim=-1)
    labels = labels.long()
    valid = labels != ignore_index
    picked = log_q.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    q = log_q.exp()
    entropy = -(q * torch.where(q > 0, log_q, 0.0)).sum(-1)
    return torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)


def logprobs_row_stats_reference(
    logits: torch.Tensor, labels: torch.Tensor, *, temperature: float = 1.0, ignore_index: int = -100
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log sum_v q_v^2, mean_v z_v / T, label is the first argmax) per row in float64 (bool for the last), with
    q = softmax(z / T), as TRL's fused LM head defines them; ignored rows give 0, 0, False."""
    z = logits.double()
    log_q = torch.log_softmax(z / temperature, dim=-1)
    labels = labels.long()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    z_label = z.gather(-1, safe.unsqueeze(-1))
    before = torch.arange(z.shape[-1], device=z.device) < safe.unsqueeze(-1)
    first_max = (z_label.squeeze(-1) >= z.amax(-1)) & ~((z >= z_label) & before).any(-1)
    return (
        torch.where(valid, torch.logsumexp(2 * log_q, -1), 0.0),
        torch.where(valid, z.mean(-1) / temperature, 0.0),
        valid & first_max,
    )


def group_advantages_reference(rewards: torch.Tensor, group_size: int, scale: str = "group", eps: float = 1e-4):
    """TRL's GRPO advantages in float64, one group at a time; NaN rewards are skipped and get 0."""
    r = rewards.double()
    out = torch.zeros_like(r)

    def std(values):  # Bessel-corrected, NaN with fewer than two values
        return torch.tensor(math.nan) if len(values) < 2 else torch.stack(values).std()

    everything = [x for x in r if not x.isnan()]
    for start in range(0, len(r), group_size):
        group = [x for x in r[start : start + group_size] if not x.isnan()]
        mean = torch.stack(group).mean() if group else torch.tensor(math.nan)
        spread = {"group": std(group), "batch": std(everything), "none": None}[scale]
        for i in range(start, start + group_size):
            a = r[i] - mean if spread is None else (r[i] - mean) / (spread + eps)
            out[i] = 0.0 if a.isnan() else a
    return out


def grpo_loss_reference(logp, advantages, mask, *, old_logp=None, ref_logp=None, rollout_logp=None,
                        loss_type="dapo", epsilon=0.2, epsilon_high=None, delta=None, beta=0.0, kl_estimator="k3",
                        use_bias_correction_kl=False, importance_sampling_level="token",
                        rollout_correction="sequence_mask", rollout_clip_min=None, rollout_clip_max=3.0,
                        entropy=None, entropy_coef=0.0, top_entropy_quantile=1.0, off_policy_mask_threshold=None,
                        num_items=None, max_completion_length=None, sapo_temperature_pos=1.0,
                        sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0,
                        vespo_lambda_neg=2.0, clip_cov_ratio=2e-4, clip_cov_lb=1.0, clip_cov_ub=5.0,
                        kl_cov_ratio=2e-4, kl_cov_coef=0.1, kl_clamp=None, dppo_ratio_cap=20.0, dro_beta=None,
                        generator=None):  # fmt: skip
    """The GRPO loss of klops.grpo_loss written token by token in float64 from docs/losses.md §3 and TRL's
    GRPOTrainer._compute_loss (same arguments; verl's types from verl, _reference_verl_token_loss); returns the
    loss only."""
    B, L = logp.shape
    lp = logp.double()
    old = lp.detach() if old_logp is None else old_logp.double()
    eps_high = epsilon if epsilon_high is None else epsilon_high
    valid = [[bool(mask[i, t] != 0) for t in range(L)] for i in range(B)]
    n_tok = [sum(row) for row in valid]

    def adv(i, t):
        return advantages[i].double() if advantages.dim() == 1 else advantages[i, t].double()

    def clamp20(x):
        return x.clamp(-20.0, 20.0)

    if top_entropy_quantile < 1.0:
        pool = torch.stack([entropy[i, t].double() for i in range(B) for t in range(L) if valid[i][t]] or
                           [torch.tensor(math.nan, dtype=torch.float64)])  # fmt: skip
        cutoff = torch.quantile(pool.detach(), 1.0 - top_entropy_quantile) if not pool.isnan().all() else None
    selected = _reference_cov_tokens(lp, old, advantages, valid, loss_type, epsilon, eps_high, clip_cov_ratio,
                                     clip_cov_lb, clip_cov_ub, kl_cov_ratio, generator)  # fmt: skip
    total = lp.new_zeros(())
    entropy_total, entropy_count = lp.new_zeros(()), 0
    for i in range(B):
        seq_log_ratio = sum((lp[i, t] - old[i, t] for t in range(L) if valid[i][t]), lp.new_zeros(()))
        seq_sum = lp.new_zeros(())
        for t in range(L):
            if not valid[i][t]:
                continue
            a = adv(i, t)
            if importance_sampling_level == "sequence" or loss_type in ("gspo", "gspo_token"):
                r = torch.exp(clamp20(seq_log_ratio / max(1, n_tok[i])))
            else:
                r = torch.exp(clamp20(lp[i, t] - old[i, t]))
            if loss_type == "gspo_token":  # verl's gspo: s_i,t = sg(s_i) pi_t / sg(pi_t)
                r = r.detach() * torch.exp(lp[i, t] - lp[i, t].detach())
            if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo", "gspo", "gspo_token"):
                unclipped = (r if delta is None else torch.clamp(r, max=delta)) * a
                clipped = torch.clamp(r, 1 - epsilon, 1 + eps_high) * a
                term = -(unclipped if unclipped <= clipped else clipped)  # a tie counts as unclipped
            elif loss_type == "cispo":
                term = -torch.clamp(r, max=eps_high).detach() * a * lp[i, t]
            elif loss_type == "sapo":
                tau = sapo_temperature_pos if a > 0 else sapo_temperature_neg
                term = -torch.sigmoid(tau * (r - 1)) * 4 / tau * a
            elif loss_type == "vespo":
                log_w = sum((clamp20(lp[i, u] - old[i, u]).detach() for u in range(L) if valid[i][u]), lp.new_zeros(()))
                for u in range(L) if rollout_logp is not None else ():
                    w_u = _reference_is_ratio(old, rollout_logp, valid, i, u, rollout_correction,
                                              rollout_clip_min, rollout_clip_max)  # fmt: skip
                    log_w = log_w + torch.log(w_u).clamp(math.log(1e-8), 20.0)
                log_w = log_w.clamp(math.log(1e-8), 20.0)
                k, lam = (vespo_k_pos, vespo_lambda_pos) if a >= 0 else (vespo_k_neg, vespo_lambda_neg)
                term = -torch.exp(lam + k * log_w - lam * log_w.exp()) * a * lp[i, t]
            elif loss_type == "geo_mean":  # the sequence's value on each of its tokens
                log_seq, adv_sum = lp.new_zeros(()), lp.new_zeros(())
                for u in range(L):
                    if valid[i][u]:
                        d = clamp20(lp[i, u] - old[i, u])
                        s_u = torch.sign(adv(i, u))
                        log_seq = log_seq + s_u * torch.minimum(s_u * d, s_u * d.clamp(-epsilon, eps_high))
                        adv_sum = adv_sum + adv(i, u)
                        if rollout_logp is not None:
                            w_u = _reference_is_ratio(old, rollout_logp, valid, i, u, rollout_correction,
                                                      rollout_clip_min, rollout_clip_max)  # fmt: skip
                            log_seq = log_seq + torch.log(w_u.clamp(min=1e-10))
                term = -(adv_sum / n_tok[i]) * torch.exp(log_seq / n_tok[i])
            elif loss_type == "clip_cov":
                unclipped, clipped = r * a, torch.clamp(r, 1 - epsilon, 1 + eps_high) * a
                term = -(unclipped if unclipped <= clipped else clipped) * (0.0 if (i, t) in selected else 1.0)
            elif loss_type == "kl_cov":
                term = -r * a + (kl_cov_coef * (lp[i, t] - old[i, t]).abs() if (i, t) in selected else 0.0)
            elif loss_type in ("dppo_tv", "dppo_kl", "dro"):
                term = _reference_verl_token_loss(loss_type, lp[i, t], old[i, t], a, epsilon, eps_high,
                                                  dppo_ratio_cap, dro_beta)  # fmt: skip
            else:  # gpg
                term = -a * lp[i, t]
            if off_policy_mask_threshold is not None:
                sampler = old if rollout_logp is None else rollout_logp.double()
                drift = sum(sampler[i, u] - lp[i, u].detach() for u in range(L) if valid[i][u]) / max(1, n_tok[i])
                if not (a >= 0 or drift <= off_policy_mask_threshold):
                    term = term * 0.0
            kept = top_entropy_quantile >= 1.0 or (cutoff is not None and entropy[i, t].double() >= cutoff)
            if not kept:
                term = term * 0.0
            if rollout_logp is not None and loss_type not in ("vespo", "geo_mean"):
                term = term * _reference_is_ratio(old, rollout_logp, valid, i, t, rollout_correction,
                                                  rollout_clip_min, rollout_clip_max)  # fmt: skip
            if beta > 0:
                rho = ref_logp[i, t].double() - lp[i, t]
                estimates = {"k1": -rho, "k2": 0.5 * rho**2, "abs": rho.abs(), "k3": torch.exp(clamp20(rho)) - rho - 1}
                kl = estimates[kl_estimator]
                if kl_clamp is not None:  # verl's low_var_kl: k3 clamped to [-10, 10]
                    kl = kl.clamp(-kl_clamp, kl_clamp)
                term = term + beta * (kl * r if use_bias_correction_kl else kl)
            seq_sum = seq_sum + term
            if entropy is not None and kept:
                entropy_total = entropy_total + entropy[i, t].double()
                entropy_count += 1
        if loss_type in ("grpo", "sapo", "geo_mean", "gspo", "gspo_token"):
            seq_sum = seq_sum / max(1, n_tok[i])
        elif loss_type == "dr_grpo":
            seq_sum = seq_sum / (L if max_completion_length is None else max_completion_length)
        total = total + seq_sum
    by_tokens = loss_type in ("bnpo", "dapo", "cispo", "vespo", "gpg", "clip_cov", "kl_cov", "dppo_tv", "dppo_kl",
                              "dro")  # fmt: skip
    count = (sum(n_tok) if by_tokens else B) if num_items is None else float(num_items)
    loss = total / max(1.0, count)
    if entropy_coef != 0:  # the mean entropy of the kept tokens (TRL 1.16)
        loss = loss - entropy_coef * entropy_total / max(1, entropy_count)
    return loss


def _reference_cov_tokens(lp, old, advantages, valid, loss_type, epsilon, eps_high, clip_cov_ratio, clip_cov_lb,
                          clip_cov_ub, kl_cov_ratio, generator):  # fmt: skip
    """The (i, t) that verl's Clip-Cov takes out of the loss (a random draw among the unclipped tokens of
    covariance in (lb, ub)) or KL-Cov penalizes (the largest covariances); ties to the first position."""
    if loss_type not in ("clip_cov", "kl_cov"):
        return set()
    B, L = lp.shape
    lp, old = lp.detach(), old.detach()
    tokens = [(i, t) for i in range(B) for t in range(L) if valid[i][t]]

    def adv(i, t):
        return float(advantages[i] if advantages.dim() == 1 else advantages[i, t])

    mean_a = sum(adv(i, t) for i, t in tokens) / max(1, len(tokens))
    mean_lp = sum(float(lp[i, t]) for i, t in tokens) / max(1, len(tokens))
    cov = {(i, t): (adv(i, t) - mean_a) * (float(lp[i, t]) - mean_lp) for i, t in tokens}
    if loss_type == "kl_cov":
        k = max(1, math.floor(kl_cov_ratio * len(tokens)))
        return set(sorted(tokens, key=lambda it: -cov[it])[:k])
    priority = torch.rand((B, L), generator=generator, device=lp.device)
    k = max(1, math.floor(clip_cov_ratio * len(tokens)))

    def unclipped(i, t):
        r = math.exp(max(-20.0, min(20.0, float(lp[i, t] - old[i, t]))))
        return min(max(r, 1 - epsilon), 1 + eps_high) * adv(i, t) >= r * adv(i, t)

    eligible = [it for it in tokens if unclipped(*it) and clip_cov_lb < cov[it] < clip_cov_ub]
    return set(sorted(eligible, key=lambda it: -float(priority[it]))[:k])


def _reference_is_ratio(old, rollout_logp, valid, i, t, mode, clip_min, clip_max):
    """TRL's vLLM importance-sampling ratio of token (i, t) (sequence modes: of sequence i)."""
    if mode.startswith("sequence"):
        diff = sum((old[i, u] - rollout_logp[i, u].double() for u in range(len(valid[i])) if valid[i][u]),
                   old.new_zeros(()))  # fmt: skip
    else:
        diff = old[i, t] - rollout_logp[i, t].double() if valid[i][t] else old.new_zeros(())
    ratio = torch.exp(diff.clamp(max=20.0)).detach()
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    outside = (clip_min is not None and ratio < clip_min) or (clip_max is not None and ratio > clip_max)
    return ratio * 0.0 if outside else ratio


def _reference_verl_token_loss(loss_type, lp, old, a, epsilon, eps_high, dppo_ratio_cap, dro_beta):
    """One token's loss under verl's dppo_tv, dppo_kl or dro, from compute_policy_loss_dppo_tv / _dppo_kl / _dro in
    verl/trainer/ppo/core_algos.py (verl-project/verl commit 1dda039): lp, old 0-d float64 (lp with gradient), a the
    token's advantage. DPPO reads verl's clip_ratio_low / _high as epsilon / eps_high and clip_ratio_c as
    dppo_ratio_cap; its keep-decision is made on Python floats."""
    if loss_type == "dro":
        return -(lp * a - 0.5 * dro_beta * (lp - old) ** 2)
    p, p_old = math.exp(float(lp)), math.exp(float(old))
    if loss_type == "dppo_tv":  # kept unless the probability moved past the threshold the way the advantage pushes
        kept = p - p_old <= eps_high if a > 0 else p - p_old >= -epsilon
    else:  # binary KL between Bernoulli(p_old) and Bernoulli(p), verl's 1e-8 inside the log
        binary_kl = p_old * (float(old) - float(lp)) + (1 - p_old) * math.log((1 - p_old + 1e-8) / (1 - p + 1e-8))
        kept = (binary_kl <= eps_high or p <= p_old) if a > 0 else (binary_kl <= epsilon or p >= p_old)
    r = torch.exp((lp - old).clamp(-20.0, 20.0))
    return -a * r.clamp(max=dppo_ratio_cap).detach() * lp * (1.0 if kept else 0.0)


def dpo_loss_reference(policy_chosen_logp, policy_rejected_logp, ref_chosen_logp, ref_rejected_logp, *, beta=0.1,
                       loss_type="sigmoid", divergence="reverse", alpha=0.5, label_smoothing=0.0):  # fmt: skip
    """The DPO / f-DPO loss of docs/losses.md §4 in float64, pair by pair (loss only)."""
    import torch.nn.functional as F

    def score(lr):
        if divergence == "reverse" or (divergence == "alpha" and alpha == 1.0):
            return lr
        if divergence == "forward":
            return -torch.exp(-lr)
        if divergence == "jsd":
            return F.logsigmoid(lr)
        return torch.exp(torch.clamp((alpha - 1) * lr, max=80.0)) / (alpha - 1)

    losses = []
    for i in range(policy_chosen_logp.shape[0]):
        chosen = policy_chosen_logp[i].double() - ref_chosen_logp[i].double()
        rejected = policy_rejected_logp[i].double() - ref_rejected_logp[i].double()
        delta = score(chosen) - score(rejected)
        if loss_type == "sigmoid":
            eps = label_smoothing
            losses.append(-(1 - eps) * F.logsigmoid(beta * delta) - eps * F.logsigmoid(-beta * delta))
        elif loss_type == "ipo":
            losses.append((delta - 1 / (2 * beta)) ** 2)
        else:
            losses.append(torch.relu(1 - beta * delta))
    return torch.stack(losses).mean()


def tdpo_loss_reference(policy_logits, ref_logits, labels, mask, chosen_index, rejected_index, *, beta=0.1,
                        alpha=0.5, variant=2, temperature=1.0, ignore_index=-100):  # fmt: skip
    """TDPO1 / TDPO2 (docs/losses.md §4) in float64 from the full softmaxes, as the TDPO authors write it."""
    import torch.nn.functional as F

    log_q = torch.log_softmax(policy_logits.double() / temperature, dim=-1)
    log_p = torch.log_softmax(ref_logits.double() / temperature, dim=-1).detach()
    keep = labels != ignore_index
    if mask is not None:
        keep = keep & (mask != 0)
    idx = torch.where(keep, labels, 0).long()[..., None]
    position_kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    token_margin = (log_q.gather(-1, idx) - log_p.gather(-1, idx)).squeeze(-1)
    margin = torch.where(keep, token_margin, 0.0).sum(-1)
    seq_kl = torch.where(keep, position_kl, 0.0).sum(-1)
    c, r = chosen_index.long(), rejected_index.long()
    m = margin[c] - margin[r]
    if variant == 1:
        logits = m - (seq_kl[r] - seq_kl[c])
    else:
        logits = m - alpha * (seq_kl[r] - seq_kl[c].detach())
    return -F.logsigmoid(beta * logits).mean()


def dckd_loss_reference(student_logits, teacher, labels, chosen, *, w_sft=1.0, w_distil=1.0, w_chosen=1.0,
                        w_rejected=1.0, kind="forward", temperature=1.0, ignore_index=-100, **coef):  # fmt: skip
    """DCKD (docs/losses.md §6) in float64: w_sft NLL(chosen) + w_distil (w_chosen KL(chosen) + w_rejected
    KL(rejected)), each a mean over its tokens; the teacher dense or a TopK."""
    kl = fused_kl_reference(student_logits, teacher, kind, labels=labels, ignore_index=ignore_index,
                            reduction="none", temperature=temperature, **coef)  # fmt: skip
    logp, _ = logprobs_reference(student_logits, labels, ignore_index=ignore_index)
    tokens = labels != ignore_index
    on_chosen, on_rejected = tokens & chosen[:, None], tokens & ~chosen[:, None]

    def mean(x, m):
        return torch.where(m, x, 0.0).sum() / max(1, int(m.sum()))

    kl_part = w_chosen * mean(kl, on_chosen) + w_rejected * mean(kl, on_rejected)
    return w_sft * mean(-logp, on_chosen) + w_distil * kl_part


def sinkhorn_reference(cost: torch.Tensor, a: torch.Tensor, b: torch.Tensor, epsilon: float, n_iter: int):
    """float64 log-domain Sinkhorn on [B, n, m] costs, exactly n_iter (f, g) updates from g = 0, each a plain
    ``logsumexp`` over the whole matrix: (f, g, plan [B, n, m], <P, C> [B])."""
    cost, log_a, log_b = cost.double(), torch.log(a.double()), torch.log(b.double())
    g = torch.zeros_like(log_b)
    for _ in range(n_iter):
        f = -epsilon * torch.logsumexp(log_b[:, None, :] + (g[:, None, :] - cost) / epsilon, dim=2)
        g = -epsilon * torch.logsumexp(log_a[:, :, None] + (f[:, :, None] - cost) / epsilon, dim=1)
    plan = torch.exp(log_a[:, :, None] + log_b[:, None, :] + (f[:, :, None] + g[:, None, :] - cost) / epsilon)
    return f, g, plan, (plan * cost).sum((1, 2))


def sinkhorn_distill_reference(student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, temperature=2.0,
                               epsilon=0.1, n_iter=20, valid=None, envelope=False):  # fmt: skip
    """SinKD's published procedure in float64 on [N, V] logits (differentiable by autograd, through the
    iterations as the published code is, or with ``envelope`` through W only): W = cdist(p_s, p_t, L1) over
    the valid rows, K = exp(-W / eps) normalized n_iter times (rows, then columns), loss sum(P W)."""
    zs, zt = student_logits.double(), teacher_logits.double()
    if valid is not None:
        zs, zt = zs[valid], zt[valid]
    if zs.shape[0] == 0:
        return zs.sum() * 0.0
    p_s, p_t = torch.softmax(zs / temperature, dim=-1), torch.softmax(zt / temperature, dim=-1)
    w = (p_s[:, None, :] - p_t[None, :, :]).abs().sum(-1)
    plan = torch.exp(-w / epsilon)
    for _ in range(n_iter):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return ((plan.detach() if envelope else plan) * w).sum()


def _akl_head_share(p: torch.Tensor, q: torch.Tensor, mu: float) -> torch.Tensor:
    """The head's share of sum_v |p_v - q_v| in one row of probabilities, 1/2 when that sum is 0.

    The authors' rule: in descending order of p, an entry is head while the running sum up to it stays within mu
    (the first entry always). Entries tied in p take any order in a sort, so each counts with the average over
    orders: of a group of c entries equal to t after a running sum A, those at places i = 1..c with A + i t <= mu
    are head, min(c, floor((mu - A) / t)) of them (all c for t = 0 if A <= mu)."""
    values, group, counts = torch.unique(p, return_inverse=True, return_counts=True)
    values, counts = values.flip(0), counts.flip(0).double()  # groups in descending order of p
    gaps = torch.zeros_like(values).index_add_(0, group, (p - q).abs()).flip(0)
    before = torch.cumsum(values * counts, 0) - values * counts
    fits = torch.where(values > 0, torch.floor((mu - before) / values), torch.where(before <= mu, counts, 0.0))
    heads = fits.clamp(min=0).minimum(counts)
    heads[0] = heads[0].clamp(min=1)
    total = gaps.sum()
    return (heads / counts * gaps).sum() / total if total > 0 else total.new_tensor(0.5)


def akl_weights_reference(student_logits, teacher_logits, *, mu=0.5, temperature=1.0):
    """AKL's forward-KL weight per row in float64: the authors' ``get_ratio`` (descending sort, ``cumsum > mu``
    is the tail, the first entry always head) with -inf logits as probability 0, 1/2 for 0/0, and entries tied
    in p counted with the average over the orders a sort may give them (``_akl_head_share``)."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    p_rows, q_rows = p.reshape(-1, p.shape[-1]), q.reshape(-1, q.shape[-1])
    rows = [_akl_head_share(p_row, q_row, mu) for p_row, q_row in zip(p_rows, q_rows)]
    return torch.stack(rows).reshape(p.shape[:-1]) if rows else p.new_zeros(p.shape[:-1])
