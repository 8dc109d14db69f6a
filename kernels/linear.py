"""Triton kernels for the fused-linear log-probs and cross-entropy (docs/losses.md §2): the logits
``z = softcap(h @ W^T + b)`` are formed a ``[BLOCK_M, BLOCK_V]`` tile at a time in registers (``tl.dot``,
fp32 accumulation) and folded into per-row statistics; no ``[N, V]`` tensor reaches global memory.

With d = (z - m) / T relative to a running row max m (raw logit units, as a standard log_softmax):

    forward, per row and vocabulary split:   m = max z,  s = sum exp(d),  w = sum exp(d) d,
                                             z_y (the label's logit); with the stats also
                                             s2 = sum exp(2 d),  sum_v z_v,  max_{v < y} z_v
    merged over splits (torch, O(splits N)):  logsum = log S,  log q = (z - max)/T - logsum,
                                             logprob = (z_y - max)/T - logsum,  entropy = logsum - W/S,
                                             log_sum_sq = log sum q^2 = log S2 - 2 logsum,
                                             mean_logit = sum_v z_v / (T V) (at T = 1 the label
                                             smoothing's mean logit),  is_top1 = 1.0 iff y is the
                                             first argmax: z_y >= max and z_y > max_{v < y} z_v
    backward, per tile (recomputed):         dz_v = c1 [v = y] + q_v (c2 + c3 log q_v) + c4,
                                             times 1 - tanh^2(x / softcap) under a soft cap;
                                             grad_h += dz @ W,  grad_W += dz^T h,  grad_b += sum dz

The four per-row coefficients (computed in torch from the upstream gradients, 0 on ignored rows) cover
``logprobs`` (c1 = g/T, c2 = -(g + g_H H)/T, c3 = -g_H/T, c4 = 0) and the cross-entropy with label
smoothing eps and an lse gradient (c1 = -(1 - eps) g, c2 = g + g_lse, c3 = 0, c4 = -eps g / V). The
backward accumulates ``grad_h`` and ``grad_W`` in fp32 with atomic adds (each program adds a
``[BLOCK_M, D]`` and a ``[BLOCK_V, D]`` block, as Cut Cross-Entropy's backward does), and skips row
blocks whose coefficients are all 0 (ignored prompt tokens) before any matmul: exactly, not by a
threshold on the softmax as CCE's filter does.

FLOPs, in products of 2 N D V: forward 1 (the logits), backward 3 (the logits again, grad_h, grad_W): 4
in all, where a trainer that stores the logits does 3 and keeps ``[N, V]``. Computing the gradient in the
forward instead (no recomputation) would cost 3 but hold fp32 ``grad_h`` / ``grad_W`` per upstream input
(two for logprob + entropy) and need the upstream gradients before they exist.

Bytes (bf16 inputs; at N = 16384, D = 4096, V = 128256): the inputs are N D + V D entries (1.1 GiB) and must
be read once; like any matmul tiling, the tiles re-read them from L2 (h once per vocabulary tile, W once
per row block), and the launch orders keep the resident programs on few row blocks so that those re-reads
hit L2 (split_program, grouped_tile). The forward writes 3 fp32 numbers per row and split (4 with the entropy,
3 more with the stats). The backward
adds N D V / BLOCK_V fp32 into grad_h and V D N / BLOCK_M into grad_W by atomics (2 x 6.7e10 at 128 x 128
tiles: 0.5 TiB of atomic traffic to L2, against 6.9e13 FLOP of matmuls; the exact skip of zero-gradient row
blocks removes the prompt's share). That traffic is this design's risk (Cut Cross-Entropy's backward has the
same and filters blocks of negligible gradient); the chunked path has none. Untimed: no GPU has run these
kernels yet.
"""

import torch
import triton
import triton.language as tl

from .divergence import NEG_INF, finite_or_zero
from .launch import on_device

