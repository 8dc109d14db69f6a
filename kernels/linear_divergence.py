"""Triton kernels for the fused-linear divergences (docs/losses.md §1): every kind of ``fused_kl`` between
the student's logits ``z = softcap(h @ W^T + b)``, formed a tile at a time by kernels/linear.py's
``logit_tile``, and a teacher given as hidden states + head (its logits formed the same way, never stored)
or as logits / log-probs / probs ``(B, L, V)`` read in place. Nothing of size ``[N, V]`` reaches global memory.

With log q = (z - max_q)/T - logsum_q, log p likewise (or as given), loss_v and a_v the kind's per-entry terms
(kernels/divergence.py's ``divergence_terms``) and gbar = sum_v a_v:

    forward, sweep 1 per (row block, vocabulary split): the online (max, sum) of both rows, and for forward /
        reverse KL between logit rows the online KL accumulator: D without a sweep 2, gbar = -1 or D
    forward, sweep 2 (the other kinds and teachers): D = sum_v loss_v, gbar = sum_v a_v per split
    merged over splits in torch (O(splits N))
    backward per (row block, vocabulary tile): dz = g_D (a - q gbar)/T + g_logp (onehot(label) - q)/T on the
        recomputed tiles (times 1 - tanh^2 under a soft cap), into grad_h / grad_W / grad_b by atomic adds

FLOPs, in products of 2 N V D (teacher from hidden states; D = Ds ~ Dt): forward / reverse KL 2 forward
(student and teacher logits) + 4 backward (both logits again, grad_h, grad_W) = 6; the other kinds 4 + 4 = 8
(sweep 2 forms both tiles again). With the teacher as logits: 1 + 3 = 4, or 2 + 3 = 5. Choice (b) of the
issue, recomputation: computing the gradient in the forward instead needs the row statistics (sweep 1)
before any gradient entry, so it costs sweep 1 + a sweep that forms both tiles and both gradient products
(6 for every kind, 8 for the others), holds fp32 grad_h and grad_W from the forward to the backward, and
gives nothing for a loss whose upstream gradient is not a scalar multiple (reduction="none" with per-row
grad_output, or the label's log-prob beside D).
"""

import torch
import triton
import triton.language as tl

from .divergence import (
    FORWARD,
    LOGITS,
    NEG_INF,
    REVERSE,
    divergence_terms,
    finite_or_zero,
    move_kl_acc,
    teacher_check_terms,
    teacher_logprobs,
)
from .kinds import DIVERGENCE_KINDS
from .launch import TARGET_KINDS, on_device
from .linear import (
    GROUP_M,
    accumulate_linear_grads,
    backward_over_vocabulary,
    forward_grid,
    grouped_tile,
    hidden_offsets,
    linear_strides,
    logit_tile,
    matmul_args,
    merge_lse,
    split_program,
)


