"""Triton kernels for divergences against a sparse top-k teacher (klops.TopK; docs/losses.md §1).

One program handles one row (token). The teacher is k sorted token ids S with their log-probs; the
student is the full-vocabulary softmax q = softmax(z / T). Outcomes: the k members, plus one tail
outcome that holds the student's mass outside S, Q = sum_{v not in S} q_v:

    tail="bin"          teacher (p_S, P = max(0, 1 - sum p_S)), student (q_S, Q); no tail when k = V
    tail="renormalize"  teacher p_S / sum p_S and 0 elsewhere: the tail's terms are linear in Q,
                        loss_tail = tail_loss Q and a_tail = tail_grad Q (constants of the kind)

    D    = sum_S loss(q_i, p_i) + loss_tail
    gbar = sum_S a_i + a_tail
    dz_j = (a_j - q_j gbar) / T                           j in S  (the k corrections, d_j)
    dz_j = qc_j (a_tail - Q gbar) / T                     j not in S, qc_j = q_j / Q

qc = softmax over the entries outside S. The sweep over the row computes its statistics (max_c,
logsum_c) directly, with each member set to -inf as the walk over the sorted ids reaches it, so that
log Q = lse_c - lse keeps full precision however small Q is (1 - sum q_S would cancel to rounding).
The members' logits are gathered (k loads) and combined with (max_c, logsum_c) into the full lse.

Forward: one sweep over the row (1 exp per entry), then three passes over the k members. Backward: one
sweep that writes dz (1 exp per entry) and puts the k corrections in place as the walk reaches them;
it needs neither the teacher nor the kind. Per row the forward keeps D, max_c, logsum_c, the tail's
coefficient a_tail - Q gbar, and the k corrections d (fp32). The backward reads them already scaled by
the row's gradient (klops/topk.py), with the gradient of the label's log-prob folded in when asked:
-g q on every entry (into the coefficients) and +g at the label.
"""

import torch
import triton
import triton.language as tl

from .divergence import NEG_INF, _or_placeholder, divergence_terms, lse_finalize, online_lse_update, zero_row
from .kinds import DIVERGENCE_KINDS
from .launch import BACKWARD_SWEEP, FORWARD_SWEEP, launch_over_rows

# The walk's next member once every member of the row is behind it: past every block start + BLOCK_V.
PAST_THE_ROW = tl.constexpr(2147483647)
# Members handled per pass over the top-k: the whole of k up to this, then in blocks.
MAX_BLOCK_K = 256


@triton.jit
def combine_lse(max_a, logsum_a, max_b, logsum_b, inv_temperature):
    """(max, logsum) of the union of two sets of entries from theirs; an empty set has logsum -inf."""
    mx = tl.where(logsum_a == NEG_INF, max_b, tl.where(logsum_b == NEG_INF, max_a, tl.maximum(max_a, max_b)))
    total = tl.exp((max_a - mx) * inv_temperature + logsum_a) + tl.exp((max_b - mx) * inv_temperature + logsum_b)
    return mx, tl.log(total)


@triton.jit
def member_logits(z_row, idx_row, kstart, kcols, K, V):
    """(z of the members kstart + kcols in fp32, lane mask): -inf on lanes past k; an id outside [0, V)
    (possible only when the eager checks are skipped) is never read and gives NaN."""
    kmask = kstart + kcols < K
    idx = tl.load(idx_row + kstart + kcols, mask=kmask, other=0)
    inside = (idx >= 0) & (idx < V)
    z = tl.load(z_row + idx, mask=kmask & inside, other=NEG_INF).to(tl.float32)
    return tl.where(kmask & ~inside, z - z, z), kmask  # -inf - -inf: NaN


