"""Vocabulary-parallel forms of ``divergence_and_label_logprobs``, ``forward_reverse_kl``, ``akl_weights`` and
``akl_loss`` (issue 33; docs/losses.md "Vocabulary-parallel ops"), on the plumbing of klops/vocab_parallel.py: each
rank holds the slice ``[start_r, start_r + V_r)`` of both logits, labels are global ids, every rank returns the
same values and the gradient of its own shard. ``dckd_loss`` threads ``vocab_group`` through the ops it is made of.
Also ``TopK`` teachers (replicated, global ids) for ``fused_kl`` and ``divergence_and_label_logprobs``.

divergence_and_label_logprobs. ``fused_kl``'s rounds (klops/vocab_parallel.py) with the label's logit of both
inputs riding along in the first all-gather (the rank holding the label sends ``z_y``, ``y_y``; the others 0):
``log q(y) = (z_y - M_q) / T - logsum_q``, ``log p(y)`` likewise. Forward / reverse KL: one all-gather of 7 fp32
per row; other kinds: 6 fp32 all-gathered, then 2 all-reduced. Backward: no collective, the single-process chunk
gradient (klops/divergence.py) with the label's one-hot only on the rank that holds it.

forward_reverse_kl. Both KLs by the chain rule over the shards (as ``fused_kl``'s forward / reverse KL), with
``KL(p^r||q^r)`` and ``KL(q^r||p^r)`` from klops's own ``kl_pair`` op on the shard: one all-gather of 6 fp32 per
row; the backward is ``kl_pair``'s own with the global statistics, no collective.

AKL's weights. The head is the entries of ``p`` above the boundary value ``t`` and the share of those tied with it
that fits under ``mu`` (``akl_split`` in klops/distill.py); ``t`` is the value with ``mass(p > t) <= mu <
mass(p >= t)``, i.e. the largest ``t`` with ``mass(p >= t) > mu``. Probabilities are non-negative floats, whose bits
order as integers, so a bisection over the fp32 bits of ``t`` in ``[0, 1]`` finds it exactly: 30 rounds, each one
all-reduce of the rows' ``mass(p >= t)`` (1 fp32 per row). Then one all-reduce of 5 fp32 per row (mass above ``t``,
the number of ties, the gaps ``|p - q|`` above, tied and in all) gives the single-process weight. The sums' order
differs from the single-process sort's running sum: a boundary within rounding of ``mu`` may fall on a neighbour.
"""

import math

import torch

from . import _inputs
from ._chunked import log_softmax_from_stats, row_chunks, row_stats, scaled
from ._terms import divergence_terms
from .backend import resolve
from .distill import kl_pair_backward_op, kl_pair_op
from .distributed import vocab_parallel_form
from .divergence import check_divergence_options, divergence_grad_rows, reduce_rows, valid_rows_and_weights
from .topk import TopK, renormalized_tail_terms, sorted_topk
from .vocab_parallel import (
    all_gather_rows,
    all_reduce_sum,
    chain_rule,
    chain_rule_kl,
    local_labels,
    merge_logsumexp,
    plain,
    topk_members,
    two_round_divergence,
    vocab_shard,
)

# ----------------------------------------------------------------------------------------------------
# divergence_and_label_logprobs


