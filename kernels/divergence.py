"""Triton kernels for token-level divergences over the vocabulary (docs/losses.md §1).

One program handles one row (token) and streams its V logits in blocks of BLOCK_V; nothing of size
[N, V] is allocated besides the gradient. With z the student logits, y the teacher and T the temperature:

    log q = (z - max_q)/T - logsum_q            max_q = max_v z_v, logsum_q = log sum exp((z - max_q)/T)
    log p = (y - max_t)/T - logsum_t            (target_is="logits"; likewise)
    log p = y  or  log y                        (target_is="logprobs" / "probs": taken as given; the forward
                                                 leaves max_t = max_v log p_v or max_v -p_v, logsum_t = log sum_v p_v
                                                 for their check, see teacher_check_terms)

    D    = sum_v loss_v                         loss_v: the kind's per-entry term
    a_v  = q_v g_v                              g_v = f(u_v) - u_v f'(u_v), u = p/q
    gbar = sum_v a_v
    dD/dz_j = (a_j - q_j gbar) / T

The row max is kept in raw logit units and subtracted before dividing by T, so that z - max is exact
near the max (as in a standard log_softmax): log q of the likely tokens keeps full fp32 precision
however large z/T is, instead of an error of eps |z/T|.

Forward: sweep 1 computes (max, logsum) of both rows online; sweep 2 accumulates D and gbar. Forward
and reverse KL between two logit rows need no sweep 2: D = E_a[log P_a - log P_b] is accumulated
online in sweep 1 (online_kl_update), and gbar is -1 or D.
Backward (1 sweep): recomputes q, p, a from the saved row statistics and gbar and writes
dz = grad_row * (a - q gbar) / T. Recomputation moves fewer bytes than writing the gradient in the
forward and rescaling it in the backward (see klops/divergence.py).
"""

import torch
import triton
import triton.language as tl

from .kinds import DIVERGENCE_KINDS
from .launch import BACKWARD_SWEEP, FORWARD_SWEEP, TARGET_KINDS, launch_over_rows

# The KIND constexpr: the kind's place in kernels/kinds.py's table.
FORWARD = tl.constexpr(DIVERGENCE_KINDS.index("forward"))
REVERSE = tl.constexpr(DIVERGENCE_KINDS.index("reverse"))
JSD = tl.constexpr(DIVERGENCE_KINDS.index("jsd"))
SKEW_FORWARD = tl.constexpr(DIVERGENCE_KINDS.index("skew_forward"))
SKEW_REVERSE = tl.constexpr(DIVERGENCE_KINDS.index("skew_reverse"))
TV = tl.constexpr(DIVERGENCE_KINDS.index("tv"))
ALPHA = tl.constexpr(DIVERGENCE_KINDS.index("alpha"))

LOGITS = tl.constexpr(0)
LOGPROBS = tl.constexpr(1)
PROBS = tl.constexpr(2)

NEG_INF = tl.constexpr(float("-inf"))


@triton.jit
def finite_or_zero(m):
    """m, or 0 where m = -inf (the max of an empty or all -inf lane)."""
    return tl.where(m == NEG_INF, 0.0, m)


@triton.jit
def zero_row(row_ptr, V, BLOCK_V: tl.constexpr):
    """Writes V zeros to a contiguous row (the gradient of an ignored row), BLOCK_V at a time."""
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        tl.store(row_ptr + start + cols, tl.zeros([BLOCK_V], tl.float32), mask=start + cols < V)


@triton.jit
def online_lse_update(m, s, x, inv_temperature):
    """Per-lane online log-sum-exp in raw units: m = running max of x, s = sum exp((x - m) / T).

    One exp per entry: on a new max x it rescales s (s' = s exp((m - x) / T) + 1), otherwise it is the
    entry's own term exp((x - m) / T). A NaN x is never a new max, so it makes s NaN; -inf adds nothing.
    """
    up = x > m
    m_new = tl.where(up, x, m)
    e = tl.exp((tl.where(up, m, x) - finite_or_zero(m_new)) * inv_temperature)
    return m_new, tl.where(up, s * e + 1.0, s + e)


