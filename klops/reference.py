"""Float64 reference of every klops op, written plainly from SPEC.md.

This is the oracle of the tests: it materializes full [N, V] float64 tensors, uses torch autograd for
its gradients and shares no code with the kernels. It is not a backend (the chunked ``torch`` backend
lives beside each op); keep it short and obvious rather than fast.
"""

import torch

__all__ = ["divergence_reference", "fused_kl_reference", "logprobs_reference"]


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
    """Per-row divergence D(p, q) of SPEC.md §1 in float64, shape ``student_logits.shape[:-1]``."""
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
    """What ``klops.fused_kl`` returns, in float64: masked, weighted and reduced as SPEC.md §0 says."""
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
    """(log-prob of the label, entropy) per row in float64 (SPEC.md §2); ignored rows give 0, 0."""
    log_q = torch.log_softmax(logits.double() / temperature, dim=-1)
    labels = labels.long()
    valid = labels != ignore_index
    picked = log_q.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    q = log_q.exp()
    entropy = -(q * torch.where(q > 0, log_q, 0.0)).sum(-1)
    return torch.where(valid, picked, 0.0), torch.where(valid, entropy, 0.0)