class _DivergenceAndLabels(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, labels, valid, shard, kind, temperature, coef, backend):
        local, owned = local_labels(labels, valid, shard)
        at_label = torch.stack([x.gather(-1, local[..., None])[..., 0].float() for x in (student, teacher)], -1)
        extra = torch.where(owned[..., None], at_label, 0.0)
        if kind in ("forward", "reverse"):
            rows, *stats, label_logits = chain_rule_kl(student, teacher, valid, shard, kind, temperature, backend,
                                                       extra)  # fmt: skip
        else:
            rows, *stats, label_logits = two_round_divergence(student, teacher, valid, shard, kind, "logits",
                                                              temperature, coef, extra)  # fmt: skip
        top_q, total_q, top_p, total_p, _ = stats
        logp = torch.where(valid, scaled(label_logits[..., 0] - top_q, temperature) - total_q, 0.0)
        teacher_logp = torch.where(valid, scaled(label_logits[..., 1] - top_p, temperature) - total_p, 0.0)
        ctx.mark_non_differentiable(teacher_logp)
        ctx.save_for_backward(student, teacher, valid, local, owned, *stats)
        ctx.params = (kind, temperature, coef)
        return rows, logp, teacher_logp

    @staticmethod
    def backward(ctx, grad, grad_logp, _):
        student, teacher, valid, local, owned, *stats = ctx.saved_tensors
        kind, temperature, coef = ctx.params
        B, L, V = student.shape
        grad = torch.zeros_like(valid, dtype=torch.float32) if grad is None else grad
        dz = torch.empty_like(student)
        for b, rows in row_chunks(B, L, V):
            label_grad = None if grad_logp is None else (local[b, rows], grad_logp[b, rows])
            chunk = divergence_grad_rows(grad[b, rows], label_grad, student[b, rows], teacher[b, rows],
                                         *(x[b, rows] for x in stats), kind, "logits", temperature, coef)  # fmt: skip
            if grad_logp is not None:  # the one-hot belongs to the rank holding the label: the others take it back
                elsewhere = torch.where(owned[b, rows], 0.0, -grad_logp[b, rows] / temperature)
                chunk.scatter_add_(-1, local[b, rows][:, None], elsewhere[:, None])
            dz[b, rows] = chunk.masked_fill_(~valid[b, rows][:, None], 0.0)
        return dz, *(None,) * 8


