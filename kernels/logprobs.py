"""Triton kernels for log-softmax-gather and entropy (docs/losses.md §2), one program per row.

With q = softmax(z/T), y the label of the row, max = max_v z_v (raw units) and
logsum = log sum_v exp((z_v - max)/T), so that log q = (z - max)/T - logsum:

    logprob = (z_y - max)/T - logsum        d logprob / dz_j = (1[j = y] - q_j) / T
    entropy = -sum_v q_v log q_v            d entropy / dz_j = -q_j (log q_j + entropy) / T

With WITH_STATS, three more per-row outputs without gradient (TRL's fused LM head returns them):

    log_sum_sq = log sum_v q_v^2 = log sum_v exp((z_v - max) 2/T) - 2 logsum
    mean_logit = sum_v z_v / (T V)
    is_top1    = 1.0 iff y is the row's first argmax: z_y >= max and z_y > max_{j < y} z_j, else 0.0

Forward: one sweep keeps per-lane running raw max m, s = sum exp(d) and, for the entropy,
w = sum exp(d) d with d = (z - m)/T (relative to the max, so logits of magnitude 1e4 lose no
precision); then entropy = log s - w / s. WITH_STATS adds per lane s2 = sum exp(2 d) (the square of
the same exp: still one exp per entry), sum z and the max of the entries before the label. It reads
V logits and writes 3 fp32 per row (4 with the entropy, 3 more with the stats). Backward: one sweep
from the saved max, logsum, entropy: it reads V logits and writes V gradient entries per row. Rows
whose label is ignore_index get 0 in every output and a zero gradient.
"""

import torch
import triton
import triton.language as tl

from .divergence import NEG_INF, finite_or_zero, lse_finalize, online_lse_update, zero_row
from .launch import BACKWARD_SWEEP, FORWARD_SWEEP, launch_over_rows


@triton.jit
def online_entropy_update(m, s, w, x, inv_temperature):
    """online_lse_update that also keeps w = sum exp(d) d, d = (x - m) / T, relative to the lane's
    running max m, with the same one exp per entry: on a new max x, with d = (m - x) / T the shift of
    the earlier terms, w' = exp(d) (w + d s) (d taken as 0 for an empty lane) and the entry adds
    exp(0) 0; otherwise w' = w + exp(d) d with d = (x - m) / T (nothing for x = -inf)."""
    up = x > m
    m_new = tl.where(up, x, m)
    d = (tl.where(up, m, x) - finite_or_zero(m_new)) * inv_temperature
    e = tl.exp(d)
    d_safe = finite_or_zero(d)
    w = tl.where(up, e * (w + d_safe * s), w + e * d_safe)
    return m_new, tl.where(up, s * e + 1.0, s + e), w


@triton.jit
def online_sq_update(m, s2, x, inv_temperature):
    """s2 = sum exp((x - m) 2 / T) relative to the lane's running max m, taken before online_lse_update /
    online_entropy_update move m for the same entry x: its exp is theirs (the same expression, merged by the
    compiler), squared. On a new max x, s2' = s2 exp((m - x) / T)^2 + 1; else s2' = s2 + exp((x - m) / T)^2."""
    up = x > m
    e = tl.exp((tl.where(up, m, x) - finite_or_zero(tl.where(up, x, m))) * inv_temperature)
    return tl.where(up, s2 * (e * e) + 1.0, s2 + e * e)


@triton.jit
def entropy_finalize(m, s, w, max_x, logsum, inv_temperature):
    """-sum q log q = logsum - W / S from the per-lane (m, s, w), once moved to the row max."""
    shift = tl.where(m == NEG_INF, 0.0, (m - max_x) * inv_temperature)
    rescale = tl.exp((m - max_x) * inv_temperature)
    w_row = tl.sum(rescale * (w + shift * s), 0)
    return logsum - w_row / tl.sum(s * rescale, 0)


@triton.jit
def logprobs_forward_kernel(
    # data ptrs
    z_ptr,  # (B, L, V) logits, last-dim stride 1
    labels_ptr,  # (B*L,) int
    logp_ptr,  # (B*L,) fp32 out
    entropy_ptr,  # (B*L,) fp32 out (untouched unless WITH_ENTROPY)
    max_ptr,  # (B*L,) fp32 out: raw row max of z
    logsum_ptr,  # (B*L,) fp32 out: log sum exp((z - max)/T)
    log_sum_sq_ptr,  # (B*L,) fp32 out: log sum q^2 (untouched unless WITH_STATS)
    mean_logit_ptr,  # (B*L,) fp32 out: sum z / (T V) (untouched unless WITH_STATS)
    is_top1_ptr,  # (B*L,) fp32 out: 1.0 iff the label is the first argmax (untouched unless WITH_STATS)
    # shapes
    L,
    V,
    # strides
    stride_zb,
    stride_zl,
    # constants
    inv_temperature,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    WITH_STATS: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        tl.store(logp_ptr + row, 0.0)
        tl.store(max_ptr + row, 0.0)
        tl.store(logsum_ptr + row, 0.0)
        if WITH_ENTROPY:
            tl.store(entropy_ptr + row, 0.0)
        if WITH_STATS:
            tl.store(log_sum_sq_ptr + row, 0.0)
            tl.store(mean_logit_ptr + row, 0.0)
            tl.store(is_top1_ptr + row, 0.0)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    w = tl.zeros([BLOCK_V], tl.float32)
    s2 = tl.zeros([BLOCK_V], tl.float32)
    z_sum = tl.zeros([BLOCK_V], tl.float32)
    before = tl.full([BLOCK_V], NEG_INF, tl.float32)  # max of the entries before the label
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
        if WITH_STATS:  # from m before this entry's update
            s2 = online_sq_update(m, s2, z, inv_temperature)
            z_sum += tl.where(mask, z, 0.0)
            before = tl.maximum(before, tl.where(start + cols < label, z, NEG_INF))
        if WITH_ENTROPY:
            m, s, w = online_entropy_update(m, s, w, z, inv_temperature)
        else:
            m, s = online_lse_update(m, s, z, inv_temperature)
    max_z, logsum = lse_finalize(m, s, inv_temperature)
    # A label outside [0, V) (possible only if the caller's device-side check was skipped) is never
    # read: its log-prob is NaN.
    z_label = tl.load(z_row + label, mask=(label >= 0) & (label < V), other=float("nan")).to(tl.float32)
    tl.store(logp_ptr + row, (z_label - max_z) * inv_temperature - logsum)
    tl.store(max_ptr + row, max_z)
    tl.store(logsum_ptr + row, logsum)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, entropy_finalize(m, s, w, max_z, logsum, inv_temperature))
    if WITH_STATS:
        rescale = tl.exp((m - max_z) * inv_temperature)  # s2 moved to the row max: times rescale^2
        tl.store(log_sum_sq_ptr + row, tl.log(tl.sum(s2 * (rescale * rescale), 0)) - 2.0 * logsum)
        tl.store(mean_logit_ptr + row, tl.sum(z_sum, 0) * inv_temperature / V)
        is_top1 = (z_label >= max_z) & (z_label > tl.max(before, 0))
        tl.store(is_top1_ptr + row, tl.where(is_top1, 1.0, 0.0))