@triton.jit
def teacher_tile(
    t_ptr, tw_ptr, tb_ptr, t_offsets, row_mask, cols, col_mask, Dt, stride_td, stride_twv, stride_twd, t_softcap,
    TEACHER_HIDDEN: tl.constexpr, T_HAS_BIAS: tl.constexpr, T_SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """The teacher's [BLOCK_M, BLOCK_V] fp32 tile: logits formed from its hidden states (TEACHER_HIDDEN), else
    read from the (B, L, V) tensor at t_offsets (0 outside the masks); the teacher's soft cap is its own."""
    if TEACHER_HIDDEN:
        y, _ = logit_tile(
            t_ptr, tw_ptr, tb_ptr, t_offsets, row_mask, cols, col_mask, Dt, stride_td, stride_twv, stride_twd,
            t_softcap, T_HAS_BIAS, T_SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
    else:
        y = tl.load(t_ptr + t_offsets[:, None] + cols[None, :], mask=row_mask[:, None] & col_mask[None, :],
                    other=0.0).to(tl.float32)  # fmt: skip
    return y


@triton.jit
def tile_lse_update(m, s, x, inv_temperature):
    """Per-row online log-sum-exp over a [BLOCK_M, BLOCK_V] tile: m = running max, s = sum exp((x - m) / T)
    (one exp per entry, one per row to rescale)."""
    m_new = tl.maximum(m, tl.max(x, 1))
    m_ref = finite_or_zero(m_new)
    s = s * tl.exp((m - m_ref) * inv_temperature) + tl.sum(tl.exp((x - m_ref[:, None]) * inv_temperature), 1)
    return m_new, s


@triton.jit
def tile_kl_update(m_a, s_a, m_b, s_b, acc, a, b, inv_temperature):
    """online_kl_update (kernels/divergence.py) per row over a tile: acc = sum exp(d_a) (d_a - d_b), d = (x - m)/T
    relative to the running maxima; on new maxima acc' = r_a (acc + (shift_a - shift_b) s_a)."""
    m_a_new = tl.maximum(m_a, tl.max(a, 1))
    m_b_new = tl.maximum(m_b, tl.max(b, 1))
    ref_a = finite_or_zero(m_a_new)
    ref_b = finite_or_zero(m_b_new)
    shift_a = tl.where(m_a == NEG_INF, 0.0, (m_a - ref_a) * inv_temperature)
    shift_b = tl.where(m_b == NEG_INF, 0.0, (m_b - ref_b) * inv_temperature)
    d_a = (a - ref_a[:, None]) * inv_temperature
    d_b = (b - ref_b[:, None]) * inv_temperature
    e_a = tl.exp(d_a)
    r_a = tl.exp(shift_a)
    acc = move_kl_acc(acc, r_a, shift_a - shift_b, s_a) + tl.sum(tl.where(e_a > 0.0, e_a * (d_a - d_b), 0.0), 1)
    s_a = s_a * r_a + tl.sum(e_a, 1)
    s_b = s_b * tl.exp(shift_b) + tl.sum(tl.exp(d_b), 1)
    return m_a_new, s_a, m_b_new, s_b, acc


@triton.jit
def linear_divergence_stats_kernel(
    # data ptrs
    h_ptr,  # (B, L, D) student hidden states
    w_ptr,  # [V, D] student weight
    b_ptr,  # [V] student bias (HAS_BIAS only)
    t_ptr,  # (B, L, Dt) teacher hidden states, or (B, L, V) teacher logits / log-probs / probs
    tw_ptr,  # [V, Dt] teacher weight (TEACHER_HIDDEN only)
    tb_ptr,  # [V] teacher bias (T_HAS_BIAS only)
    valid_ptr,  # (N,) bool
    labels_ptr,  # (N,) int64 (WITH_LABELS only)
    part_ptr,  # (6, S, N) fp32 out: per split m_q, s_q, m_t, s_t, the KL accumulator, z of the label
    # shapes
    N,
    L,
    V,
    D,
    Dt,
    split_size,  # vocabulary entries per split, a multiple of BLOCK_V
    # strides
    stride_hb,
    stride_hl,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_tb,
    stride_tl,
    stride_td,
    stride_twv,
    stride_twd,
    # constants
    inv_temperature,
    softcap,
    t_softcap,
    KIND: tl.constexpr,
    TARGET: tl.constexpr,
    TEACHER_HIDDEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    WITH_LABELS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Sweep 1 over a split: the online (max, sum) of both rows (the teacher's only as logits), and for forward
    / reverse KL between logit rows the KL accumulator of tile_kl_update, so that they need no sweep 2."""
    rows, split = split_program(N, V, split_size, BLOCK_M)
    row_mask = rows < N
    if tl.max(tl.load(valid_ptr + rows, mask=row_mask, other=0).to(tl.int32), 0) == 0:
        return  # every row ignored: the merge never reads this block's partials
    row_offsets = hidden_offsets(rows, L, stride_hb, stride_hl)
    t_offsets = hidden_offsets(rows, L, stride_tb, stride_tl)
    labels = tl.full([BLOCK_M], -1, tl.int64)
    if WITH_LABELS:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    v_start = split * split_size
    v_end = tl.minimum(v_start + split_size, V)
    m_q = tl.full([BLOCK_M], NEG_INF, tl.float32)
    s_q = tl.zeros([BLOCK_M], tl.float32)
    m_t = tl.full([BLOCK_M], NEG_INF, tl.float32)
    s_t = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M], tl.float32)
    z_label = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _ = logit_tile(
            h_ptr, w_ptr, b_ptr, row_offsets, row_mask, cols, col_mask, D, stride_hd, stride_wv, stride_wd,
            softcap, HAS_BIAS, SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        if WITH_LABELS:
            z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        if TARGET == LOGITS:
            y = teacher_tile(
                t_ptr, tw_ptr, tb_ptr, t_offsets, row_mask, cols, col_mask, Dt, stride_td, stride_twv, stride_twd,
                t_softcap, TEACHER_HIDDEN, T_HAS_BIAS, T_SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
            )  # fmt: skip
            y = tl.where(col_mask[None, :], y, NEG_INF)
            if KIND == FORWARD:  # KL(p || q): weights p
                m_t, s_t, m_q, s_q, acc = tile_kl_update(m_t, s_t, m_q, s_q, acc, y, z, inv_temperature)
            elif KIND == REVERSE:  # KL(q || p): weights q
                m_q, s_q, m_t, s_t, acc = tile_kl_update(m_q, s_q, m_t, s_t, acc, z, y, inv_temperature)
            else:
                m_q, s_q = tile_lse_update(m_q, s_q, z, inv_temperature)
                m_t, s_t = tile_lse_update(m_t, s_t, y, inv_temperature)
        else:
            m_q, s_q = tile_lse_update(m_q, s_q, z, inv_temperature)
    out = part_ptr + split.to(tl.int64) * N + rows
    plane = tl.cdiv(V, split_size).to(tl.int64) * N
    tl.store(out, m_q, mask=row_mask)
    tl.store(out + plane, s_q, mask=row_mask)
    tl.store(out + 2 * plane, m_t, mask=row_mask)
    tl.store(out + 3 * plane, s_t, mask=row_mask)
    tl.store(out + 4 * plane, acc, mask=row_mask)
    tl.store(out + 5 * plane, z_label, mask=row_mask)


@triton.jit
def row_log_softmax(x, stats_ptr, rows, row_mask, N, inv_temperature):
    """(x - max)/T - logsum of a tile's rows, from the (max, logsum) planes at stats_ptr (2, N)."""
    max_x = tl.load(stats_ptr + rows, mask=row_mask, other=0.0)
    logsum = tl.load(stats_ptr + N + rows, mask=row_mask, other=0.0)
    return (x - max_x[:, None]) * inv_temperature - logsum[:, None]


@triton.jit
def teacher_row_logprobs(y, stats_ptr, rows, row_mask, col_mask, N, inv_temperature, TARGET: tl.constexpr):
    """log p of a teacher tile: log-softmax of logits from the (max_t, logsum_t) planes of stats_ptr (4, N), the
    log-probs as given, or log of the probabilities; -inf outside the vocabulary."""
    if TARGET == LOGITS:
        lp = row_log_softmax(y, stats_ptr + 2 * N, rows, row_mask, N, inv_temperature)
    else:
        lp = teacher_logprobs(y, 0.0, 0.0, inv_temperature, TARGET)
    return tl.where(col_mask[None, :], lp, NEG_INF)


@triton.jit
def linear_divergence_terms_kernel(
    # data ptrs
    h_ptr,  # (B, L, D) student hidden states
    w_ptr,  # [V, D]
    b_ptr,  # [V] (HAS_BIAS only)
    t_ptr,  # (B, L, Dt) teacher hidden states, or (B, L, V) teacher logits / log-probs / probs
    tw_ptr,  # [V, Dt] (TEACHER_HIDDEN only)
    tb_ptr,  # [V] (T_HAS_BIAS only)
    valid_ptr,  # (N,) bool
    stats_ptr,  # (4, N) fp32: max_q, logsum_q, max_t, logsum_t (merged)
    part_ptr,  # (2 or 4, S, N) fp32 out: per split sum_v loss_v, sum_v a_v (and the teacher's check statistics)
    # shapes
    N,
    L,
    V,
    D,
    Dt,
    split_size,
    # strides
    stride_hb,
    stride_hl,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_tb,
    stride_tl,
    stride_td,
    stride_twv,
    stride_twd,
    # constants
    inv_temperature,
    softcap,
    t_softcap,
    coef,
    KIND: tl.constexpr,
    TARGET: tl.constexpr,
    TEACHER_HIDDEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Sweep 2 over a split (every kind but forward / reverse KL between logit rows): D = sum loss_v and
    gbar = sum a_v of divergence_terms, from the merged row statistics; for a teacher given as log-probs or probs
    also max_v top_v and sum_v p_v of teacher_check_terms, the statistics of its check."""
    rows, split = split_program(N, V, split_size, BLOCK_M)
    row_mask = rows < N
    if tl.max(tl.load(valid_ptr + rows, mask=row_mask, other=0).to(tl.int32), 0) == 0:
        return
    row_offsets = hidden_offsets(rows, L, stride_hb, stride_hl)
    t_offsets = hidden_offsets(rows, L, stride_tb, stride_tl)
    v_start = split * split_size
    v_end = tl.minimum(v_start + split_size, V)
    loss = tl.zeros([BLOCK_M], tl.float32)
    gbar = tl.zeros([BLOCK_M], tl.float32)
    top = tl.full([BLOCK_M], NEG_INF, tl.float32)
    mass = tl.zeros([BLOCK_M], tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _ = logit_tile(
            h_ptr, w_ptr, b_ptr, row_offsets, row_mask, cols, col_mask, D, stride_hd, stride_wv, stride_wd,
            softcap, HAS_BIAS, SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        y = teacher_tile(
            t_ptr, tw_ptr, tb_ptr, t_offsets, row_mask, cols, col_mask, Dt, stride_td, stride_twv, stride_twd,
            t_softcap, TEACHER_HIDDEN, T_HAS_BIAS, T_SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        lq = row_log_softmax(z, stats_ptr, rows, row_mask, N, inv_temperature)
        lp = teacher_row_logprobs(y, stats_ptr, rows, row_mask, col_mask, N, inv_temperature, TARGET)
        entry_loss, a = divergence_terms(lq, lp, coef, KIND)
        loss += tl.sum(entry_loss, 1)
        gbar += tl.sum(a, 1)
        if TARGET != LOGITS:
            entry_top, p = teacher_check_terms(y, lp, col_mask[None, :], TARGET)
            top = tl.maximum(top, tl.max(entry_top, 1))
            mass += tl.sum(p, 1)
    out = part_ptr + split.to(tl.int64) * N + rows
    plane = tl.cdiv(V, split_size).to(tl.int64) * N
    tl.store(out, loss, mask=row_mask)
    tl.store(out + plane, gbar, mask=row_mask)
    if TARGET != LOGITS:
        tl.store(out + 2 * plane, top, mask=row_mask)
        tl.store(out + 3 * plane, mass, mask=row_mask)


@triton.jit
def linear_divergence_backward_kernel(
    # data ptrs
    h_ptr,  # (B, L, D) student hidden states
    w_ptr,  # [V, D]
    b_ptr,  # [V] (HAS_BIAS only)
    t_ptr,  # (B, L, Dt) teacher hidden states, or (B, L, V) teacher logits / log-probs / probs
    tw_ptr,  # [V, Dt] (TEACHER_HIDDEN only)
    tb_ptr,  # [V] (T_HAS_BIAS only)
    labels_ptr,  # (N,) int64 (WITH_LABELS only)
    stats_ptr,  # (4, N) fp32: max_q, logsum_q, max_t, logsum_t
    coef_ptr,  # (3, N) fp32: gbar, grad D / T and grad logp / T per row (0 on ignored rows)
    grad_h_ptr,  # (N, D) fp32, accumulated
    grad_w_ptr,  # [V - v_start, D] fp32, accumulated: the rows of entries v_start..V-1
    grad_b_ptr,  # [V] fp32, accumulated (HAS_BIAS only)
    # shapes
    N,
    L,
    V,  # the end of this launch's vocabulary range
    D,
    Dt,
    # strides
    stride_hb,
    stride_hl,
    stride_hd,
    stride_wv,
    stride_wd,
    stride_tb,
    stride_tl,
    stride_td,
    stride_twv,
    stride_twd,
    # constants
    v_start,  # the first vocabulary entry of this launch's range
    inv_temperature,
    softcap,
    t_softcap,
    coef,
    KIND: tl.constexpr,
    TARGET: tl.constexpr,
    TEACHER_HIDDEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    T_HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    T_SOFTCAP: tl.constexpr,
    WITH_LABELS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    """dz = g_D (a - q gbar) / T + g_logp (onehot(label) - q) / T on a recomputed tile, times 1 - tanh^2 under a
    soft cap, into the student's grad_h / grad_W / grad_b."""
    rows, cols = grouped_tile(N, V, v_start, BLOCK_M, BLOCK_V, GROUP_M)
    row_mask = rows < N
    gbar = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    scale = tl.load(coef_ptr + N + rows, mask=row_mask, other=0.0)
    scale_logp = tl.load(coef_ptr + 2 * N + rows, mask=row_mask, other=0.0)
    if tl.max(tl.abs(scale) + tl.abs(scale_logp), 0) == 0.0:
        return  # a zero gradient: nothing to add
    col_mask = cols < V
    row_offsets = hidden_offsets(rows, L, stride_hb, stride_hl)
    z, t = logit_tile(
        h_ptr, w_ptr, b_ptr, row_offsets, row_mask, cols, col_mask, D, stride_hd, stride_wv, stride_wd,
        softcap, HAS_BIAS, SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    y = teacher_tile(
        t_ptr, tw_ptr, tb_ptr, hidden_offsets(rows, L, stride_tb, stride_tl), row_mask, cols, col_mask, Dt,
        stride_td, stride_twv, stride_twd, t_softcap, TEACHER_HIDDEN, T_HAS_BIAS, T_SOFTCAP, DOT_FP32, PRECISION,
        BLOCK_M, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    lq = row_log_softmax(z, stats_ptr, rows, row_mask, N, inv_temperature)
    lp = teacher_row_logprobs(y, stats_ptr, rows, row_mask, col_mask, N, inv_temperature, TARGET)
    _, a = divergence_terms(lq, lp, coef, KIND)
    q = tl.exp(lq)
    dz = scale[:, None] * (a - q * gbar[:, None])
    if WITH_LABELS:
        labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
        dz += scale_logp[:, None] * (tl.where(cols[None, :] == labels[:, None], 1.0, 0.0) - q)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if SOFTCAP:
        dz *= 1.0 - t * t
    accumulate_linear_grads(
        dz, h_ptr, w_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr, rows, row_offsets, row_mask, cols, col_mask, v_start,
        D, stride_hd, stride_wv, stride_wd, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_K,
    )  # fmt: skip


def _teacher_args(teacher, teacher_weight, teacher_bias, weight) -> tuple:
    """(t_ptr, tw_ptr, tb_ptr, Dt, stride_tb, stride_tl, stride_td, stride_twv, stride_twd) of a teacher given as
    (B, L, Dt) hidden states with its [V, Dt] weight, or as (B, L, V) logits / log-probs / probs (the weight
    unused: a placeholder)."""
    if teacher_weight is None:
        return (teacher, weight, weight, 0, teacher.stride(0), teacher.stride(1), 1, 1, 1)
    tb = teacher_bias if teacher_bias is not None else teacher_weight
    return (teacher, teacher_weight, tb, teacher.shape[2], *teacher.stride(), *teacher_weight.stride())


def _kind_args(kind, target_is, teacher_weight, teacher_bias, hidden, bias, softcap, teacher_softcap) -> dict:
    return dict(
        KIND=DIVERGENCE_KINDS.index(kind), TARGET=TARGET_KINDS.index(target_is),
        TEACHER_HIDDEN=teacher_weight is not None, T_HAS_BIAS=teacher_bias is not None,
        T_SOFTCAP=teacher_weight is not None and teacher_softcap is not None, **matmul_args(hidden, bias, softcap),
    )  # fmt: skip


def linear_divergence_forward(
    hidden: torch.Tensor,  # (B, L, D) student
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    teacher: torch.Tensor,  # (B, L, Dt) hidden states (with teacher_weight) or (B, L, V)
    teacher_weight: torch.Tensor | None,  # [V, Dt]
    teacher_bias: torch.Tensor | None,  # [V]
    valid: torch.Tensor,  # (B, L) bool
    labels: torch.Tensor | None,  # (B, L) int64
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
    softcap: float | None,
    teacher_softcap: float | None,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward sweeps and merge their splits: (D, max_q, logsum_q, max_t, logsum_t, gbar, logp), each
    (B, L) fp32 and 0 on invalid rows; logp is log q of the label (0 without labels); for a teacher given as
    log-probs or probs, max_t / logsum_t are the statistics of its check (teacher_check_terms, over the row)."""
    (B, L, D), V = hidden.shape, weight.shape[0]
    N = B * L
    if N == 0:
        return tuple(torch.zeros((B, L), dtype=torch.float32, device=hidden.device) for _ in range(7))
    valid = valid.reshape(N).contiguous()
    (block_m, block_v, block_k, num_warps, num_stages), grid, splits, split_size = forward_grid(N, V, hidden.device)
    t_ptr, tw_ptr, tb_ptr, Dt, *teacher_strides = _teacher_args(teacher, teacher_weight, teacher_bias, weight)
    pointers = (hidden, weight, bias if bias is not None else weight, t_ptr, tw_ptr, tb_ptr, valid)
    shapes_and_strides = (N, L, V, D, Dt, split_size, *linear_strides(hidden, weight), *teacher_strides)
    launch = dict(
        **_kind_args(kind, target_is, teacher_weight, teacher_bias, hidden, bias, softcap, teacher_softcap),
        BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )  # fmt: skip
    caps = (softcap or 1.0, teacher_softcap or 1.0)
    part = torch.empty((6, splits, N), dtype=torch.float32, device=hidden.device)
    labels_flat = labels.reshape(N).contiguous() if labels is not None else valid
    with on_device(hidden):
        linear_divergence_stats_kernel[grid](
            *pointers, labels_flat, part, *shapes_and_strides, 1.0 / temperature, *caps,
            WITH_LABELS=labels is not None, **launch,
        )  # fmt: skip
    m_q, s_q, m_t, s_t, acc, z_label = part
    max_q, total_q, rescale_q, shift_q = merge_lse(m_q, s_q, temperature)
    logsum_q = torch.log(total_q)
    zeros = torch.zeros_like(max_q)
    max_t = total_t = rescale_t = shift_t = logsum_t = zeros
    if target_is == "logits":
        max_t, total_t, rescale_t, shift_t = merge_lse(m_t, s_t, temperature)
        logsum_t = torch.log(total_t)
    if target_is == "logits" and kind in ("forward", "reverse"):
        # KL(P_a || P_b) = A / S_a - logsum_a + logsum_b, A = sum_i r_a,i (acc_i + (shift_a,i - shift_b,i) s_a,i)
        a, b = ((rescale_t, shift_t, s_t, total_t, logsum_t), (shift_q, logsum_q))
        if kind == "reverse":
            a, b = ((rescale_q, shift_q, s_q, total_q, logsum_q), (shift_t, logsum_t))
        (rescale_a, shift_a, s_a, total_a, logsum_a), (shift_b, logsum_b) = a, b
        moved = torch.where(rescale_a > 0, rescale_a * (acc + (shift_a - shift_b) * s_a), 0.0)  # as tile_kl_update
        loss = moved.sum(0) / total_a - logsum_a + logsum_b
        gbar = -torch.ones_like(loss) if kind == "forward" else loss
    else:
        stats = torch.where(valid, torch.stack((max_q, logsum_q, max_t, logsum_t)), 0.0)
        planes = 2 if target_is == "logits" else 4
        terms = torch.empty((planes, splits, N), dtype=torch.float32, device=hidden.device)
        with on_device(hidden):
            linear_divergence_terms_kernel[grid](
                *pointers, stats, terms, *shapes_and_strides, 1.0 / temperature, *caps, coef, **launch
            )
        loss, gbar = terms[:2].sum(1)
        if target_is != "logits":
            max_t, logsum_t = terms[2].amax(0), terms[3].sum(0).log()
    logp = (z_label.sum(0) - max_q) / temperature - logsum_q if labels is not None else zeros
    outputs = (loss, max_q, logsum_q, max_t, logsum_t, gbar, logp)
    return tuple(torch.where(valid, x, 0.0).reshape(B, L) for x in outputs)


def linear_divergence_backward(
    grad: torch.Tensor,  # (B, L) fp32: dLoss/dD per row
    grad_logp: torch.Tensor | None,  # (B, L) fp32: dLoss/dlogp per row (with labels)
    hidden: torch.Tensor,  # (B, L, D)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    teacher: torch.Tensor,  # (B, L, Dt) or (B, L, V)
    teacher_weight: torch.Tensor | None,  # [V, Dt]
    teacher_bias: torch.Tensor | None,  # [V]
    valid: torch.Tensor,  # (B, L) bool
    labels: torch.Tensor | None,  # (B, L) int64
    stats: tuple[torch.Tensor, ...],  # (max_q, logsum_q, max_t, logsum_t, gbar), each (B, L) fp32
    kind: str,
    target_is: str,
    temperature: float,
    coef: float,
    softcap: float | None,
    teacher_softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: the student's (grad_hidden (B, L, D), grad_weight [V, D], grad_bias [V] fp32 or [0]
    without bias), kernels/linear.py's backward_over_vocabulary."""
    (B, L, D) = hidden.shape
    N = B * L
    with_labels = grad_logp is not None
    scale = torch.where(valid, grad / temperature, 0.0)
    scale_logp = torch.where(valid, grad_logp / temperature, 0.0) if with_labels else torch.zeros_like(scale)
    coefs = torch.stack((stats[4], scale, scale_logp)).reshape(3, N)
    row_stats = torch.stack(stats[:4]).reshape(4, N)
    t_ptr, tw_ptr, tb_ptr, Dt, *teacher_strides = _teacher_args(teacher, teacher_weight, teacher_bias, weight)
    labels_flat = labels.reshape(N).contiguous() if with_labels else coefs
    kind_args = _kind_args(kind, target_is, teacher_weight, teacher_bias, hidden, bias, softcap, teacher_softcap)

    def launch(grid, tile, v_start, v_end, grad_h, grad_w_rows, grad_b):
        block_m, block_v, block_k, num_warps, num_stages = tile
        linear_divergence_backward_kernel[grid](
            hidden, weight, bias if bias is not None else weight, t_ptr, tw_ptr, tb_ptr, labels_flat, row_stats, coefs,
            grad_h, grad_w_rows, grad_b if bias is not None else grad_h,
            N, L, v_end, D, Dt,
            *linear_strides(hidden, weight), *teacher_strides,
            v_start, 1.0 / temperature, softcap or 1.0, teacher_softcap or 1.0, coef,
            WITH_LABELS=with_labels, **kind_args,
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip

    return backward_over_vocabulary(hidden, weight, bias, launch)