@vocab_parallel_form("divergence_and_label_logprobs")
def divergence_and_label_logprobs(student_logits, teacher_logits, labels, kind, *, beta, alpha, temperature, mask,
                                  ignore_index, backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.divergence_and_label_logprobs`` over vocabulary-sharded student and teacher logits ``[..., V_r]`` (the
    same shards). Per token each rank sends 28 bytes (forward / reverse KL: one all-gather of 7 fp32) or 24 + 8
    (other kinds: an all-gather of 6 fp32, an all-reduce of 2; a TopK teacher: 5 fp32 and 2), plus the shard sizes;
    the backward sends nothing. Returns plain tensors, replicated."""
    topk = isinstance(teacher_logits, TopK)
    count = 1 if topk else 2  # a TopK teacher is replicated, its ids global
    names, sharded = ["student_logits", "teacher_logits"][:count], [student_logits, teacher_logits][:count]
    (student, *teacher), shard = vocab_shard(names, sharded, vocab_group, vocab_start)
    labels, mask = plain(labels), plain(mask)
    _inputs.check_logits("student_logits", student)
    if not topk:
        _inputs.check_dense_teacher(teacher[0], student)
    kernel_kind, coef, temperature = check_divergence_options(kind, beta, alpha, temperature, "logits", "none", None)
    valid, _ = valid_rows_and_weights("student_logits", student, shard.total, labels, mask, None, ignore_index)
    if topk:
        rows, logp = topk_rows(student, teacher_logits, valid, shard, kernel_kind, kind, coef, temperature, labels)
        return rows, logp, None
    (teacher,) = teacher
    backend = resolve("divergence", backend, student.device)
    student3, teacher3 = _inputs.as_rows(student, teacher)
    rows_shape = student3.shape[:2]
    labels3, valid3 = labels.long().reshape(rows_shape), valid.reshape(rows_shape)
    outputs = _DivergenceAndLabels.apply(student3, teacher3, labels3, valid3, shard, kernel_kind, temperature, coef,
                                         backend)  # fmt: skip
    return tuple(x.reshape(valid.shape) for x in outputs)


# ----------------------------------------------------------------------------------------------------
# forward_reverse_kl, akl_weights, akl_loss


class _KLPair(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, shard, temperature, backend):
        B, L, _ = student.shape
        _, local = kl_pair_op(student, teacher, valid, temperature, 0.5, False, backend)
        kl_pq, kl_qp, max_q, logsum_q, max_p, logsum_p = local.reshape(B, L, 6).unbind(-1)
        empty = (logsum_q == -math.inf) | (logsum_p == -math.inf)  # a shard without one's mass: no KL within it
        kl_pq, kl_qp = torch.where(empty, 0.0, kl_pq), torch.where(empty, 0.0, kl_qp)
        stats = all_gather_rows(torch.stack((max_q, logsum_q, max_p, logsum_p, kl_pq, kl_qp), -1), shard.group)
        mq, lsq, mp, lsp, d_pq, d_qp = stats.unbind(-1)
        top_q, total_q, log_pi_q = merge_logsumexp(mq, lsq, temperature)
        top_p, total_p, log_pi_p = merge_logsumexp(mp, lsp, temperature)
        kl_pq, kl_qp = chain_rule(log_pi_p, log_pi_q, d_pq), chain_rule(log_pi_q, log_pi_p, d_qp)
        merged = torch.stack((kl_pq, kl_qp, top_q, total_q, top_p, total_p), -1)
        merged = torch.where(valid[..., None], merged, 0.0).reshape(B * L, 6)
        ctx.save_for_backward(student, teacher, valid, merged)
        ctx.params = (temperature, backend)
        return merged[:, 0], merged[:, 1], merged[:, 2:]

    @staticmethod
    def backward(ctx, grad_pq, grad_qp, _):
        student, teacher, valid, merged = ctx.saved_tensors
        grads = [torch.zeros_like(merged[:, 0]) if g is None else g for g in (grad_pq, grad_qp)]
        dz = kl_pair_backward_op(torch.stack(grads, -1), student, teacher, valid, merged, *ctx.params)
        return dz, *(None,) * 5


def _mass_at_least(teacher, stats, threshold, temperature):
    """[B, L] fp32: this shard's sum of p_v over the entries with p_v >= threshold [B, L] (p from the global
    statistics (M_p, logsum_p) in ``stats`` [B, L, 4]), a chunk of rows at a time."""
    B, L, V = teacher.shape
    mass = teacher.new_zeros((B, L), dtype=torch.float32)
    for b, rows in row_chunks(B, L, V):
        p = log_softmax_from_stats(teacher[b, rows], stats[b, rows, 2], stats[b, rows, 3], temperature).exp_()
        mass[b, rows] = torch.where(p >= threshold[b, rows, None], p, 0.0).sum(-1)
    return mass


def _akl_weights(student, teacher, valid, shard, stats, temperature, mu):
    """[B, L] fp32 AKL weights from the global (M_q, logsum_q, M_p, logsum_p) ``stats`` [B, L, 4]: 30 all-reduces
    of 1 fp32 per row bisect the boundary's fp32 bits, one of 5 fp32 per row gives the gaps (akl_split's math)."""
    B, L, V = student.shape
    low = torch.zeros((B, L), dtype=torch.int32, device=student.device)  # mass(p >= 0) = 1 > mu
    high = torch.full_like(low, 0x3F800001)  # mass(p >= 1 + ulp) = 0 <= mu
    for _ in range(30):  # ceil(log2(0x3F800001)): high - low ends at 1
        middle = (low + high) // 2
        above = all_reduce_sum(_mass_at_least(teacher, stats, middle.view(torch.float32), temperature), shard.group)
        low, high = torch.where(above > mu, middle, low), torch.where(above > mu, high, middle)
    boundary = low.view(torch.float32)
    sums = student.new_zeros((B, L, 5), dtype=torch.float32)
    for b, rows in row_chunks(B, L, V):
        q = log_softmax_from_stats(student[b, rows], stats[b, rows, 0], stats[b, rows, 1], temperature).exp_()
        p = log_softmax_from_stats(teacher[b, rows], stats[b, rows, 2], stats[b, rows, 3], temperature).exp_()
        t = boundary[b, rows, None]
        above, tie, gap = p > t, p == t, (p - q).abs()
        sums[b, rows] = torch.stack(((p * above).sum(-1), tie.sum(-1).float(), (gap * above).sum(-1),
                                     (gap * tie).sum(-1), gap.sum(-1)), -1)  # fmt: skip
    mass_above, ties, gap_above, gap_tie, gap_total = all_reduce_sum(sums, shard.group).unbind(-1)
    boundary = torch.where(boundary > 0, boundary, 1.0)  # p = 0 is never the boundary (the mass above it is 1)
    fit = torch.floor((mu - mass_above) / boundary).clamp(min=0).minimum(ties)
    fit = torch.where(mass_above == 0, fit.clamp(min=1), fit)  # nothing above: the boundary is the argmax, in the head
    head = gap_above + torch.where(ties > 0, fit / ties.clamp(min=1), 0.0) * gap_tie
    weights = torch.where(gap_total > 0, head / torch.where(gap_total > 0, gap_total, 1.0), 0.5)
    return torch.where(valid, weights, 0.0)


def _kl_pair_rows(op, student_logits, teacher_logits, temperature, labels, mask, ignore_index, backend, vocab_group,
                  vocab_start, mu=None):  # fmt: skip
    """(KL(p||q) [...], KL(q||p) [...], AKL weights [...] or None (without mu), valid [...]) of the sharded logits,
    after the checks of ``op``'s arguments."""
    (student, teacher), shard = vocab_shard(["student_logits", "teacher_logits"], [student_logits, teacher_logits],
                                            vocab_group, vocab_start)  # fmt: skip
    labels, mask = plain(labels), plain(mask)
    _inputs.check_logits("student_logits", student)
    _inputs.check_dense_teacher(teacher, student)
    temperature = _inputs.check_temperature(temperature)
    if mu is not None:
        mu = _inputs.check_real("mu", mu, low=0.0, high=1.0, open_low=True)
        if mu == 1.0:
            raise ValueError("mu must lie in (0, 1), got 1.0")
    valid, _ = valid_rows_and_weights("student_logits", student, shard.total, labels, mask, None, ignore_index)
    backend = resolve("kl_pair", backend, student.device, name=op)
    student3, teacher3 = _inputs.as_rows(student, teacher.detach())
    valid3 = valid.reshape(student3.shape[:2])
    kl_pq, kl_qp, stats = _KLPair.apply(student3, teacher3, valid3, shard, temperature, backend)
    weights = None
    if mu is not None:
        stats = stats.detach().reshape(*valid3.shape, 4)
        weights = _akl_weights(student3.detach(), teacher3, valid3, shard, stats, temperature, mu).reshape(valid.shape)
    return kl_pq.reshape(valid.shape), kl_qp.reshape(valid.shape), weights, valid


