"""Triton kernels for batched log-domain Sinkhorn and SinKD's cost (docs/losses.md §5).

Soft-min update of one side of a batch of problems: for each problem b and row i,

    t_ij  = log w_j + (h_j - C_ij) / eps
    out_i = -eps log sum_j exp(t_ij)                      (0 for a row whose weights are all 0)
    cbar_i = sum_j exp(t_ij - lse_i) C_ij                 (the mean cost under the row's Gibbs weights)

The f update is (h, w) = (g, b) on C; the g update is (h, w) = (f, a) on C^T, the same kernel with the
strides swapped. One program owns BLOCK_N rows and streams their columns BLOCK_M at a time with an online
log-sum-exp (one exp per entry). The cost comes from a matrix (any strides and float dtype) or from points
x [B, n, d], y [B, m, d] (squared euclidean or L1, summed over d inside the tile: n x m is never stored).

The points' envelope gradient dx_i = sum_j P_ij dc(x_i, y_j)/dx_i, P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps),
streams the same tiles: 2 (x_i - y_j) for the squared euclidean cost, sign(x_i - y_j) for L1.

SinKD's cost W_ij = sum_v |p_iv - q_jv| between the softmax rows of two logit matrices is built from each
row's (max, logsum) in one program per (BLOCK_N x BLOCK_M) tile of W, streaming V in blocks; its backward
G_iv = sum_j dW_ij sign(p_iv - q_jv) in one program per (BLOCK_N rows x BLOCK_V vocabulary) tile of G.

What each kernel must move or compute, and what it does:
- softmin_cost: must read the stored cost once per update, B n m elements of its dtype; reads exactly that
  (plus the other side's potential and marginal once per row tile, m / BLOCK_N times: 2 x 4 bytes per
  column per 16 (or 64) rows). One exp per entry.
- softmin_points / points_gradient: must compute the cost, 3 d FLOPs per entry (sub, mul-add; sub, abs,
  add), per update; read (n + m) d points, re-read from L1/L2 per tile. The gradient computes the cost
  tile and then d slopes per entry: ~6 d FLOPs per entry, one exp.
- softmax_l1_cost: N^2 V |p - q| terms (3 FLOPs each) are the work; each logit is re-read N / BLOCK_M times
  (from L2) and each probability re-exponentiated as often (2 exps per 16 terms). Backward the same.
"""

import torch
import triton
import triton.language as tl

from .divergence import NEG_INF, finite_or_zero
from .launch import on_device

SQEUCLIDEAN = tl.constexpr(0)
L1 = tl.constexpr(1)
COST_FNS = ("sqeuclidean", "l1")

# (BLOCK_N, BLOCK_M, num_warps) of the soft-min and points kernels: 8 entries per thread in lanes of three
# accumulators, 69 registers (84 from points) on sm_90 (`python -m tests.triton_aot --table`), so that ~7
# blocks per SM keep ~28 KB of fp32 cost in flight. At 32 entries per thread they took 255. The g update reads
# C transposed, contiguous along the output rows: there the tile is 64 output rows by 16.
SOFTMIN_TILE = (16, 64, 4)
SOFTMIN_TILE_TRANSPOSED = (64, 16, 4)
# (BLOCK_N, BLOCK_M, BLOCK_V, num_warps) of SinKD's L1 cost: a [16, 16, 16] broadcast per step of V.
L1_TILE = (16, 16, 16, 4)


@triton.jit
def online_softmin_update(m, s, w, t, c):
    """Per-lane running max m, sum exp(t - m) and sum exp(t - m) c of a [rows, cols] lane tile, with one exp
    per entry (as online_lse_update: on a new max the old sums are rescaled by the same exp). An infinite
    cost, whose weight is 0, adds 0."""
    c = tl.where(c < float("inf"), c, 0.0)
    up = t > m
    m_new = tl.where(up, t, m)
    e = tl.exp(tl.where(up, m, t) - finite_or_zero(m_new))
    return m_new, tl.where(up, s * e + 1.0, s + e), tl.where(up, w * e + c, w + e * c)