@triton.jit
def lse_finalize(m, s, inv_temperature):
    """(row max, log sum exp((x - max) / T)) from the per-lane (m, s); the max of an all -inf row is 0."""
    m_safe = finite_or_zero(tl.max(m, 0))
    return m_safe, tl.log(tl.sum(s * tl.exp((m - m_safe) * inv_temperature), 0))


@triton.jit
def move_kl_acc(acc, r_a, shift, s_a):
    """An online KL accumulator moved to new row maxima: r_a (acc + shift s_a), 0 where r_a = 0 (its terms' weight
    underflowed, P_a = 0 there), so that an acc of inf (b = -inf) meets no 0 * inf."""
    return tl.where(r_a > 0.0, r_a * (acc + shift * s_a), 0.0)


@triton.jit
def online_kl_update(m_a, s_a, m_b, s_b, acc, a, b, inv_temperature):
    """One block of KL(P_a || P_b) between two logit rows in one sweep (P = softmax(x / T)).

    Per lane: the online (max, sum) of both rows as in online_lse_update, and
    acc = sum_v exp(d_a) (d_a - d_b) with d = (x - m) / T relative to the lane's current maxima, so that
    its terms keep the precision of log-probabilities. A new max moves the reference point of every
    earlier term: acc' = r_a (acc + (shift_a - shift_b) s_a), shift = (m - m') / T, r_a = exp(shift_a).

    One exp per entry of each row, as in online_lse_update: x = shift on a new max (then d = 0 and the
    entry's exp is 1), else x = d (then shift = 0, r = 1). shift = -inf only when the lane was empty
    (m = -inf, s = acc = 0): taken as 0. An entry, or a lane's earlier terms, whose weight exp(d_a) or r_a is
    0 in fp32 adds nothing (P_a = 0 there: a = -inf, or an underflow), so that b = -inf meets no 0 * inf;
    b = -inf where P_a > 0 gives acc = inf (D infinite). NaN gives NaN (through s).
    """
    up_a = a > m_a
    up_b = b > m_b
    m_a_new = tl.where(up_a, a, m_a)
    m_b_new = tl.where(up_b, b, m_b)
    x_a = (tl.where(up_a, m_a, a) - finite_or_zero(m_a_new)) * inv_temperature
    x_b = (tl.where(up_b, m_b, b) - finite_or_zero(m_b_new)) * inv_temperature
    e_a = tl.exp(x_a)
    e_b = tl.exp(x_b)
    shift = tl.where(up_a, finite_or_zero(x_a), 0.0) - tl.where(up_b, finite_or_zero(x_b), 0.0)
    d_diff = tl.where(up_a, 0.0, x_a) - tl.where(up_b, 0.0, x_b)
    weight = tl.where(up_a, 1.0, e_a)
    r_a = tl.where(up_a, e_a, 1.0)
    acc = move_kl_acc(acc, r_a, shift, s_a) + tl.where(weight > 0.0, weight * d_diff, 0.0)
    s_a = tl.where(up_a, s_a * e_a + 1.0, s_a + e_a)
    s_b = tl.where(up_b, s_b * e_b + 1.0, s_b + e_b)
    return m_a_new, s_a, m_b_new, s_b, acc


@triton.jit
def kl_finalize(m_a, s_a, m_b, s_b, acc, inv_temperature):
    """(max_a, logsum_a, max_b, logsum_b, KL(P_a || P_b)) from the per-lane state of online_kl_update:
    KL = sum_v P_a (log P_a - log P_b) = acc / S_a - logsum_a + logsum_b once every lane is moved to
    the row maxima."""
    max_a, logsum_a = lse_finalize(m_a, s_a, inv_temperature)
    max_b, logsum_b = lse_finalize(m_b, s_b, inv_temperature)
    shift_a = tl.where(m_a == NEG_INF, 0.0, (m_a - max_a) * inv_temperature)
    shift_b = tl.where(m_b == NEG_INF, 0.0, (m_b - max_b) * inv_temperature)
    r_a = tl.where(m_a == NEG_INF, 0.0, tl.exp(shift_a))
    acc_row = tl.sum(move_kl_acc(acc, r_a, shift_a - shift_b, s_a), 0)
    return max_a, logsum_a, max_b, logsum_b, acc_row / tl.exp(logsum_a) - logsum_a + logsum_b