@vocab_parallel_form("forward_reverse_kl")
def forward_reverse_kl(student_logits, teacher_logits, *, temperature, labels, mask, ignore_index, backend,
                       vocab_group, vocab_start):  # fmt: skip
    """``klops.forward_reverse_kl`` over vocabulary-sharded logits ``[..., V_r]``: one all-gather of 6 fp32 per row
    (24 bytes per token sent by each rank), plus the shard sizes; the backward sends nothing."""
    kl_pq, kl_qp, _, _ = _kl_pair_rows("forward_reverse_kl", student_logits, teacher_logits, temperature, labels, mask,
                                       ignore_index, backend, vocab_group, vocab_start)  # fmt: skip
    return kl_pq, kl_qp


@vocab_parallel_form("akl_weights")
def akl_weights(student_logits, teacher_logits, *, mu, temperature, labels, mask, ignore_index, backend, vocab_group,
                vocab_start):  # fmt: skip
    """``klops.akl_weights`` over vocabulary-sharded logits: ``akl_loss``'s rounds (164 bytes per token)."""
    with torch.no_grad():
        return _kl_pair_rows("akl_weights", student_logits, teacher_logits, temperature, labels, mask, ignore_index,
                             backend, vocab_group, vocab_start, mu)[2]  # fmt: skip


