"""Triton kernels for AKL's adaptive weights (Wu et al. 2024; docs/losses.md §6) and the forward / reverse KL
pair, one program per row.

AKL splits the teacher's vocabulary at cumulative mass mu: sorting p = softmax(y/T) in descending order,
the head is the first entry and every entry whose running sum is <= mu, the tail the rest; with
q = softmax(z/T), g_head = sum_head |p - q|, g_tail = sum_tail |p - q|, and the row's forward-KL weight is
w = g_head / (g_head + g_tail) (the reverse KL's 1 - w; 1/2 when p = q).

No sort: the entry at which the descending running sum first exceeds mu is the one of largest p with
F(p) = sum_{p_u >= p} p_u > mu, and the head is {p_v > that p} plus the argmax. Entries tied with it (bf16
logits tie often) count in the head in the proportion that fits under mu, the average over the orders a sort
could give them, so that the weight does not depend on how a sort breaks ties. Its p is found exactly by a
radix select on the fp32 bit pattern of p (for p >= 0 the bits order like the values), 4 bits per sweep
over the teacher row: per sweep the mass of the entries that match the prefix found so far is binned by
their next 4 bits (16 bins), and the bin where the mass above crosses mu extends the prefix. Sweeps: 1 for
both rows' (max, log-sum-exp), 8 for the 32 bits (teacher only), 1 for the gaps (both rows): 10 reads of
the teacher row and 2 of the student's, one exp per entry each.

The first sweep also accumulates KL(p || q) and KL(q || p) online (online_kl_update, the two sharing their
exps), so both KLs cost no further read (without AKL_WEIGHTS, for forward_reverse_kl, that sweep is all the
kernel does); 7 fp32 out per row. The backward is one sweep of both rows writing
dz = (g_pq (q - p) + g_qp q (log q - log p - KL(q || p))) / T for the upstream grads g of the two KLs.
"""

import torch
import triton
import triton.language as tl

from .divergence import NEG_INF, kl_finalize, online_kl_update, zero_row
from .launch import BACKWARD_SWEEP, FORWARD_SWEEP, launch_over_rows

# (BLOCK_V, num_warps): the radix sweeps bin each block into 16 sums, a [BLOCK_V, 16] selection; at 2 entries
# per thread the kernel takes 112 registers on sm_90 (the weights alone at 4 per thread took 190).
AKL_SWEEP = (512, 8)
RADIX_BITS = tl.constexpr(4)


@triton.jit
def teacher_probs_and_keys(y_row, start, cols, V, max_p, logsum_p, inv_temperature):
    """(p, its fp32 bits as int64) of a block of the teacher row; 0 outside the row."""
    y = tl.load(y_row + start + cols, mask=start + cols < V, other=NEG_INF).to(tl.float32)
    p = tl.exp((y - max_p) * inv_temperature - logsum_p)
    return p, p.to(tl.int32, bitcast=True).to(tl.int64)