@triton.jit
def topk_divergence_forward_kernel(
    # data ptrs
    z_ptr,  # (B, L, V) student logits, last-dim stride 1
    idx_ptr,  # (B*L, K) int32 teacher token ids, sorted within each row
    tlp_ptr,  # (B*L, K) teacher log-probs of those ids
    valid_ptr,  # (B*L,) bool: False rows get 0 everywhere
    loss_ptr,  # (B*L,) fp32 out: D per row
    max_c_ptr,  # (B*L,) fp32 out: raw max of z outside the top-k (0 when none is finite)
    logsum_c_ptr,  # (B*L,) fp32 out: log sum exp((z - max_c)/T) outside the top-k
    tail_scale_ptr,  # (B*L,) fp32 out: a_tail - Q gbar, as a_tail sum q_S - Q sum a_S
    member_d_ptr,  # (B*L, K) fp32 out: d_i = a_i - q_i gbar
    # shapes
    L,
    V,
    K,
    # strides
    stride_zb,
    stride_zl,
    # constants
    inv_temperature,
    coef,
    tail_loss,
    tail_grad,
    KIND: tl.constexpr,
    BIN: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    idx_row = idx_ptr + row * K
    tlp_row = tlp_ptr + row * K
    d_row = member_d_ptr + row * K
    kcols = tl.arange(0, BLOCK_K)
    if tl.load(valid_ptr + row) == 0:
        tl.store(loss_ptr + row, 0.0)
        tl.store(max_c_ptr + row, 0.0)
        tl.store(logsum_c_ptr + row, 0.0)
        tl.store(tail_scale_ptr + row, 0.0)
        for kstart in range(0, K, BLOCK_K):
            tl.store(d_row + kstart + kcols, tl.zeros([BLOCK_K], tl.float32), mask=kstart + kcols < K)
        return
    z_row = z_ptr + (row // L) * stride_zb + (row % L) * stride_zl
    cols = tl.arange(0, BLOCK_V)

    # Sweep: (max, logsum) of the entries outside the top-k, walking the sorted ids alongside.
    m = tl.full([BLOCK_V], NEG_INF, tl.float32)
    s = tl.zeros([BLOCK_V], tl.float32)
    ptr = 0
    nxt = tl.load(idx_row)
    for start in range(0, V, BLOCK_V):
        z = tl.load(z_row + start + cols, mask=start + cols < V, other=NEG_INF).to(tl.float32)
        while nxt < start + BLOCK_V:
            z = tl.where(cols == nxt - start, NEG_INF, z)
            ptr += 1
            nxt = tl.load(idx_row + ptr, mask=ptr < K, other=PAST_THE_ROW)
        m, s = online_lse_update(m, s, z, inv_temperature)
    max_c, logsum_c = lse_finalize(m, s, inv_temperature)

    # Members, pass 1: their (max, logsum), for the full lse; and log sum p_S of the teacher.
    m_s = tl.full([BLOCK_K], NEG_INF, tl.float32)
    s_s = tl.zeros([BLOCK_K], tl.float32)
    m_p = tl.full([BLOCK_K], NEG_INF, tl.float32)
    s_p = tl.zeros([BLOCK_K], tl.float32)
    for kstart in range(0, K, BLOCK_K):
        z_s, kmask = member_logits(z_row, idx_row, kstart, kcols, K, V)
        lp = tl.load(tlp_row + kstart + kcols, mask=kmask, other=NEG_INF).to(tl.float32)
        m_s, s_s = online_lse_update(m_s, s_s, z_s, inv_temperature)
        m_p, s_p = online_lse_update(m_p, s_p, lp, 1.0)
    max_s, logsum_s = lse_finalize(m_s, s_s, inv_temperature)
    max_p, logsum_p = lse_finalize(m_p, s_p, 1.0)
    log_mass_p = max_p + logsum_p  # log sum p_S
    max_q, logsum_q = combine_lse(max_c, logsum_c, max_s, logsum_s, inv_temperature)
    log_tail_q = (max_c - max_q) * inv_temperature + logsum_c - logsum_q  # log Q, -inf when S is everything
    if BIN:
        log_tail_p = tl.where(K < V, tl.log(tl.maximum(1.0 - tl.exp(log_mass_p), 0.0)), NEG_INF)
        loss_tail, a_tail = divergence_terms(log_tail_q, log_tail_p, coef, KIND)
        shift_p = 0.0
    else:
        loss_tail = tail_loss * tl.exp(log_tail_q)
        a_tail = tail_grad * tl.exp(log_tail_q)
        shift_p = log_mass_p

    # Members, pass 2: their terms; a_i is parked in member_d until gbar is known.
    loss_acc = tl.zeros([BLOCK_K], tl.float32)
    gbar_acc = tl.zeros([BLOCK_K], tl.float32)
    for kstart in range(0, K, BLOCK_K):
        z_s, kmask = member_logits(z_row, idx_row, kstart, kcols, K, V)
        lp = tl.load(tlp_row + kstart + kcols, mask=kmask, other=NEG_INF).to(tl.float32) - shift_p
        lq = (z_s - max_q) * inv_temperature - logsum_q
        entry_loss, a = divergence_terms(lq, lp, coef, KIND)
        loss_acc += tl.where(kmask, entry_loss, 0.0)
        gbar_acc += tl.where(kmask, a, 0.0)
        tl.store(d_row + kstart + kcols, a, mask=kmask)
    a_members = tl.sum(gbar_acc, 0)
    gbar = a_members + a_tail
    tl.debug_barrier()

    # Members, pass 3: d_i = a_i - q_i gbar.
    for kstart in range(0, K, BLOCK_K):
        z_s, kmask = member_logits(z_row, idx_row, kstart, kcols, K, V)
        lq = (z_s - max_q) * inv_temperature - logsum_q
        a = tl.load(d_row + kstart + kcols, mask=kmask, other=0.0)
        tl.store(d_row + kstart + kcols, a - tl.exp(lq) * gbar, mask=kmask)
    tl.store(loss_ptr + row, tl.sum(loss_acc, 0) + loss_tail)
    tl.store(max_c_ptr + row, max_c)
    tl.store(logsum_c_ptr + row, logsum_c)
    # a_tail - Q gbar = a_tail sum q_S - Q sum a_S: both factors of each product exact, nothing of size 1
    # cancels when Q is near 1 (k small).
    mass_q_s = tl.exp((max_s - max_q) * inv_temperature + logsum_s - logsum_q)
    tl.store(tail_scale_ptr + row, a_tail * mass_q_s - tl.exp(log_tail_q) * a_members)


@triton.jit
def topk_divergence_backward_kernel(
    # data ptrs
    tail_coef_ptr,  # (B*L,) fp32: per row, the coefficient of qc outside the top-k
    z_ptr,  # (B, L, V) student logits
    idx_ptr,  # (B*L, K) int32 sorted ids
    valid_ptr,  # (B*L,) bool
    max_c_ptr,  # (B*L,) fp32: the forward's statistics outside the top-k
    logsum_c_ptr,  # (B*L,) fp32
    member_value_ptr,  # (B*L, K) fp32: per member, its gradient times T
    label_coef_ptr,  # (B*L,) fp32: the gradient of the label's log-prob (WITH_LABELS only)
    labels_ptr,  # (B*L,) int64 (WITH_LABELS only)
    dz_ptr,  # (B*L, V) out, contiguous, student dtype
    # shapes
    L,
    V,
    K,
    # strides
    stride_zb,
    stride_zl,
    # constants
    inv_temperature,
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
    idx_row = idx_ptr + row * K
    value_row = member_value_ptr + row * K
    max_c = tl.load(max_c_ptr + row)
    logsum_c = tl.load(logsum_c_ptr + row)
    tail = tl.load(tail_coef_ptr + row) * inv_temperature
    label = -1
    label_scale = 0.0
    if WITH_LABELS:
        label = tl.load(labels_ptr + row)
        label_scale = tl.load(label_coef_ptr + row) * inv_temperature
    ptr = 0
    nxt = tl.load(idx_row)
    for start in range(0, V, BLOCK_V):
        mask = start + cols < V
        z = tl.load(z_row + start + cols, mask=mask, other=NEG_INF).to(tl.float32)
        dz = tl.where(z == NEG_INF, 0.0, tail * tl.exp((z - max_c) * inv_temperature - logsum_c))
        while nxt < start + BLOCK_V:
            dz = tl.where(cols == nxt - start, tl.load(value_row + ptr) * inv_temperature, dz)
            ptr += 1
            nxt = tl.load(idx_row + ptr, mask=ptr < K, other=PAST_THE_ROW)
        if WITH_LABELS:  # the onehot of d log q(label) / dz = (onehot - q) / T (its -q is in the coefficients)
            dz += tl.where(start + cols == label, label_scale, 0.0)
        tl.store(dz_row + start + cols, dz.to(dz_ptr.dtype.element_ty), mask=mask)


def topk_block(k: int) -> int:
    """BLOCK_K: the members handled per pass, a power of two covering k up to MAX_BLOCK_K."""
    return min(MAX_BLOCK_K, triton.next_power_of_2(k))


def topk_divergence_forward(
    student: torch.Tensor,  # (B, L, V)
    indices: torch.Tensor,  # (B, L, K) int32, sorted, contiguous
    teacher_logprobs: torch.Tensor,  # (B, L, K), contiguous
    valid: torch.Tensor,  # (B, L) bool
    kind: str,
    tail: str,
    temperature: float,
    coef: float,
    tail_loss: float,
    tail_grad: float,
) -> tuple[torch.Tensor, ...]:
    """Launch the forward: (D, max_c, logsum_c, tail_scale) each (B, L) fp32, and member_d (B, L, K) fp32."""
    B, L, V = student.shape
    K = indices.shape[-1]
    rows = tuple(torch.empty((B, L), dtype=torch.float32, device=student.device) for _ in range(4))
    member_d = torch.empty((B, L, K), dtype=torch.float32, device=student.device)
    launch_over_rows(
        topk_divergence_forward_kernel, student,
        student, indices, teacher_logprobs, valid.contiguous(), *rows, member_d,
        L, V, K, student.stride(0), student.stride(1),
        1.0 / temperature, coef, tail_loss, tail_grad,
        KIND=DIVERGENCE_KINDS.index(kind), BIN=tail == "bin", BLOCK_K=topk_block(K), sweep=FORWARD_SWEEP,
    )  # fmt: skip
    return (*rows, member_d)


def topk_divergence_backward(
    tail_coef: torch.Tensor,  # (B, L) fp32
    student: torch.Tensor,  # (B, L, V)
    indices: torch.Tensor,  # (B, L, K) int32, sorted, contiguous
    valid: torch.Tensor,  # (B, L) bool
    max_c: torch.Tensor,  # (B, L) fp32
    logsum_c: torch.Tensor,  # (B, L) fp32
    member_value: torch.Tensor,  # (B, L, K) fp32
    label_coef: torch.Tensor | None,  # (B, L) fp32
    labels: torch.Tensor | None,  # (B, L) int64
    temperature: float,
) -> torch.Tensor:
    """Launch the backward: dz = (qc tail_coef outside the top-k, member_value on it, + label_coef at the label)
    / T, (B, L, V) in the student's dtype."""
    B, L, V = student.shape
    dz = torch.empty((B, L, V), dtype=student.dtype, device=student.device)
    with_labels = label_coef is not None
    launch_over_rows(
        topk_divergence_backward_kernel, student,
        tail_coef.contiguous(), student, indices, valid.contiguous(), max_c.contiguous(), logsum_c.contiguous(),
        member_value.contiguous(), _or_placeholder(label_coef, tail_coef), _or_placeholder(labels, valid), dz,
        L, V, indices.shape[-1], student.stride(0), student.stride(1), 1.0 / temperature,
        WITH_LABELS=with_labels, sweep=BACKWARD_SWEEP,
    )  # fmt: skip
    return dz