@triton.jit
def softmin_finalize(out_ptr, cbar_ptr, rows, row_ok, m, s, w, eps):
    """out = -eps (max + log sum), cbar = w / s per row from the lanes, moved to the row max."""
    row_max = tl.max(m, 1)
    safe_max = finite_or_zero(row_max)
    rescale = tl.exp(m - safe_max[:, None])
    s_row = tl.sum(s * rescale, 1)
    w_row = tl.sum(w * rescale, 1)
    empty = row_max == NEG_INF
    tl.store(out_ptr + rows, tl.where(empty, 0.0, -eps * (row_max + tl.log(s_row))), mask=row_ok)
    tl.store(cbar_ptr + rows, tl.where(empty, 0.0, w_row / s_row), mask=row_ok)


@triton.jit
def points_cost_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_xi, stride_xd, stride_yj, stride_yd,
                     COST: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):  # fmt: skip
    """C_ij = sum_k (x_ik - y_jk)^2 or |x_ik - y_jk| of a [BLOCK_N, BLOCK_M] tile, exact differences (no
    |x|^2 + |y|^2 - 2 x.y cancellation)."""
    c = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k in range(0, D):
        xk = tl.load(x_ptr + rows * stride_xi + k * stride_xd, mask=row_ok, other=0.0).to(tl.float32)
        yk = tl.load(y_ptr + cols * stride_yj + k * stride_yd, mask=col_ok, other=0.0).to(tl.float32)
        diff = xk[:, None] - yk[None, :]
        if COST == SQEUCLIDEAN:
            c += diff * diff
        else:
            c += tl.abs(diff)
    return c