@triton.jit
def logprobs_backward_kernel(
    # data ptrs
    grad_logp_ptr,  # (B*L,) fp32
    grad_entropy_ptr,  # (B*L,) fp32 (unused unless WITH_ENTROPY)
    z_ptr,  # (B, L, V) logits
    labels_ptr,  # (B*L,) int
    max_ptr,  # (B*L,) fp32
    logsum_ptr,  # (B*L,) fp32
    entropy_ptr,  # (B*L,) fp32 (unused unless WITH_ENTROPY)
    dz_ptr,  # (B*L, V) out, contiguous, logits dtype
    # shapes
    L,
    V,
    # strides
    stride_zb,
    stride_zl,
    # constants
    inv_temperature,
    ignore_index,
    WITH_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    dz_row = dz_ptr + row * V
    cols = tl.arange(0, BLOCK_V)
    label = tl.load(labels_ptr + row).to(tl.int64)
    if label == ignore_index:
        zero_row(dz_row, V, BLOCK_V)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    max_z = tl.load(max_ptr + row)
    logsum = tl.load(logsum_ptr + row)
    g_logp = tl.load(grad_logp_ptr + row) * inv_temperature
    if WITH_ENTROPY:
        g_entropy = tl.load(grad_entropy_ptr + row) * inv_temperature
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
        log_q = (z - max_z) * inv_temperature - logsum
        q = tl.exp(log_q)
        dz = g_logp * (tl.where(start + cols == label, 1.0, 0.0) - q)
        if WITH_ENTROPY:
            dz -= g_entropy * tl.where(q > 0.0, q * (log_q + entropy), 0.0)
        tl.store(dz_row + start + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def logprobs_forward(
    logits: torch.Tensor,  # (B, L, V)
    labels: torch.Tensor,  # (B, L) int
    temperature: float,
    with_entropy: bool,
    with_stats: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward: returns (logprob, entropy, max, logsum, log_sum_sq, mean_logit, is_top1), each
    (B, L) fp32 (entropy 0 unless with_entropy, the last three 0 unless with_stats)."""
    B, L, V = logits.shape

    def rows(written: bool) -> torch.Tensor:
        return (torch.empty if written else torch.zeros)((B, L), dtype=torch.float32, device=logits.device)

    logp, max_z, logsum = rows(True), rows(True), rows(True)
    entropy = rows(with_entropy)
    log_sum_sq, mean_logit, is_top1 = rows(with_stats), rows(with_stats), rows(with_stats)
    launch_over_rows(
        logprobs_forward_kernel, logits,
        logits, labels.contiguous(), logp, entropy, max_z, logsum, log_sum_sq, mean_logit, is_top1,
        L, V,
        logits.stride(0), logits.stride(1),
        1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, WITH_STATS=with_stats, sweep=FORWARD_SWEEP,
    )  # fmt: skip
    return logp, entropy, max_z, logsum, log_sum_sq, mean_logit, is_top1


def logprobs_backward(
    grad_logp: torch.Tensor,  # (B, L) fp32
    grad_entropy: torch.Tensor,  # (B, L) fp32
    logits: torch.Tensor,  # (B, L, V)
    labels: torch.Tensor,  # (B, L) int
    max_z: torch.Tensor,  # (B, L) fp32
    logsum: torch.Tensor,  # (B, L) fp32
    entropy: torch.Tensor,  # (B, L) fp32
    temperature: float,
    with_entropy: bool,
    ignore_index: int,
) -> torch.Tensor:
    """Launch the backward: returns the logits gradient, (B, L, V) in the logits' dtype."""
    B, L, V = logits.shape
    dz = torch.empty((B, L, V), dtype=logits.dtype, device=logits.device)
    launch_over_rows(
        logprobs_backward_kernel, logits,
        grad_logp.contiguous(), grad_entropy.contiguous(), logits, labels.contiguous(),
        max_z.contiguous(), logsum.contiguous(), entropy.contiguous(), dz,
        L, V,
        logits.stride(0), logits.stride(1),
        1.0 / temperature, ignore_index,
        WITH_ENTROPY=with_entropy, sweep=BACKWARD_SWEEP,
    )  # fmt: skip
    return dz