@triton.jit
def teacher_logprobs(y, max_t, logsum_t, inv_temperature, TARGET: tl.constexpr):
    """log p (fp32): (y - max_t)/T - logsum_t for logits; y for log-probs; log y for probabilities."""
    y = y.to(tl.float32)
    if TARGET == LOGITS:
        lp = (y - max_t) * inv_temperature - logsum_t
    elif TARGET == LOGPROBS:
        lp = y
    else:
        lp = tl.log(y)
    return lp


@triton.jit
def teacher_check_terms(y, lp, inside, TARGET: tl.constexpr):
    """(top, p) per entry of a teacher given as log-probs or probabilities (y as stored, 0 outside the row; lp its
    log p, -inf outside; inside: the row's entries): the entry that must not be positive, log p (log-probs) or -p
    (probs), -inf outside, and p. Their max and sum over a row are what the check that it is normalized reads
    (klops._inputs.check_teacher_rows), from max_t and logsum_t = log sum_v p_v; a NaN entry makes the sum NaN."""
    if TARGET == LOGPROBS:
        top = lp
        p = tl.exp(lp)
    else:
        p = y.to(tl.float32)
        top = tl.where(inside, -p, NEG_INF)
    return top, p


@triton.jit
def divergence_terms(lq, lp, coef, KIND: tl.constexpr):
    """Per-entry (loss_v, a_v) of docs/losses.md §1; coef is beta (jsd) or alpha (skew_*, alpha).

    The mixtures of jsd / skew_* are logs of the mixed probabilities, log(w p + (1 - w) q): one log
    where logaddexp of the log-probabilities costs an exp and a log. They are -inf only where p and q
    are both 0 in fp32 (underflowed), and every term they enter is guarded by p > 0 or q > 0.
    """
    q = tl.exp(lq)
    p = tl.exp(lp)
    q_pos = lq != NEG_INF
    p_pos = lp != NEG_INF
    if KIND == FORWARD:  # sum p (log p - log q); g = -u. p = 0 adds nothing, even for a finite lp that underflows.
        loss = tl.where(p > 0.0, p * (lp - lq), 0.0)
        a = -p
    elif KIND == REVERSE:  # sum q (log q - log p); g = log q - log p + const
        loss = tl.where(q > 0.0, q * (lq - lp), 0.0)
        a = loss
    elif KIND == JSD:  # m = beta p + (1-beta) q; beta KL(p||m) + (1-beta) KL(q||m)
        lm = tl.log(coef * p + (1.0 - coef) * q)
        kl_qm = tl.where(q > 0.0, q * (lq - lm), 0.0)
        loss = coef * tl.where(p > 0.0, p * (lp - lm), 0.0) + (1.0 - coef) * kl_qm
        a = (1.0 - coef) * kl_qm
    elif KIND == SKEW_FORWARD:  # m = alpha p + (1-alpha) q; KL(p||m); g = -(1-alpha) p/m
        lm = tl.log(coef * p + (1.0 - coef) * q)
        loss = tl.where(p > 0.0, p * (lp - lm), 0.0)
        a = tl.where((p > 0.0) & (q > 0.0), -(1.0 - coef) * tl.exp(lp + lq - lm), 0.0)
    elif KIND == SKEW_REVERSE:  # n = (1-alpha) p + alpha q; KL(q||n); g = log(q/n) + 1 - alpha q/n
        log_qn = tl.where(q > 0.0, lq - tl.log((1.0 - coef) * p + coef * q), 0.0)
        loss = q * log_qn
        a = q * (log_qn + 1.0 - coef * tl.exp(log_qn))
    elif KIND == TV:  # 0.5 sum |p - q|; g = 0.5 sign(q - p)
        loss = 0.5 * tl.abs(p - q)
        a = 0.5 * q * tl.where(q > p, 1.0, tl.where(q < p, -1.0, 0.0))
    else:  # ALPHA (Amari): (1 - sum p^a q^(1-a)) / (a (1-a)); g = -u^a / a
        tl.static_assert(KIND == ALPHA, "a kind of kernels/kinds.py without its terms here")
        # Entries where p = q = 0 carry no mass (and would give -inf + inf in the exponent).
        w = tl.where(p_pos | q_pos, tl.exp(coef * lp + (1.0 - coef) * lq), 0.0)
        loss = (q - w) / (coef * (1.0 - coef))
        a = -w / coef
    return loss, a


