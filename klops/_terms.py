"""The per-entry torch math of the divergences (docs/losses.md §1), as the kernels compute it: each entry's loss
and its gradient coefficient from log q, q, log p and p. The torch backends of the dense and the top-k ops
(klops/divergence.py, klops/topk.py) sum these over a chunk of rows."""

import math

import torch


def mixture_logs(coef: float) -> tuple[float, float]:
    """(log coef, log(1 - coef)): the mixture weights of jsd / skew_*, -inf at the ends of [0, 1];
    (0, 0) outside [0, 1] (Amari alpha, which mixes nothing)."""
    if not 0.0 <= coef <= 1.0:
        return 0.0, 0.0
    return (math.log(coef) if coef > 0 else -math.inf), (math.log1p(-coef) if coef < 1 else -math.inf)


def kl_entries(la: torch.Tensor, lb: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """a (log a - log b) per entry as a new tensor, 0 where a = 0: log a = -inf, or a finite log a whose exp
    underflows (then log b = -inf would give 0 * inf)."""
    return (la - lb).mul_(a).masked_fill_(a == 0, 0.0)


def divergence_terms(lq: torch.Tensor, q: torch.Tensor, lp: torch.Tensor, p: torch.Tensor, kind: str, coef: float):
    """Per-entry (loss_v, a_v) with D = sum loss_v and dD/dz = (a - q sum a) / T, from log q, q, log p and p;
    mirrors the kernel. Both are new tensors (reverse KL: one new tensor twice); the inputs are not written."""
    if kind == "forward":
        return kl_entries(lp, lq, p), -p
    if kind == "reverse":
        loss = kl_entries(lq, lp, q)
        return loss, loss
    q_pos, p_pos = lq != -math.inf, lp != -math.inf
    log_coef, log_1m_coef = mixture_logs(coef)
    zero = lq.new_zeros(())
    if kind == "jsd":
        lm = torch.logaddexp(log_coef + lp, log_1m_coef + lq)
        kl_qm = torch.where(q_pos, q * (lq - lm), zero)
        loss = coef * torch.where(p_pos, p * (lp - lm), zero) + (1 - coef) * kl_qm
        a = (1 - coef) * kl_qm
    elif kind == "skew_forward":
        lm = torch.logaddexp(log_coef + lp, log_1m_coef + lq)
        loss = torch.where(p_pos, p * (lp - lm), zero)
        a = torch.where(p_pos & q_pos, -(1 - coef) * torch.exp(lp + lq - lm), zero)
    elif kind == "skew_reverse":
        ln = torch.logaddexp(log_1m_coef + lp, log_coef + lq)
        log_qn = torch.where(q_pos, lq - ln, zero)
        loss = q * log_qn
        a = q * (log_qn + 1 - coef * log_qn.exp())
    elif kind == "tv":
        loss = 0.5 * (p - q).abs()
        a = 0.5 * q * torch.sign(q - p)
    else:  # alpha (Amari); entries where p = q = 0 carry no mass (and would give -inf + inf)
        w = torch.where(p_pos | q_pos, torch.exp(coef * lp + (1 - coef) * lq), zero)
        loss = (q - w) / (coef * (1 - coef))
        a = -w / coef
    return loss, a


def row_sums(lq, q, lp, p, kind: str, coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, gbar) = (sum loss_v, sum a_v) per row; forward KL's gbar = -sum p without an [rows, V] a."""
    if kind == "forward":
        return kl_entries(lp, lq, p).sum(-1), -p.sum(-1)
    loss, a = divergence_terms(lq, q, lp, p, kind, coef)
    return loss.sum(-1), a.sum(-1)


def teacher_probs(teacher, target_is: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, p) of a chunk of teacher rows given as log-probs or probs."""
    if target_is == "logprobs":
        lp = teacher.float()
        return lp, lp.exp()
    p = teacher.float()
    return p.log(), p