@triton.jit
def softmin_cost_kernel(
    c_ptr,  # (B, R, S) cost, any strides
    h_ptr,  # (B, S) fp32 potential of the other side
    logw_ptr,  # (B, S) fp32 log marginal of the other side
    out_ptr,  # (B, R) fp32 out: the new potential
    cbar_ptr,  # (B, R) fp32 out: the Gibbs-weighted mean cost
    R,
    S,
    stride_cb,
    stride_ci,
    stride_cj,
    eps,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    inv_eps = 1.0 / eps
    m = tl.full([BLOCK_N, BLOCK_M], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for start in range(0, S, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < S
        ok = row_ok[:, None] & col_ok[None, :]
        c = tl.load(c_ptr + b * stride_cb + rows[:, None].to(tl.int64) * stride_ci + cols[None, :] * stride_cj,
                    mask=ok, other=0.0).to(tl.float32)  # fmt: skip
        h = tl.load(h_ptr + b * S + cols, mask=col_ok, other=0.0)
        logw = tl.load(logw_ptr + b * S + cols, mask=col_ok, other=NEG_INF)
        t = tl.where(ok, logw[None, :] + (h[None, :] - c) * inv_eps, NEG_INF)
        m, s, w = online_softmin_update(m, s, w, t, c)
    softmin_finalize(out_ptr + b * R, cbar_ptr + b * R, rows, row_ok, m, s, w, eps)


@triton.jit
def softmin_points_kernel(
    x_ptr,  # (B, R, D) points of this side
    y_ptr,  # (B, S, D) points of the other side
    h_ptr,  # (B, S) fp32
    logw_ptr,  # (B, S) fp32
    out_ptr,  # (B, R) fp32 out
    cbar_ptr,  # (B, R) fp32 out
    R,
    S,
    D,
    stride_xb,
    stride_xi,
    stride_xd,
    stride_yb,
    stride_yj,
    stride_yd,
    eps,
    COST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    x_ptr += b * stride_xb
    y_ptr += b * stride_yb
    inv_eps = 1.0 / eps
    m = tl.full([BLOCK_N, BLOCK_M], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    w = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for start in range(0, S, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < S
        c = points_cost_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_xi, stride_xd, stride_yj,
                             stride_yd, COST, BLOCK_N, BLOCK_M)  # fmt: skip
        h = tl.load(h_ptr + b * S + cols, mask=col_ok, other=0.0)
        logw = tl.load(logw_ptr + b * S + cols, mask=col_ok, other=NEG_INF)
        t = tl.where(row_ok[:, None] & col_ok[None, :], logw[None, :] + (h[None, :] - c) * inv_eps, NEG_INF)
        m, s, w = online_softmin_update(m, s, w, t, c)
    softmin_finalize(out_ptr + b * R, cbar_ptr + b * R, rows, row_ok, m, s, w, eps)


@triton.jit
def points_gradient_kernel(
    x_ptr,  # (B, R, D) points whose gradient is written
    y_ptr,  # (B, S, D) the other side's points
    f_ptr,  # (B, R) fp32 potential of this side
    g_ptr,  # (B, S) fp32 potential of the other side
    loga_ptr,  # (B, R) fp32 log marginal of this side
    logb_ptr,  # (B, S) fp32
    dx_ptr,  # (B, R, D) fp32 out, contiguous
    R,
    S,
    D,
    stride_xb,
    stride_xi,
    stride_xd,
    stride_yb,
    stride_yj,
    stride_yd,
    eps,
    COST: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    b = tl.program_id(1).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < R
    x_ptr += b * stride_xb
    y_ptr += b * stride_yb
    dx_rows = dx_ptr + b * R * D + rows * D
    inv_eps = 1.0 / eps
    f = tl.load(f_ptr + b * R + rows, mask=row_ok, other=0.0)
    loga = tl.load(loga_ptr + b * R + rows, mask=row_ok, other=NEG_INF)
    for k in range(0, D):
        tl.store(dx_rows + k, tl.zeros([BLOCK_N], tl.float32), mask=row_ok)
    for start in range(0, S, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < S
        c = points_cost_tile(x_ptr, y_ptr, rows, cols, row_ok, col_ok, D, stride_xi, stride_xd, stride_yj,
                             stride_yd, COST, BLOCK_N, BLOCK_M)  # fmt: skip
        g = tl.load(g_ptr + b * S + cols, mask=col_ok, other=0.0)
        logb = tl.load(logb_ptr + b * S + cols, mask=col_ok, other=NEG_INF)
        log_p = loga[:, None] + logb[None, :] + (f[:, None] + g[None, :] - c) * inv_eps
        p = tl.where(row_ok[:, None] & col_ok[None, :], tl.exp(log_p), 0.0)
        for k in range(0, D):
            xk = tl.load(x_ptr + rows * stride_xi + k * stride_xd, mask=row_ok, other=0.0).to(tl.float32)
            yk = tl.load(y_ptr + cols * stride_yj + k * stride_yd, mask=col_ok, other=0.0).to(tl.float32)
            diff = xk[:, None] - yk[None, :]
            if COST == SQEUCLIDEAN:
                slope = 2.0 * diff
            else:
                slope = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
            partial = tl.sum(p * slope, 1)
            tl.store(dx_rows + k, tl.load(dx_rows + k, mask=row_ok, other=0.0) + partial, mask=row_ok)


@triton.jit
def softmax_rows_tile(z_ptr, rows, row_ok, vcols, V, L, stride_zb, stride_zl, max_ptr, logsum_ptr, inv_temperature):
    """softmax(z/T) of a [rows, vcols] tile from the rows' saved (max, logsum); 0 outside the tile's bounds."""
    offsets = (rows // L).to(tl.int64) * stride_zb + (rows % L).to(tl.int64) * stride_zl
    ok = row_ok[:, None] & (vcols < V)[None, :]
    z = tl.load(z_ptr + offsets[:, None] + vcols[None, :], mask=ok, other=NEG_INF).to(tl.float32)
    mx = tl.load(max_ptr + rows, mask=row_ok, other=0.0)
    logsum = tl.load(logsum_ptr + rows, mask=row_ok, other=0.0)
    return tl.where(ok, tl.exp((z - mx[:, None]) * inv_temperature - logsum[:, None]), 0.0)


@triton.jit
def softmax_l1_cost_kernel(
    zs_ptr,  # (B, L, V) student logits, last-dim stride 1
    zt_ptr,  # (B, L, V) teacher logits
    max_s_ptr,  # (N,) fp32 row statistics of both
    logsum_s_ptr,
    max_t_ptr,
    logsum_t_ptr,
    valid_ptr,  # (N,) bool
    w_ptr,  # (N, N) fp32 out
    N,
    V,
    L,
    stride_sb,
    stride_sl,
    stride_tb,
    stride_tl,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    col_ok = cols < N
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for start in range(0, V, BLOCK_V):
        vcols = start + tl.arange(0, BLOCK_V)
        p = softmax_rows_tile(zs_ptr, rows, row_ok, vcols, V, L, stride_sb, stride_sl, max_s_ptr, logsum_s_ptr,
                              inv_temperature)  # fmt: skip
        q = softmax_rows_tile(zt_ptr, cols, col_ok, vcols, V, L, stride_tb, stride_tl, max_t_ptr, logsum_t_ptr,
                              inv_temperature)  # fmt: skip
        acc += tl.sum(tl.abs(p[:, None, :] - q[None, :, :]), 2)
    valid_i = tl.load(valid_ptr + rows, mask=row_ok, other=0) != 0
    valid_j = tl.load(valid_ptr + cols, mask=col_ok, other=0) != 0
    keep = valid_i[:, None] & valid_j[None, :]
    tl.store(w_ptr + rows[:, None].to(tl.int64) * N + cols[None, :], tl.where(keep, acc, 0.0),
             mask=row_ok[:, None] & col_ok[None, :])  # fmt: skip


@triton.jit
def softmax_l1_cost_backward_kernel(
    dw_ptr,  # (N, N) fp32 gradient of W
    zs_ptr,
    zt_ptr,
    max_s_ptr,
    logsum_s_ptr,
    max_t_ptr,
    logsum_t_ptr,
    g_ptr,  # (N, V) fp32 out: G = dL/dp (contiguous)
    N,
    V,
    L,
    stride_sb,
    stride_sl,
    stride_tb,
    stride_tl,
    inv_temperature,
    BLOCK_N: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    vcols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < N
    p = softmax_rows_tile(zs_ptr, rows, row_ok, vcols, V, L, stride_sb, stride_sl, max_s_ptr, logsum_s_ptr,
                          inv_temperature)  # fmt: skip
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for start in range(0, N, BLOCK_M):
        cols = start + tl.arange(0, BLOCK_M)
        col_ok = cols < N
        q = softmax_rows_tile(zt_ptr, cols, col_ok, vcols, V, L, stride_tb, stride_tl, max_t_ptr, logsum_t_ptr,
                              inv_temperature)  # fmt: skip
        dw = tl.load(dw_ptr + rows[:, None].to(tl.int64) * N + cols[None, :],
                     mask=row_ok[:, None] & col_ok[None, :], other=0.0)  # fmt: skip
        diff = p[:, None, :] - q[None, :, :]
        sign = tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
        acc += tl.sum(dw[:, :, None] * sign, 1)
    tl.store(g_ptr + rows[:, None].to(tl.int64) * V + vcols[None, :], acc,
             mask=row_ok[:, None] & (vcols < V)[None, :])  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# launchers


def softmin(geometry, h, log_w, eps: float):
    """softmin_cost or softmin_points, as the geometry (klops/sinkhorn.py's _Geometry) holds a cost or points."""
    if geometry.cost is not None:
        return softmin_cost(geometry.cost, h, log_w, eps)
    return softmin_points(geometry.x, geometry.y, h, log_w, eps, geometry.cost_fn)


def softmin_cost(cost, h, log_w, eps: float):
    """(out, cbar), each (B, R) fp32, of the soft-min over the last dim of the (B, R, S) cost view."""
    B, R, S = cost.shape
    out = torch.empty((B, R), dtype=torch.float32, device=cost.device)
    cbar = torch.empty_like(out)
    if B * R == 0:
        return out, cbar
    transposed = cost.stride(1) == 1 and cost.stride(2) != 1
    block_n, block_m, num_warps = SOFTMIN_TILE_TRANSPOSED if transposed else SOFTMIN_TILE
    with on_device(cost):
        softmin_cost_kernel[(triton.cdiv(R, block_n), B)](
            cost, h, log_w, out, cbar, R, S, *cost.stride(), eps,
            BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps,
        )  # fmt: skip
    return out, cbar


def softmin_points(x, y, h, log_w, eps: float, cost_fn: str):
    """(out, cbar), each (B, R) fp32, of the soft-min over y's points of the cost between x [B, R, D] and
    y [B, S, D], computed tile by tile."""
    B, R, D = x.shape
    S = y.shape[1]
    out = torch.empty((B, R), dtype=torch.float32, device=x.device)
    cbar = torch.empty_like(out)
    if B * R == 0:
        return out, cbar
    block_n, block_m, num_warps = SOFTMIN_TILE
    with on_device(x):
        softmin_points_kernel[(triton.cdiv(R, block_n), B)](
            x, y, h, log_w, out, cbar, R, S, D, *x.stride(), *y.stride(), eps,
            COST=COST_FNS.index(cost_fn), BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps,
        )  # fmt: skip
    return out, cbar


def points_gradient(x, y, f, g, log_a, log_b, eps: float, cost_fn: str):
    """(B, R, D) fp32: sum_j P_ij dc(x_i, y_j)/dx_i with P from the potentials and log marginals."""
    B, R, D = x.shape
    S = y.shape[1]
    dx = torch.empty((B, R, D), dtype=torch.float32, device=x.device)
    if B * R == 0:
        return dx
    block_n, block_m, num_warps = SOFTMIN_TILE
    with on_device(x):
        points_gradient_kernel[(triton.cdiv(R, block_n), B)](
            x, y, f, g, log_a, log_b, dx, R, S, D, *x.stride(), *y.stride(), eps,
            COST=COST_FNS.index(cost_fn), BLOCK_N=block_n, BLOCK_M=block_m, num_warps=num_warps,
        )  # fmt: skip
    return dx


def softmax_l1_cost(student, teacher, max_s, logsum_s, max_t, logsum_t, valid, temperature: float):
    """(N, N) fp32 W_ij = ||softmax(z_s,i/T) - softmax(z_t,j/T)||_1 of (B, L, V) logits (N = B L rows), 0
    where row i or j is not valid."""
    B, L, V = student.shape
    N = B * L
    w = torch.empty((N, N), dtype=torch.float32, device=student.device)
    if N == 0:
        return w
    block_n, block_m, block_v, num_warps = L1_TILE
    with on_device(student):
        softmax_l1_cost_kernel[(triton.cdiv(N, block_n), triton.cdiv(N, block_m))](
            student, teacher, max_s, logsum_s, max_t, logsum_t, valid, w, N, V, L,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), 1.0 / temperature,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    return w


def softmax_l1_cost_backward(grad_w, student, teacher, max_s, logsum_s, max_t, logsum_t, temperature: float):
    """(N, V) fp32 G_iv = sum_j dW_ij sign(p_iv - q_jv), the gradient of W's inputs with respect to p_s."""
    B, L, V = student.shape
    N = B * L
    grad_p = torch.empty((N, V), dtype=torch.float32, device=student.device)
    if N == 0:
        return grad_p
    block_n, block_m, block_v, num_warps = L1_TILE
    with on_device(student):
        softmax_l1_cost_backward_kernel[(triton.cdiv(N, block_n), triton.cdiv(V, block_v))](
            grad_w, student, teacher, max_s, logsum_s, max_t, logsum_t, grad_p, N, V, L,
            student.stride(0), student.stride(1), teacher.stride(0), teacher.stride(1), 1.0 / temperature,
            BLOCK_N=block_n, BLOCK_M=block_m, BLOCK_V=block_v, num_warps=num_warps,
        )  # fmt: skip
    return grad_p