@vocab_parallel_form("akl_loss")
def akl_loss(student_logits, teacher_logits, *, mu, temperature, labels, mask, ignore_index, reduction, num_items,
             backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.akl_loss`` over vocabulary-sharded logits. Per token each rank sends 24 bytes (the KLs' all-gather),
    30 x 4 (the bisection's all-reduces) and 20 (the gaps' all-reduce): 164 bytes in 32 collectives, plus the shard
    sizes; the backward sends nothing."""
    _inputs.check_choice("reduction", reduction, _inputs.REDUCTIONS)
    _inputs.check_num_items(num_items, reduction)
    kl_pq, kl_qp, w, valid = _kl_pair_rows("akl_loss", student_logits, teacher_logits, temperature, labels, mask,
                                           ignore_index, backend, vocab_group, vocab_start, mu)  # fmt: skip
    return reduce_rows(w * kl_pq + (1 - w) * kl_qp, valid, reduction, num_items)


# ----------------------------------------------------------------------------------------------------
# TopK teachers (fused_kl, divergence_and_label_logprobs)
#
# The teacher's k ids and log-probs are on every rank. Round 1 all-gathers, per row, the raw max and log-sum of the
# shard's entries outside the ids and of those among them (and the label's logit where held): merged, the whole
# row's (M_q, logsum_q), the outside's (the tail's log-mass log Q_tail and the backward's q outside) and the
# members'. Each rank then forms the single-process terms (klops/topk.py) of the ids it holds, and round 2
# all-reduces their (sum loss_i, sum a_i); the tail's terms are the same on every rank. Backward: topk.py's
# gradient written from the saved per-row coefficients and the held ids' member_d, no collective.


class _TopKDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, indices, teacher_logprobs, labels, valid, shard, kind, tail, temperature, coef,
                tail_terms):  # fmt: skip
        B, L, V = student.shape
        local, held = local_labels(indices, valid[..., None], shard)
        label_local, owned = local_labels(labels if labels is not None else torch.zeros_like(valid), valid, shard)
        z_s = student.gather(-1, local).float()
        stats = student.new_zeros((B, L, 5), dtype=torch.float32)
        for b, rows in row_chunks(B, L, V):
            z = student[b, rows]
            members = topk_members(z, local[b, rows], held[b, rows])
            stats[b, rows, 0], stats[b, rows, 1] = row_stats(z.masked_fill(members, -math.inf), temperature)
        stats[..., 2], stats[..., 3] = row_stats(z_s.masked_fill(~held, -math.inf), temperature)
        if labels is not None:
            stats[..., 4] = torch.where(owned, student.gather(-1, label_local[..., None])[..., 0].float(), 0.0)
        gathered = all_gather_rows(stats if labels is not None else stats[..., :4], shard.group)
        max_c, logsum_c, _ = merge_logsumexp(gathered[..., 0], gathered[..., 1], temperature)
        max_s, logsum_s, _ = merge_logsumexp(gathered[..., 2], gathered[..., 3], temperature)
        both = (torch.cat((gathered[..., 0], gathered[..., 2])), torch.cat((gathered[..., 1], gathered[..., 3])))
        max_q, logsum_q, _ = merge_logsumexp(*both, temperature)  # the shards' outsides and members: the whole row
        # the single-process math (klops/topk.py's torch backend) on the members held here, then summed
        lq = log_softmax_from_stats(z_s, max_q, logsum_q, temperature)
        log_tail_q = scaled(max_c - max_q, temperature) + logsum_c - logsum_q
        lp = teacher_logprobs.float()
        log_mass_p = torch.logsumexp(lp, dim=-1)
        if tail == "bin":
            no_tail = torch.full_like(log_mass_p, -math.inf)
            log_tail_p = (-torch.expm1(log_mass_p)).clamp(min=0).log() if lp.shape[-1] < shard.total else no_tail
            loss_tail, a_tail = divergence_terms(log_tail_q, log_tail_q.exp(), log_tail_p, log_tail_p.exp(), kind, coef)
        else:
            lp = lp - log_mass_p[..., None]
            loss_tail, a_tail = tail_terms[0] * log_tail_q.exp(), tail_terms[1] * log_tail_q.exp()
        entry_loss, a = divergence_terms(lq, lq.exp(), lp, lp.exp(), kind, coef)
        entry_loss, a = torch.where(held, entry_loss, 0.0), torch.where(held, a, 0.0)
        loss, a_sum = all_reduce_sum(torch.stack((entry_loss.sum(-1), a.sum(-1)), -1), shard.group).unbind(-1)
        gbar = a_sum + a_tail
        mass_q_s = torch.exp(scaled(max_s - max_q, temperature) + logsum_s - logsum_q)
        tail_scale = torch.where(valid, a_tail * mass_q_s - log_tail_q.exp() * a_sum, 0.0)
        member_d = torch.where(held, a - lq.exp() * gbar[..., None], 0.0)
        rows = torch.where(valid, loss + loss_tail, 0.0)
        logp = torch.zeros_like(rows)
        if labels is not None:
            logp = torch.where(valid, scaled(gathered[..., 4].sum(0) - max_q, temperature) - logsum_q, 0.0)
        ctx.save_for_backward(student, local, held, label_local, owned, valid, max_c, logsum_c, max_q, logsum_q,
                              tail_scale, member_d)  # fmt: skip
        ctx.temperature = temperature
        return rows, logp

    @staticmethod
    def backward(ctx, grad, grad_logp):
        student, local, held, label_local, owned, valid, max_c, logsum_c, max_q, logsum_q, tail_scale, member_d = (
            ctx.saved_tensors
        )
        temperature = ctx.temperature
        B, L, V = student.shape
        grad = torch.zeros_like(tail_scale) if grad is None else grad
        tail_coef, member_value = grad * tail_scale, grad[..., None] * member_d
        dz = torch.empty_like(student)
        for b, rows in row_chunks(B, L, V):  # (tail_coef qc outside the ids, member_value on them) / T, as topk.py's
            z = student[b, rows]
            qc = log_softmax_from_stats(z, max_c[b, rows], logsum_c[b, rows], temperature).exp_()
            outside = topk_members(z, local[b, rows], held[b, rows]) | (z == -math.inf)
            chunk = torch.where(outside, 0.0, tail_coef[b, rows, None] * qc)
            chunk.scatter_add_(-1, local[b, rows], member_value[b, rows])
            if grad_logp is not None:  # (onehot - q) g for the label's log-prob, the one-hot where the label is held
                g = grad_logp[b, rows]
                q = log_softmax_from_stats(z, max_q[b, rows], logsum_q[b, rows], temperature).exp_()
                chunk.addcmul_(q, g[:, None], value=-1.0)
                chunk.scatter_add_(-1, label_local[b, rows][:, None], (g * owned[b, rows])[:, None])
            dz[b, rows] = torch.where(valid[b, rows][:, None], chunk / temperature, 0.0)
        return dz, *(None,) * 10


def topk_rows(student, topk, valid, shard, kind, user_kind, coef, temperature, labels=None):
    """(D, log q(label)) per row ``[...]`` fp32 between a TopK teacher (global ids, replicated) and the sharded
    ``student [..., V_r]``: one all-gather of 4 fp32 per row (5 with labels: the label's logit), one all-reduce of 2.
    Each rank sums the divergence's terms over the ids it holds; the tail's terms come from the merged statistics."""
    tail_terms = renormalized_tail_terms(kind, coef, user_kind) if topk.tail == "renormalize" else (0.0, 0.0)
    indices, logprobs = sorted_topk(topk, "teacher_logits", "student_logits", student, shard.total, valid)
    student3, indices3, logprobs3 = _inputs.as_rows(student, indices, logprobs)
    rows_shape = student3.shape[:2]
    labels3 = None if labels is None else labels.long().reshape(rows_shape)
    rows, logp = _TopKDivergence.apply(student3, indices3, logprobs3, labels3, valid.reshape(rows_shape), shard, kind,
                                       topk.tail, temperature, coef, tail_terms)  # fmt: skip
    return rows.reshape(valid.shape), logp.reshape(valid.shape)


@vocab_parallel_form("fused_kl_topk")
def fused_kl_topk(student_logits, teacher_logits, kind, *, beta, alpha, temperature, labels, mask, weights,
                  ignore_index, reduction, num_items, target_is, backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.fused_kl`` with a ``TopK`` teacher (global ids) and a vocabulary-sharded student ``[..., V_r]``: per
    token each rank sends 16 + 8 bytes (an all-gather of 4 fp32, an all-reduce of 2), plus the shard sizes; the
    backward sends nothing. Every backend runs the torch math here."""
    (student,), shard = vocab_shard(["student_logits"], [student_logits], vocab_group, vocab_start)
    labels, mask, weights = plain(labels), plain(mask), plain(weights)
    _inputs.check_logits("student_logits", student)
    kernel_kind, coef, temperature = check_divergence_options(kind, beta, alpha, temperature, target_is, reduction,
                                                              num_items)  # fmt: skip
    if target_is != "logits":
        raise ValueError(f"a TopK teacher carries its log-probs; target_is={target_is!r} is for dense teachers")
    valid, weights = valid_rows_and_weights("student_logits", student, shard.total, labels, mask, weights,
                                            ignore_index)  # fmt: skip
    rows, _ = topk_rows(student, teacher_logits, valid, shard, kernel_kind, kind, coef, temperature)
    if weights is not None:
        rows = rows * weights.float()
    return reduce_rows(rows, valid, reduction, num_items)