@triton.jit
def akl_weight(z_row, y_row, cols, V, max_q, logsum_q, max_p, logsum_p, inv_temperature, mu, BLOCK_V: tl.constexpr):
    """[1] fp32 forward-KL weight of a row from both rows' (max, log-sum-exp): 8 radix sweeps of the teacher row,
    then one sweep of both rows for the gaps."""
    digits = tl.arange(0, 16)
    prefix = tl.zeros([1], tl.int64)
    above = tl.zeros([1], tl.float32)  # teacher mass of the entries above the prefix's range
    for level in tl.static_range(8):
        shift = 28 - RADIX_BITS * level
        bins = tl.zeros([16], tl.float32)
        for start in range(0, V, BLOCK_V):
            p, key = teacher_probs_and_keys(y_row, start, cols, V, max_p, logsum_p, inv_temperature)
            match = (key >> (shift + RADIX_BITS)) == prefix
            pick = match[:, None] & (((key >> shift) & 15)[:, None] == digits[None, :])
            bins += tl.sum(tl.where(pick, p[:, None], 0.0), 0)
        # mass from digit d up, plus above: decreasing in d; the crossing digit is the last one over mu
        suffix = tl.sum(tl.where(digits[None, :] >= digits[:, None], bins[None, :], 0.0), 1)
        crossing = tl.maximum(tl.sum((above + suffix > mu).to(tl.int32), 0) - 1, 0)
        above += tl.sum(tl.where(digits > crossing, bins, 0.0), 0)
        prefix = (prefix << RADIX_BITS) | crossing.to(tl.int64)

    # The boundary entry's key is the prefix; entries above it are head (and the argmax always is). Entries tied
    # with it count in the head in the proportion of them that fit under mu: the average over the orders a sort
    # may give them (without a tie, none fits: the boundary entry is tail, as in the authors' code).
    top_key = tl.exp(-logsum_p).to(tl.int32, bitcast=True).to(tl.int64)  # the argmax's p, computed as below
    g_head = tl.zeros([BLOCK_V], tl.float32)
    g_tie = tl.zeros([BLOCK_V], tl.float32)
    g_all = tl.zeros([BLOCK_V], tl.float32)
    n_tie = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        p, key = teacher_probs_and_keys(y_row, start, cols, V, max_p, logsum_p, inv_temperature)
        z = tl.load(z_row + start + cols, mask=start + cols < V, other=NEG_INF).to(tl.float32)
        gap = tl.abs(p - tl.exp((z - max_q) * inv_temperature - logsum_q))
        tie = (key == prefix) & (start + cols < V)
        g_head += tl.where(key > prefix, gap, 0.0)
        g_tie += tl.where(tie, gap, 0.0)
        n_tie += tie.to(tl.float32)
        g_all += gap
    ties = tl.sum(n_tie, 0)
    p_boundary = prefix.to(tl.int32).to(tl.float32, bitcast=True)
    fit = tl.minimum(tl.maximum(tl.floor((mu - above) / p_boundary), 0.0), ties)
    fit = tl.where(prefix == top_key, tl.maximum(fit, 1.0), fit)
    head_sum = tl.sum(g_head, 0) + tl.where(ties > 0, fit / ties, 0.0) * tl.sum(g_tie, 0)
    total = tl.sum(g_all, 0)
    return tl.where(total > 0, head_sum / total, 0.5)