@triton.jit
def divergence_forward_kernel(
    # data ptrs
    z_ptr,  # (B, L, V) student logits, last-dim stride 1
    y_ptr,  # (B, L, V) teacher logits / log-probs / probs, last-dim stride 1
    valid_ptr,  # (B*L,) bool: False rows get D = 0
    loss_ptr,  # (B*L,) fp32 out: D per row
    max_q_ptr,  # (B*L,) fp32 out: raw row max of z
    logsum_q_ptr,  # (B*L,) fp32 out: log sum exp((z - max_q)/T)
    max_t_ptr,  # (B*L,) fp32 out: the same for teacher logits; for other targets max_v log p_v or max_v -p_v
    logsum_t_ptr,  # (B*L,) fp32 out; for other targets log sum_v p_v (teacher_check_terms)
    gbar_ptr,  # (B*L,) fp32 out
    # shapes
    L,
    V,
    # strides
    stride_zb,
    stride_zl,
    stride_yb,
    stride_yl,
    # constants
    inv_temperature,
    coef,
    KIND: tl.constexpr,
    TARGET: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if tl.load(valid_ptr + row) == 0:
        tl.store(loss_ptr + row, 0.0)
        tl.store(max_q_ptr + row, 0.0)
        tl.store(logsum_q_ptr + row, 0.0)
        tl.store(max_t_ptr + row, 0.0)
        tl.store(logsum_t_ptr + row, 0.0)
        tl.store(gbar_ptr + row, 0.0)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    y_row = y_ptr + (row // L) * stride_yb + (row % L) * stride_yl
    cols = tl.arange(0, BLOCK_V)

    # Sweep 1: (max, logsum) of the student row, and of the teacher row when it is logits. Forward and
    # reverse KL between two logit rows also get D here (online_kl_update), so they skip sweep 2.
    m_q = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_q = tl.zeros([BLOCK_V], tl.float32)
    m_t = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_t = tl.zeros([BLOCK_V], tl.float32)
    kl_acc = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
        if TARGET == LOGITS:
            y = tl.load(y_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
            if KIND == FORWARD:  # KL(p || q): weights p
                m_t, s_t, m_q, s_q, kl_acc = online_kl_update(m_t, s_t, m_q, s_q, kl_acc, y, z, inv_temperature)
            elif KIND == REVERSE:  # KL(q || p): weights q
                m_q, s_q, m_t, s_t, kl_acc = online_kl_update(m_q, s_q, m_t, s_t, kl_acc, z, y, inv_temperature)
            else:
                m_q, s_q = online_lse_update(m_q, s_q, z, inv_temperature)
                m_t, s_t = online_lse_update(m_t, s_t, y, inv_temperature)
        else:
            m_q, s_q = online_lse_update(m_q, s_q, z, inv_temperature)

    if (TARGET == LOGITS) and (KIND == FORWARD):
        max_t, logsum_t, max_q, logsum_q, loss = kl_finalize(m_t, s_t, m_q, s_q, kl_acc, inv_temperature)
        gbar = -1.0  # sum_v q_v g_v = -sum_v p_v
    elif (TARGET == LOGITS) and (KIND == REVERSE):
        max_q, logsum_q, max_t, logsum_t, loss = kl_finalize(m_q, s_q, m_t, s_t, kl_acc, inv_temperature)
        gbar = loss  # sum_v q_v (log q_v - log p_v)
    else:
        max_q, logsum_q = lse_finalize(m_q, s_q, inv_temperature)
        max_t = 0.0
        logsum_t = 0.0
        if TARGET == LOGITS:  # log-probs and probs are taken as given, not renormalized
            max_t, logsum_t = lse_finalize(m_t, s_t, inv_temperature)
        # Sweep 2: D = sum loss_v, gbar = sum a_v; and the check statistics of a teacher given as log-probs / probs.
        loss_acc = tl.zeros([BLOCK_V], tl.float32)
        gbar_acc = tl.zeros([BLOCK_V], tl.float32)
        top_acc = tl.full([BLOCK_V], NEG_INF, tl.float32)
        mass_acc = tl.zeros([BLOCK_V], tl.float32)
        for start in range(0, V, BLOCK_V):
            mask = start + cols < V
            z = tl.load(z_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
            y = tl.load(y_row + start + cols, mask=mask, other=0.0)
            lq = (z - max_q) * inv_temperature - logsum_q
            lp = tl.where(mask, teacher_logprobs(y, max_t, logsum_t, inv_temperature, TARGET), NEG_INF)
            entry_loss, a = divergence_terms(lq, lp, coef, KIND)
            loss_acc += entry_loss
            gbar_acc += a
            if TARGET != LOGITS:
                top, p = teacher_check_terms(y, lp, mask, TARGET)
                top_acc = tl.maximum(top_acc, top)
                mass_acc += p
        loss = tl.sum(loss_acc, 0)
        gbar = tl.sum(gbar_acc, 0)
        if TARGET != LOGITS:
            max_t = tl.max(top_acc, 0)
            logsum_t = tl.log(tl.sum(mass_acc, 0))
    tl.store(loss_ptr + row, loss)
    tl.store(max_q_ptr + row, max_q)
    tl.store(logsum_q_ptr + row, logsum_q)
    tl.store(max_t_ptr + row, max_t)
    tl.store(logsum_t_ptr + row, logsum_t)
    tl.store(gbar_ptr + row, gbar)


@triton.jit
def divergence_backward_kernel(
    # data ptrs
    grad_ptr,  # (B*L,) fp32: dLoss/dD per row
    grad_logp_ptr,  # (B*L,) fp32: dLoss/dlogp per row (WITH_LABELS only)
    z_ptr,  # (B, L, V) student logits
    y_ptr,  # (B, L, V) teacher
    valid_ptr,  # (B*L,) bool
    labels_ptr,  # (B*L,) int64 (WITH_LABELS only)
    max_q_ptr,  # (B*L,) fp32: the forward's row statistics
    logsum_q_ptr,  # (B*L,) fp32
    max_t_ptr,  # (B*L,) fp32
    logsum_t_ptr,  # (B*L,) fp32
    gbar_ptr,  # (B*L,) fp32
    dz_ptr,  # (B*L, V) out, contiguous, student dtype
    # shapes
    L,
    V,
    # strides
    stride_zb,
    stride_zl,
    stride_yb,
    stride_yl,
    # constants
    inv_temperature,
    coef,
    KIND: tl.constexpr,
    TARGET: tl.constexpr,
    WITH_LABELS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dz_row = dz_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    if tl.load(valid_ptr + row) == 0:
        zero_row(dz_row, V, BLOCK_V)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    y_row = y_ptr + (row // L) * stride_yb + (row % L) * stride_yl
    max_q = tl.load(max_q_ptr + row)
    logsum_q = tl.load(logsum_q_ptr + row)
    max_t = tl.load(max_t_ptr + row)
    logsum_t = tl.load(logsum_t_ptr + row)
    gbar = tl.load(gbar_ptr + row)
    scale = tl.load(grad_ptr + row) * inv_temperature
    scale_logp = 0.0
    label = -1
    if WITH_LABELS:
        scale_logp = tl.load(grad_logp_ptr + row) * inv_temperature
        label = tl.load(labels_ptr + row)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
        y = tl.load(y_row + start + cols, mask=mask, other=0.0)
        lq = (z - max_q) * inv_temperature - logsum_q
        lp = tl.where(mask, teacher_logprobs(y, max_t, logsum_t, inv_temperature, TARGET), NEG_INF)
        _, a = divergence_terms(lq, lp, coef, KIND)
        q = tl.exp(lq)
        dz = scale * (a - q * gbar)
        if WITH_LABELS:  # + the label's log-prob: d log q(label) / dz = (onehot(label) - q) / T
            dz += scale_logp * (tl.where(start + cols == label, 1.0, 0.0) - q)
        tl.store(dz_row + start + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def _kind_args(kind: str, target_is: str, temperature: float, coef: float) -> dict:
    return dict(
        inv_temperature=1.0 / temperature,
        coef=coef,
        KIND=DIVERGENCE_KINDS.index(kind),
        TARGET=TARGET_KINDS.index(target_is),
    )


def _or_placeholder(tensor, placeholder):
    """tensor (contiguous), or a placeholder pointer for an argument the kernel variant never reads."""
    return placeholder if tensor is None else tensor.contiguous()


def divergence_forward(
    student: torch.Tensor,  # (B, L, V)
    teacher: torch.Tensor,  # (B, L, V)
    valid: torch.Tensor,  # (B, L) bool
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward: returns (D, max_q, logsum_q, max_t, logsum_t, gbar), each (B, L) fp32 (max_t / logsum_t
    of a teacher given as log-probs or probs: the statistics of its check, teacher_check_terms)."""
    B, L, V = student.shape
    outputs = tuple(torch.empty((B, L), dtype=torch.float32, device=student.device) for _ in range(6))
    launch_over_rows(
        divergence_forward_kernel, student,
        student, teacher, valid.contiguous(), *outputs,
        L, V,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        **_kind_args(kind, target_is, temperature, coef), sweep=FORWARD_SWEEP,
    )  # fmt: skip
    return outputs


def divergence_backward(
    grad: torch.Tensor,  # (B, L) fp32
    grad_logp: torch.Tensor | None,  # (B, L) fp32
    student: torch.Tensor,  # (B, L, V)
    teacher: torch.Tensor,  # (B, L, V)
    valid: torch.Tensor,  # (B, L) bool
    labels: torch.Tensor | None,  # (B, L) int64
    max_q: torch.Tensor,  # (B, L) fp32
    logsum_q: torch.Tensor,  # (B, L) fp32
    max_t: torch.Tensor,  # (B, L) fp32
    logsum_t: torch.Tensor,  # (B, L) fp32
    gbar: torch.Tensor,  # (B, L) fp32
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
) -> torch.Tensor:
    """Launch the backward: grad dD/dz + grad_logp dlogp/dz per row (the second term with labels and
    grad_logp only), (B, L, V) in the student's dtype."""
    B, L, V = student.shape
    dz = torch.empty((B, L, V), dtype=student.dtype, device=student.device)
    labels = labels if grad_logp is not None else None
    launch_over_rows(
        divergence_backward_kernel, student,
        grad.contiguous(), _or_placeholder(grad_logp, grad), student, teacher, valid.contiguous(),
        _or_placeholder(labels, valid), *(t.contiguous() for t in (max_q, logsum_q, max_t, logsum_t, gbar)), dz,
        L, V,
        student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1),
        **_kind_args(kind, target_is, temperature, coef), WITH_LABELS=labels is not None, sweep=BACKWARD_SWEEP,
    )  # fmt: skip
    return dz