# (BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages) of the tile kernels on a GPU (no spills on sm_80 /
# sm_90 in tests/triton_aot.py; untimed), and the 16-wide tiles run under the interpreter so that the CPU
# tests cross row-block, vocabulary-tile, split and K boundaries at small sizes (tl.dot's least size).
FORWARD_TILE = (128, 128, 64, 8, 3)
BACKWARD_TILE = (128, 128, 64, 8, 2)
INTERPRETER_TILE = (16, 16, 16, 1, 1)
# Rows of the fp32 buffer in which a bf16 / fp16 weight's gradient is accumulated, by device type (a multiple of
# every BLOCK_V): on a GPU 8192, 128 MiB at D = 4096 where an fp32 [V, D] accumulator is 2 GiB at V = 128256; 32
# under the interpreter, so that the tests cross ranges.
GRAD_WEIGHT_ROWS = {"cpu": 32, "cuda": 8192}
# Least vocabulary splits of a forward sweep on a GPU (forward_grid), and row blocks per group of the backward's
# grouped order (grouped_tile): both keep the programs resident at once on a few row blocks' hidden states.
MIN_SPLITS = 8
GROUP_M = 8


@triton.jit
def tanh(x):
    """tanh(x) = sign(x) (1 - e) / (1 + e) with e = exp(-2 |x|): no overflow, one exp."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0.0, -t, t)


@triton.jit
def logit_tile(
    h_ptr, w_ptr, b_ptr, row_offsets, row_mask, cols, col_mask, D, stride_hd, stride_wv, stride_wd, softcap,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """(z, t): the [BLOCK_M, BLOCK_V] fp32 logits softcap(h W^T + b) of the rows at ``row_offsets`` (element
    offsets of their hidden states) and the vocabulary entries ``cols``, -inf outside ``col_mask``; and
    t = tanh(x / softcap) for the gradient (0 without a soft cap). DOT_FP32 upcasts the operands (the
    interpreter's bf16 tl.dot is wrong)."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    for k in range(0, D, BLOCK_K):
        k_mask = k + ks < D
        h = tl.load(h_ptr + row_offsets[:, None] + (k + ks)[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        w = tl.load(w_ptr + cols[None, :].to(tl.int64) * stride_wv + (k + ks)[:, None] * stride_wd,
                    mask=col_mask[None, :] & k_mask[:, None], other=0.0)  # fmt: skip
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    t = tl.zeros([BLOCK_M, BLOCK_V], tl.float32)
    if SOFTCAP:
        t = tanh(acc / softcap)
        acc = softcap * t
    return tl.where(col_mask[None, :], acc, NEG_INF), t


@triton.jit
def accumulate_linear_grads(
    dz, h_ptr, w_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr, rows, row_offsets, row_mask, cols, col_mask, v_start,
    D, stride_hd, stride_wv, stride_wd, HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_K: tl.constexpr,
):  # fmt: skip
    """grad_h[rows] += dz @ W[cols], grad_W[cols - v_start] += dz^T h[rows], grad_b[cols] += sum_rows dz: atomic
    fp32 adds of a [BLOCK_M, D] and a [BLOCK_V, D] block, BLOCK_K columns at a time, from the [BLOCK_M, BLOCK_V]
    fp32 dz (0 outside the masks), rounded to the weight's dtype for the matmuls."""
    if HAS_BIAS:
        tl.atomic_add(grad_b_ptr + cols, tl.sum(dz, 0), mask=col_mask)
    if DOT_FP32:
        dz_op = dz
    else:
        dz_op = dz.to(w_ptr.dtype.element_ty)
    ks = tl.arange(0, BLOCK_K)
    for k in range(0, D, BLOCK_K):
        k_mask = k + ks < D
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * stride_wv + (k + ks)[None, :] * stride_wd,
                    mask=col_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        h = tl.load(h_ptr + row_offsets[:, None] + (k + ks)[None, :] * stride_hd,
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # fmt: skip
        if DOT_FP32:
            w = w.to(tl.float32)
            h = h.to(tl.float32)
        grad_h = tl.dot(dz_op, w, input_precision=PRECISION)  # [BLOCK_M, BLOCK_K]
        tl.atomic_add(grad_h_ptr + rows[:, None].to(tl.int64) * D + (k + ks)[None, :], grad_h,
                      mask=row_mask[:, None] & k_mask[None, :])  # fmt: skip
        grad_w = tl.dot(tl.trans(dz_op), h, input_precision=PRECISION)  # [BLOCK_V, BLOCK_K]
        tl.atomic_add(grad_w_ptr + (cols - v_start)[:, None].to(tl.int64) * D + (k + ks)[None, :], grad_w,
                      mask=col_mask[:, None] & k_mask[None, :])  # fmt: skip


@triton.jit
def split_program(N, V, split_size, BLOCK_M: tl.constexpr):
    """(rows, split) of a forward program. The 1-D grid runs the vocabulary splits of one row block side by side,
    so that the programs resident at once share a few row blocks' hidden states and walk the weight's tiles
    together: both stay in L2 (row blocks in order would hold every row's hidden states at once)."""
    num_splits = tl.cdiv(V, split_size)
    pid = tl.program_id(0)
    return (pid // num_splits) * BLOCK_M + tl.arange(0, BLOCK_M), pid % num_splits


@triton.jit
def grouped_tile(N, V, v_start, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, GROUP_M: tl.constexpr):
    """(rows, cols) of a backward program over vocabulary entries v_start..V-1, in the grouped order of Triton's
    matmul tutorial: GROUP_M row blocks by every vocabulary tile, the row blocks varying fastest, so that the
    resident programs share GROUP_M blocks of hidden states and a few tiles of the weight in L2."""
    num_row_blocks = tl.cdiv(N, BLOCK_M)
    per_group = GROUP_M * tl.cdiv(V - v_start, BLOCK_V)
    pid = tl.program_id(0)
    first = (pid // per_group) * GROUP_M
    size = tl.minimum(num_row_blocks - first, GROUP_M)
    row_block = first + (pid % per_group) % size
    tile = (pid % per_group) // size
    return row_block * BLOCK_M + tl.arange(0, BLOCK_M), v_start + tile * BLOCK_V + tl.arange(0, BLOCK_V)


@triton.jit
def hidden_offsets(rows, L, stride_hb, stride_hl):
    """Element offsets of the hidden states of rows r = b L + l of a (B, L, D) view, in int64."""
    rows = rows.to(tl.int64)
    return (rows // L) * stride_hb + (rows % L) * stride_hl


@triton.jit
def linear_logprobs_forward_kernel(
    # data ptrs
    h_ptr,  # (B, L, D) hidden states
    w_ptr,  # [V, D] weight
    b_ptr,  # [V] bias (HAS_BIAS only)
    labels_ptr,  # (N,) int64, N = B L
    m_ptr,  # (S, N) fp32 out: per split, the row max of z
    s_ptr,  # (S, N) fp32 out: sum exp((z - m) / T)
    w_sum_ptr,  # (S, N) fp32 out: sum exp(d) d (WITH_ENTROPY only)
    z_label_ptr,  # (S, N) fp32 out: z of the label if the split holds it, else 0
    s2_ptr,  # (S, N) fp32 out: sum exp((z - m) 2 / T) (WITH_STATS only)
    z_sum_ptr,  # (S, N) fp32 out: sum z (WITH_STATS only)
    before_ptr,  # (S, N) fp32 out: max of z over the entries before the label, -inf if none (WITH_STATS only)
    # shapes
    N,
    L,
    V,
    D,
    split_size,  # vocabulary entries per split, a multiple of BLOCK_V
    # strides
    stride_hb,
    stride_hl,
    stride_hd,
    stride_wv,
    stride_wd,
    # constants
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    WITH_ENTROPY: tl.constexpr,
    WITH_STATS: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    rows, split = split_program(N, V, split_size, BLOCK_M)
    row_mask = rows < N
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=ignore_index)
    if tl.max((labels != ignore_index).to(tl.int32), 0) == 0:
        return  # every row ignored: the merge never reads this block's partials
    row_offsets = hidden_offsets(rows, L, stride_hb, stride_hl)
    v_start = split * split_size
    v_end = tl.minimum(v_start + split_size, V)
    m = tl.full([BLOCK_M], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    w_sum = tl.zeros([BLOCK_M], tl.float32)
    z_label = tl.zeros([BLOCK_M], tl.float32)
    s2 = tl.zeros([BLOCK_M], tl.float32)
    z_sum = tl.zeros([BLOCK_M], tl.float32)
    before = tl.full([BLOCK_M], NEG_INF, tl.float32)
    for v0 in range(v_start, v_end, BLOCK_V):
        cols = v0 + tl.arange(0, BLOCK_V)
        col_mask = cols < v_end
        z, _ = logit_tile(
            h_ptr, w_ptr, b_ptr, row_offsets, row_mask, cols, col_mask, D, stride_hd, stride_wv, stride_wd,
            softcap, HAS_BIAS, SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
        )  # fmt: skip
        m_new = tl.maximum(m, tl.max(z, 1))
        m_ref = finite_or_zero(m_new)
        d = (z - m_ref[:, None]) * inv_temperature
        e = tl.exp(d)  # one exp per logit; 0 for -inf entries
        if WITH_ENTROPY:  # w' = r (w + shift s) + sum e d, shift = (m - m') / T, r = exp(shift)
            shift = tl.where(m == NEG_INF, 0.0, (m - m_ref) * inv_temperature)
            w_sum = tl.exp(shift) * (w_sum + shift * s) + tl.sum(tl.where(e > 0.0, e * d, 0.0), 1)
        r = tl.exp((m - m_ref) * inv_temperature)
        s = s * r + tl.sum(e, 1)
        m = m_new
        z_label += tl.sum(tl.where(cols[None, :] == labels[:, None], z, 0.0), 1)
        if WITH_STATS:  # exp(2 d) = exp(d)^2: no further exp
            s2 = s2 * (r * r) + tl.sum(e * e, 1)
            z_sum += tl.sum(tl.where(col_mask[None, :], z, 0.0), 1)
            before = tl.maximum(before, tl.max(tl.where(cols[None, :] < labels[:, None], z, NEG_INF), 1))
    out = split.to(tl.int64) * N + rows
    tl.store(m_ptr + out, m, mask=row_mask)
    tl.store(s_ptr + out, s, mask=row_mask)
    tl.store(z_label_ptr + out, z_label, mask=row_mask)
    if WITH_ENTROPY:
        tl.store(w_sum_ptr + out, w_sum, mask=row_mask)
    if WITH_STATS:
        tl.store(s2_ptr + out, s2, mask=row_mask)
        tl.store(z_sum_ptr + out, z_sum, mask=row_mask)
        tl.store(before_ptr + out, before, mask=row_mask)


@triton.jit
def linear_rows_backward_kernel(
    # data ptrs
    h_ptr,  # (B, L, D) hidden states
    w_ptr,  # [V, D] weight
    b_ptr,  # [V] bias (HAS_BIAS only)
    labels_ptr,  # (N,) int64
    max_ptr,  # (N,) fp32: row max of z
    logsum_ptr,  # (N,) fp32: log sum exp((z - max) / T)
    coef_ptr,  # (4, N) fp32: c1..c4 of dz = c1 onehot + q (c2 + c3 log q) + c4, 0 on ignored rows
    grad_h_ptr,  # (N, D) fp32, accumulated
    grad_w_ptr,  # [V - v_start, D] fp32, accumulated: the rows of entries v_start..V-1
    grad_b_ptr,  # [V] fp32, accumulated (HAS_BIAS only)
    # shapes
    N,
    L,
    V,  # the end of this launch's vocabulary range
    D,
    # strides
    stride_hb,
    stride_hl,
    stride_hd,
    stride_wv,
    stride_wd,
    # constants
    v_start,  # the first vocabulary entry of this launch's range
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    DOT_FP32: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    rows, cols = grouped_tile(N, V, v_start, BLOCK_M, BLOCK_V, GROUP_M)
    row_mask = rows < N
    c1 = tl.load(coef_ptr + rows, mask=row_mask, other=0.0)
    c2 = tl.load(coef_ptr + N + rows, mask=row_mask, other=0.0)
    c3 = tl.load(coef_ptr + 2 * N + rows, mask=row_mask, other=0.0)
    c4 = tl.load(coef_ptr + 3 * N + rows, mask=row_mask, other=0.0)
    if tl.max(tl.abs(c1) + tl.abs(c2) + tl.abs(c3) + tl.abs(c4), 0) == 0.0:
        return  # a zero gradient: nothing to add
    col_mask = cols < V
    row_offsets = hidden_offsets(rows, L, stride_hb, stride_hl)
    z, t = logit_tile(
        h_ptr, w_ptr, b_ptr, row_offsets, row_mask, cols, col_mask, D, stride_hd, stride_wv, stride_wd,
        softcap, HAS_BIAS, SOFTCAP, DOT_FP32, PRECISION, BLOCK_M, BLOCK_V, BLOCK_K,
    )  # fmt: skip
    labels = tl.load(labels_ptr + rows, mask=row_mask, other=-1)
    max_z = tl.load(max_ptr + rows, mask=row_mask, other=0.0)
    logsum = tl.load(logsum_ptr + rows, mask=row_mask, other=0.0)
    log_q = (z - max_z[:, None]) * inv_temperature - logsum[:, None]
    q = tl.exp(log_q)
    dz = tl.where(q > 0.0, q * (c2[:, None] + c3[:, None] * log_q), 0.0) + c4[:, None]
    dz += tl.where(cols[None, :] == labels[:, None], c1[:, None], 0.0)
    dz = tl.where(row_mask[:, None] & col_mask[None, :], dz, 0.0)
    if SOFTCAP:
        dz *= 1.0 - t * t
    accumulate_linear_grads(
        dz, h_ptr, w_ptr, grad_h_ptr, grad_w_ptr, grad_b_ptr, rows, row_offsets, row_mask, cols, col_mask, v_start,
        D, stride_hd, stride_wv, stride_wd, HAS_BIAS, DOT_FP32, PRECISION, BLOCK_K,
    )  # fmt: skip


def tile_config(tile: tuple[int, ...], device: torch.device) -> tuple[int, ...]:
    """(BLOCK_M, BLOCK_V, BLOCK_K, num_warps, num_stages): ``tile`` on a GPU, INTERPRETER_TILE on the CPU."""
    return tile if device.type == "cuda" else INTERPRETER_TILE


def matmul_args(hidden: torch.Tensor, bias, softcap) -> dict:
    """The constexprs shared by the tile kernels. fp32 operands run as tf32 when torch's matmuls do
    (``torch.backends.cuda.matmul.allow_tf32``); the precision does not apply to bf16 / fp16 operands."""
    interpreted = hidden.device.type != "cuda"
    return dict(
        HAS_BIAS=bias is not None,
        SOFTCAP=softcap is not None,
        DOT_FP32=interpreted,
        PRECISION="tf32" if torch.backends.cuda.matmul.allow_tf32 and not interpreted else "ieee",
    )


def linear_strides(hidden: torch.Tensor, weight: torch.Tensor) -> tuple[int, ...]:
    """(stride_hb, stride_hl, stride_hd, stride_wv, stride_wd) of a (B, L, D) hidden and its [V, D] weight."""
    return (*hidden.stride(), *weight.stride())


def forward_grid(N: int, V: int, device: torch.device) -> tuple[tuple[int, ...], tuple[int], int, int]:
    """(tile config, 1-D grid, splits, split size) of a forward sweep (split_program). The vocabulary is split
    into whole numbers of BLOCK_V tiles: on a GPU at least MIN_SPLITS (the resident programs then cover about
    SMs / MIN_SPLITS row blocks, whose hidden states stay in L2) and enough for two programs per SM; 4 per row
    block on the CPU, so that the tests exercise the merge."""
    tile = tile_config(FORWARD_TILE, device)
    block_m, block_v = tile[:2]
    row_blocks = triton.cdiv(N, block_m)
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = max(MIN_SPLITS, triton.cdiv(2 * sms, row_blocks))
    else:
        wanted = 4
    splits = max(1, min(triton.cdiv(V, block_v), wanted))
    split_size = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    splits = triton.cdiv(V, split_size)
    return tile, (row_blocks * splits,), splits, split_size


def merge_lse(m: torch.Tensor, s: torch.Tensor, temperature: float):
    """(max, total, rescale, shift) of (S, N) per-split online states (m, s): max = max_i m_i (0 for an all
    -inf row), shift_i = (m_i - max) / T and rescale_i = exp(shift_i) (0 and 0 for an empty split), total =
    sum_i rescale_i s_i = sum_v exp((x_v - max) / T), whose log is the row's logsum."""
    max_x = m.amax(0)
    max_x = torch.where(max_x == float("-inf"), 0.0, max_x)
    empty = m == float("-inf")
    shift = torch.where(empty, 0.0, (m - max_x) / temperature)
    rescale = torch.where(empty, 0.0, torch.exp(shift))
    return max_x, (rescale * s).sum(0), rescale, shift


def linear_logprobs_forward(
    hidden: torch.Tensor,  # (B, L, D)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    labels: torch.Tensor,  # (B, L) int
    temperature: float,
    softcap: float | None,
    with_entropy: bool,
    with_stats: bool,
    ignore_index: int,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward and merge its splits: (logprob, entropy, max, logsum, log_sum_sq, mean_logit, is_top1),
    each (B, L) fp32 (entropy 0 unless with_entropy, the last three 0 unless with_stats; every output 0 on ignored
    rows). mean_logit = sum_v z_v / (T V)."""
    (B, L, D), V = hidden.shape, weight.shape[0]
    N = B * L
    labels = labels.reshape(N).long()
    valid = labels != ignore_index
    if N == 0:
        return tuple(torch.zeros((B, L), dtype=torch.float32, device=hidden.device) for _ in range(7))
    (block_m, block_v, block_k, num_warps, num_stages), grid, splits, split_size = forward_grid(N, V, hidden.device)
    m, s, w_sum, z_label, s2, z_sum, before = torch.empty((7, splits, N), dtype=torch.float32, device=hidden.device)
    with on_device(hidden):
        linear_logprobs_forward_kernel[grid](
            hidden, weight, bias if bias is not None else weight, labels, m, s, w_sum, z_label, s2, z_sum, before,
            N, L, V, D, split_size,
            *linear_strides(hidden, weight),
            1.0 / temperature, softcap or 1.0, ignore_index,
            WITH_ENTROPY=with_entropy, WITH_STATS=with_stats, **matmul_args(hidden, bias, softcap),
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
        )  # fmt: skip
    # Ignored rows' partials may never have been written: every output is 0 there.
    max_z, total, rescale, shift = merge_lse(m, s, temperature)
    max_z, logsum = torch.where(valid, max_z, 0.0), torch.where(valid, torch.log(total), 0.0)
    in_range = (labels >= 0) & (labels < V)  # a label the device-side check let through gives NaN
    z_y = z_label.sum(0)
    logp = torch.where(in_range, (z_y - max_z) / temperature - logsum, float("nan"))
    outputs = [torch.where(valid, logp, 0.0)]

    def zeros() -> torch.Tensor:  # a fresh tensor for each output that is not computed: no two outputs alias
        return torch.zeros(N, dtype=torch.float32, device=hidden.device)

    outputs.append(torch.where(valid, logsum - (rescale * (w_sum + shift * s)).sum(0) / total, 0.0) if with_entropy
                   else zeros())  # fmt: skip
    outputs += [max_z, logsum]
    if with_stats:  # s2 of each split moved to the merged max at the scale 2 / T: times rescale^2
        log_sum_sq = torch.log((rescale * rescale * s2).sum(0)) - 2.0 * logsum
        is_top1 = in_range & (z_y >= max_z) & (z_y > before.amax(0))
        outputs += [torch.where(valid, log_sum_sq, 0.0), torch.where(valid, z_sum.sum(0) / (temperature * V), 0.0),
                    torch.where(valid & is_top1, 1.0, 0.0)]  # fmt: skip
    else:
        outputs += [zeros(), zeros(), zeros()]
    return tuple(x.reshape(B, L) for x in outputs)


def backward_over_vocabulary(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, launch):
    """(grad_hidden (B, L, D) in the hidden dtype, grad_weight [V, D] in the weight's dtype, grad_bias [V] fp32 or
    [0] without bias) from a backward kernel launched over vocabulary ranges of GRAD_WEIGHT_ROWS entries:
    ``launch(grid, tile, v_start, v_end, grad_h, grad_w_rows, grad_b)`` adds the fp32 sums of entries
    v_start..v_end-1 into grad_h (N, D), grad_w_rows [v_end - v_start, D] and grad_b [V]. A non-fp32 weight's
    gradient is accumulated in one fp32 buffer of GRAD_WEIGHT_ROWS rows, cast into place after each range: the
    same rounding as an fp32 [V, D] accumulator without holding one."""
    (B, L, D), V = hidden.shape, weight.shape[0]
    N = B * L
    fp32 = weight.dtype == torch.float32
    grad_h = torch.zeros((N, D), dtype=torch.float32, device=hidden.device)
    grad_w = (torch.zeros if fp32 or N == 0 else torch.empty)((V, D), dtype=weight.dtype, device=weight.device)
    grad_b = torch.zeros((V if bias is not None else 0,), dtype=torch.float32, device=weight.device)
    if N > 0:
        tile = tile_config(BACKWARD_TILE, hidden.device)
        step = V if fp32 else GRAD_WEIGHT_ROWS[hidden.device.type]
        buffer = None if fp32 else torch.empty((min(step, V), D), dtype=torch.float32, device=weight.device)
        with on_device(hidden):
            for v_start in range(0, V, step):
                v_end = min(V, v_start + step)
                rows = grad_w[v_start:v_end] if fp32 else buffer[: v_end - v_start].zero_()
                grid = (triton.cdiv(N, tile[0]) * triton.cdiv(v_end - v_start, tile[1]),)
                launch(grid, tile, v_start, v_end, grad_h, rows, grad_b)
                if not fp32:
                    grad_w[v_start:v_end] = rows
        del buffer
    return grad_h.to(hidden.dtype).reshape(B, L, D), grad_w, grad_b


def linear_rows_backward(
    hidden: torch.Tensor,  # (B, L, D)
    weight: torch.Tensor,  # [V, D]
    bias: torch.Tensor | None,  # [V]
    labels: torch.Tensor,  # (B, L) int
    max_z: torch.Tensor,  # (B, L) fp32
    logsum: torch.Tensor,  # (B, L) fp32
    coefs: torch.Tensor,  # (4, B, L) fp32: c1..c4, 0 on ignored rows
    temperature: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the backward: (grad_hidden (B, L, D), grad_weight [V, D], grad_bias [V] fp32 or [0] without bias)
    of the rows' dz = c1 onehot + q (c2 + c3 log q) + c4 (backward_over_vocabulary)."""
    (B, L, D) = hidden.shape
    N = B * L
    row_inputs = (labels.reshape(N).long(), max_z.reshape(N).contiguous(), logsum.reshape(N).contiguous(),
                  coefs.reshape(4, N).contiguous())  # fmt: skip

    def launch(grid, tile, v_start, v_end, grad_h, grad_w_rows, grad_b):
        block_m, block_v, block_k, num_warps, num_stages = tile
        linear_rows_backward_kernel[grid](
            hidden, weight, bias if bias is not None else weight, *row_inputs,
            grad_h, grad_w_rows, grad_b if bias is not None else grad_h,
            N, L, v_end, D,
            *linear_strides(hidden, weight),
            v_start, 1.0 / temperature, softcap or 1.0,
            **matmul_args(hidden, bias, softcap),
            BLOCK_M=block_m, BLOCK_V=block_v, BLOCK_K=block_k, GROUP_M=GROUP_M, num_warps=num_warps,
            num_stages=num_stages,
        )  # fmt: skip

    return backward_over_vocabulary(hidden, weight, bias, launch)