@triton.jit
def kl_pair_forward_kernel(
    z_ptr,  # (B, L, V) student logits, last-dim stride 1
    y_ptr,  # (B, L, V) teacher logits
    valid_ptr,  # (B*L,) bool
    w_ptr,  # (B*L,) fp32 out (AKL_WEIGHTS): AKL's forward-KL weight (0 for invalid rows)
    kl_ptr,  # (B*L, 6) fp32 out: KL(p||q), KL(q||p), max_q, logsum_q, max_p, logsum_p (0 for invalid rows)
    L,
    V,
    stride_zb,
    stride_zl,
    stride_yb,
    stride_yl,
    inv_temperature,
    mu,
    AKL_WEIGHTS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    if not tl.load(valid_ptr + row):
        if AKL_WEIGHTS:
            tl.store(w_ptr + row, 0.0)
        tl.store(kl_ptr + row * 6 + tl.arange(0, 8), tl.zeros([8], tl.float32), mask=tl.arange(0, 8) < 6)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    y_row = y_ptr + (row // L) * stride_yb + (row % L) * stride_yl
    cols = tl.arange(0, BLOCK_V)
    m_q = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_q = tl.zeros([BLOCK_V], tl.float32)
    m_p = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s_p = tl.zeros([BLOCK_V], tl.float32)
    kl_pq = tl.zeros([BLOCK_V], tl.float32)
    kl_qp = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(z_row + start + cols, mask=in_row, other=NEG_INF).to(tl.float32)
        y = tl.load(y_row + start + cols, mask=in_row, other=NEG_INF).to(tl.float32)
        # both KLs from the lanes' state before this block (the two calls' exps are the same)
        _, _, _, _, kl_qp = online_kl_update(m_q, s_q, m_p, s_p, kl_qp, z, y, inv_temperature)
        m_p, s_p, m_q, s_q, kl_pq = online_kl_update(m_p, s_p, m_q, s_q, kl_pq, y, z, inv_temperature)
    max_p, logsum_p, max_q, logsum_q, kl_pq_row = kl_finalize(m_p, s_p, m_q, s_q, kl_pq, inv_temperature)
    _, _, _, _, kl_qp_row = kl_finalize(m_q, s_q, m_p, s_p, kl_qp, inv_temperature)
    out = kl_ptr + row * 6
    tl.store(out, kl_pq_row)
    tl.store(out + 1, kl_qp_row)
    tl.store(out + 2, max_q)
    tl.store(out + 3, logsum_q)
    tl.store(out + 4, max_p)
    tl.store(out + 5, logsum_p)
    if AKL_WEIGHTS:
        w = akl_weight(z_row, y_row, cols, V, max_q, logsum_q, max_p, logsum_p, inv_temperature, mu, BLOCK_V)
        tl.store(w_ptr + row + tl.arange(0, 1), w)


@triton.jit
def kl_pair_backward_kernel(
    grad_ptr,  # (B*L, 2) fp32: dLoss/dKL(p||q), dLoss/dKL(q||p) per row
    z_ptr,  # (B, L, V) student logits, last-dim stride 1
    y_ptr,  # (B, L, V) teacher logits
    valid_ptr,  # (B*L,) bool
    kl_ptr,  # (B*L, 6) fp32: the forward's KL(p||q), KL(q||p), max_q, logsum_q, max_p, logsum_p
    dz_ptr,  # (B*L, V) out, contiguous, student dtype
    L,
    V,
    stride_zb,
    stride_zl,
    stride_yb,
    stride_yl,
    inv_temperature,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dz_row = dz_ptr + row * V
    if not tl.load(valid_ptr + row):
        zero_row(dz_row, V, BLOCK_V)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    y_row = y_ptr + (row // L) * stride_yb + (row % L) * stride_yl
    cols = tl.arange(0, BLOCK_V)
    stats = kl_ptr + row * 6
    kl_qp = tl.load(stats + 1)
    max_q = tl.load(stats + 2)
    logsum_q = tl.load(stats + 3)
    max_p = tl.load(stats + 4)
    logsum_p = tl.load(stats + 5)
    scale_pq = tl.load(grad_ptr + row * 2) * inv_temperature
    scale_qp = tl.load(grad_ptr + row * 2 + 1) * inv_temperature
    for start in range(0, V, BLOCK_V):
        in_row = start + cols < V
        z = tl.load(z_row + start + cols, mask=in_row, other=NEG_INF).to(tl.float32)
        y = tl.load(y_row + start + cols, mask=in_row, other=NEG_INF).to(tl.float32)
        lq = (z - max_q) * inv_temperature - logsum_q
        lp = (y - max_p) * inv_temperature - logsum_p
        q = tl.exp(lq)
        reverse = tl.where(q > 0.0, q * (lq - lp - kl_qp), 0.0)  # q = 0 adds nothing, even where lp = -inf
        dz = scale_pq * (q - tl.exp(lp)) + scale_qp * reverse
        tl.store(dz_row + start + cols, dz.to(dz_ptr.dtype.element_ty), mask=in_row)


def _rows_args(student, teacher):
    B, L, V = student.shape
    return L, V, student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1)


def kl_pair_forward(student, teacher, valid, temperature: float, mu: float, akl_weights: bool):
    """(B*L,) fp32 AKL weights (with ``akl_weights``; else 0) and (B*L, 6) fp32 (KL(p||q), KL(q||p), max_q,
    logsum_q, max_p, logsum_p) of (B, L, V) logits."""
    rows = student.shape[0] * student.shape[1]
    w = torch.zeros(rows, dtype=torch.float32, device=student.device)
    stats = torch.empty((rows, 6), dtype=torch.float32, device=student.device)
    launch_over_rows(
        kl_pair_forward_kernel, student, student, teacher, valid.reshape(-1), w, stats, *_rows_args(student, teacher),
        1.0 / temperature, mu, AKL_WEIGHTS=akl_weights, sweep=AKL_SWEEP if akl_weights else FORWARD_SWEEP,
    )  # fmt: skip
    return w, stats


def kl_pair_backward(grad, student, teacher, valid, stats, temperature: float):
    """(B, L, V) gradient of the student logits (its dtype) from the (B*L, 2) fp32 grads of both KLs."""
    dz = torch.empty(student.shape, dtype=student.dtype, device=student.device)
    launch_over_rows(
        kl_pair_backward_kernel, student, grad.contiguous(), student, teacher, valid.reshape(-1), stats, dz,
        *_rows_args(student, teacher), 1.0 / temperature, sweep=BACKWARD_SWEEP,
    )  # fmt: skip
    return dz
