"""Vocabulary-parallel forms of ``klops.fused_linear_logprobs`` and ``klops.fused_linear_kl``: heads sharded over the
vocabulary (issue 33), on the plumbing of klops/vocab_parallel.py.

Layout as there: rank ``r`` holds the head shard ``weight [V_r, D]`` (and ``bias [V_r]``) of the vocabulary slice
``[start_r, start_r + V_r)``; the hidden states ``[..., D]`` are replicated. Each rank forms its shard's logits
``z = softcap(s (h W_r^T + b_r))`` a chunk of rows at a time (the chunked path, klops/_chunked.py: never ``[N, V_r]``
at once), reduces them to the per-row shard statistics of the logits-level form, and all-gathers those (a few fp32
per row); every rank merges them alike (``merge_logsumexp``). The backward forms each chunk's logits again, writes
its ``dz`` from the merged statistics with the single-process formula, and turns it into ``grad_W_r``, ``grad_b_r``
(local) and ``grad_h = sum_r dz_r W_r``, summed over the group by one all-reduce of ``[N, D]``. A ``klops.TopK``
teacher's global ids are read by the shards that hold them. Heads given as DTensors placed Shard(0) on a 1-D mesh
(tensor parallelism) take hidden states that are DTensors on that mesh: vocab_parallel.head_hidden.
"""

import math

import torch

from . import _inputs
from ._chunked import chunked_backward, chunked_rows, empty_rows, log_softmax_from_stats
from ._chunked import row_stats as logit_row_stats
from ._terms import row_sums, teacher_probs
from .backend import resolve
from .distributed import is_sharded, vocab_parallel_form
from .divergence import (
    check_divergence_options,
    divergence_backward_op,
    divergence_op,
    reduce_rows,
    valid_rows_and_weights,
)
from .linear_divergence import teacher_chunks
from .logprobs import LogprobOutputs
from .topk import TopK, renormalized_tail_terms, sorted_topk, topk_divergence_op
from .vocab_parallel import (
    all_gather_rows,
    all_reduce_sum,
    head_hidden,
    local_labels,
    merge_chain_rule,
    merge_logprobs,
    merge_logsumexp,
    plain,
    shard_logprob_grad,
    shard_logprob_stats,
    topk_members,
    vocab_shard,
)


def _head_shard(names, tensors, vocab_group, vocab_start, check):
    """(local tensors by name, layout) of the head shards (``[V_r, D]`` weights, ``[V_r]`` biases) and ``[..., V_r]``
    teacher logits given as (name, tensor) pairs; None entries are skipped. DTensors (a head placed Shard(0), teacher
    logits Shard(-1), on one 1-D mesh): from their placements, then ``check(local tensors by name)``; plain tensors:
    ``check`` first, then one all-gather of the sizes (vocab_shard), which checks that every shard holds the same
    slice (so that every rank raises alike and none waits in a collective)."""
    pairs = [(name, x) for name, x in zip(names, tensors) if x is not None]
    dims = [-1 if name == "teacher_logits" else 0 for name, _ in pairs]
    if not is_sharded(pairs[0][1]):
        check(dict(pairs))
    local, shard = vocab_shard([n for n, _ in pairs], [x for _, x in pairs], vocab_group, vocab_start, dims=dims)
    local = dict(zip([n for n, _ in pairs], local))
    if is_sharded(pairs[0][1]):
        check(local)
    return local, shard._replace(grad_hidden_partial=is_sharded(pairs[0][1]))  # DTensor sums grad_h (head_hidden)


def _sum_grad_hidden(ctx, grads, shard):
    """(grad_hidden summed over the group (or left this rank's partial sum, for DTensor to reduce: head_hidden),
    grad_weight, grad_bias or None) of a chunked backward."""
    grad_hidden, grad_weight, grad_bias = grads
    if ctx.needs_input_grad[0] and not shard.grad_hidden_partial:  # the same on every rank (hidden is replicated)
        grad_hidden = all_reduce_sum(grad_hidden, shard.group)
    return grad_hidden, grad_weight, grad_bias if ctx.needs_input_grad[2] else None


# ----------------------------------------------------------------------------------------------------
# log-probs and entropy: the statistics of vocab_parallel._LogProbs, from chunk logits
#
# Per rank and row, from klops::logprobs on the chunk's logits: m_r, logsum_r, A_r = logsum_r - H_r and z_y where
# the label is held here (4 fp32; 9 with row stats), one all-gather. logprob = (z_y - M) / T - logsum,
# H = logsum - sum_r pi_r (A_r + (m_r - M) / T). Backward per chunk:
# dz = (g (onehot - q) - g_H q (log q + H)) / T, onehot where the label is held here.


class _LinearLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, shard, temperature, softcap, with_entropy, with_stats,
                backend):  # fmt: skip
        local, owned = local_labels(labels, valid, shard)
        options = (shard, temperature, with_entropy, with_stats, backend)

        def chunk_stats(z, rows):
            return shard_logprob_stats(z, local[rows][None], owned[rows][None], valid[rows][None], *options).unbind(-1)

        stats = chunked_rows(hidden, weight, bias, softcap, empty_rows(hidden, 9 if with_stats else 4), chunk_stats)
        gathered = all_gather_rows(torch.stack(stats, -1), shard.group)
        logp, entropy, top, total, extra = merge_logprobs(gathered, valid, *options[:2])
        ctx.save_for_backward(hidden, weight, bias, local, owned, valid, top, total, entropy)
        ctx.params = (shard, temperature, softcap, with_entropy, backend)
        if not with_stats:
            return logp, entropy, None, None, None
        ctx.mark_non_differentiable(*extra)
        return logp, entropy, *extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_grad_stats):
        hidden, weight, bias, local, owned, valid, top, total, entropy = ctx.saved_tensors
        shard, temperature, softcap, with_entropy, backend = ctx.params

        def chunk_grad(z, rows):
            per_row = (x[rows][None] for x in (local, owned, valid, top, total, entropy))
            chunk_grads = (None if g is None else g[rows][None] for g in (grad_logp, grad_entropy))
            return shard_logprob_grad(chunk_grads, z, *per_row, temperature, with_entropy, backend)

        grads = _sum_grad_hidden(ctx, chunked_backward(hidden, weight, bias, softcap, chunk_grad), shard)
        return *grads, *(None,) * 8


@vocab_parallel_form("fused_linear_logprobs")
def fused_linear_logprobs(hidden, weight, labels, *, bias, temperature, softcap, logit_scale, return_entropy,
                          return_row_stats, ignore_index, backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.fused_linear_logprobs`` with a head shard ``weight [V_r, D]`` (and ``bias [V_r]``) and replicated
    ``hidden [..., D]``. Forward: one all-gather of 4 fp32 per row (16 bytes per token sent by each rank; 36 with
    ``return_row_stats``), plus the shard sizes; backward: one all-reduce of ``grad_hidden [N, D]`` (``D`` elements
    per token in the hidden states' dtype). A head DTensor placed Shard(0) (bias alike) with ``hidden`` a DTensor on
    its mesh: no shard sizes, and DTensor reduces ``grad_hidden`` to ``hidden``'s placement (head_hidden). Returns
    plain tensors, replicated."""
    hidden, labels = head_hidden("hidden", hidden, "weight", weight), plain(labels)
    local, shard = _head_shard(("weight", "bias"), (weight, bias), vocab_group, vocab_start,
                               lambda x: _inputs.check_linear("hidden", hidden, "weight", x["weight"], "bias",
                                                              x.get("bias")))  # fmt: skip
    weight, bias = local["weight"], local.get("bias")
    labels = _inputs.as_labels("labels", labels, "hidden", hidden)
    _inputs.check_labels_in_range("labels", labels, shard.total, ignore_index)
    temperature = _inputs.check_temperature(temperature)
    softcap = _inputs.check_softcap(softcap)
    _inputs.check_bool("return_entropy", return_entropy)
    _inputs.check_bool("return_row_stats", return_row_stats)
    hidden, bias = _inputs.scale_head_inputs("logit_scale", logit_scale, hidden, bias)
    backend = resolve("logprobs", backend, hidden.device)  # the row op the chunked path runs on each chunk
    (hidden3,) = _inputs.as_rows(hidden)
    labels3 = labels.reshape(hidden3.shape[:2])
    logp, entropy, *row_stats = _LinearLogProbs.apply(hidden3, weight, bias, labels3, labels3 != ignore_index, shard,
                                                      temperature, softcap, return_entropy, return_row_stats,
                                                      backend)  # fmt: skip
    logp, entropy = logp.reshape(labels.shape), entropy.reshape(labels.shape)
    if return_row_stats:
        log_sum_sq, mean_logits, is_top1 = (x.reshape(labels.shape) for x in row_stats)
        return LogprobOutputs(logp, entropy if return_entropy else None, log_sum_sq, mean_logits, is_top1.bool())
    return (logp, entropy) if return_entropy else logp


# ----------------------------------------------------------------------------------------------------
# divergences: the math of vocab_parallel's fused_kl form (chain_rule_kl, two_round_divergence) on chunk logits
#
# forward / reverse KL between logits (the teacher from its head shard or as logits), one all-gather of 5 fp32 per
# row: both inputs' m_r, logsum_r and the shard's KL(p^r || q^r), merged by the chain rule
#     KL(p||q) = sum_r pi^p_r (log pi^p_r - log pi^q_r + KL(p^r||q^r))      (reverse KL: p and q swapped).
# Every other kind, and a teacher given as log-probs or probs: an all-gather of 4 fp32 per row (each input's m_r,
# logsum_r, or the teacher check's largest entry and log-mass), then a second sweep over the chunks (the student's
# logits formed again) sums each entry's loss and a with the global log q, log p, and one all-reduce adds (D, gbar).
# Backward for all: klops::divergence_backward on each chunk with the merged statistics, grad_h all-reduced.


class _LinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, valid, shard, kind, target_is,
                temperature, coef, softcap, t_softcap, backend):  # fmt: skip
        teacher = teacher_chunks(t_hidden, t_weight, t_bias, t_logits, t_softcap)

        def sweep(count, chunk_fn):
            return torch.stack(chunked_rows(hidden, weight, bias, softcap, empty_rows(hidden, count), chunk_fn), -1)

        if kind in ("forward", "reverse") and target_is == "logits":

            def chunk_stats(z, rows):
                options = (kind, "logits", temperature, 0.0, backend)
                d, max_q, logsum_q, max_p, logsum_p, _, _ = divergence_op(z, teacher(rows), valid[rows][None], None,
                                                                          *options)  # fmt: skip
                d = torch.where((logsum_q == -math.inf) | (logsum_p == -math.inf), 0.0, d)  # a shard without mass
                return max_q, logsum_q, max_p, logsum_p, d

            stats = merge_chain_rule(all_gather_rows(sweep(5, chunk_stats), shard.group), valid, kind, temperature)
        else:
            dtype = None if t_logits is None else t_logits.dtype  # read only by the check of log-probs / probs
            stats = _two_rounds(sweep, teacher, dtype, valid, shard, kind, target_is, temperature, coef)
        rows, *stats = stats
        ctx.save_for_backward(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, valid, *stats)
        ctx.params = (shard, kind, target_is, temperature, coef, softcap, t_softcap, backend)
        return rows

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, valid, *stats = ctx.saved_tensors
        shard, kind, target_is, temperature, coef, softcap, t_softcap, backend = ctx.params

        teacher = teacher_chunks(t_hidden, t_weight, t_bias, t_logits, t_softcap)

        def chunk_grad(z, rows):
            y = teacher(rows)
            return divergence_backward_op(grad[rows][None], None, z, y, valid[rows][None], None,
                                          *(x[rows][None] for x in stats), kind, target_is, temperature, coef,
                                          backend)  # fmt: skip

        grads = _sum_grad_hidden(ctx, chunked_backward(hidden, weight, bias, softcap, chunk_grad), shard)
        return *grads, *(None,) * 13


def _two_rounds(sweep, teacher, teacher_dtype, valid, shard, kind, target_is, temperature, coef):
    """(D, M_q, logsum_q, M_p, logsum_p, gbar) of any kind, as vocab_parallel.two_round_divergence: the statistics
    all-gathered, then (D, gbar) summed over the shards by one all-reduce (a second sweep over the chunks).
    ``sweep(count, chunk_fn)``: [B, L, count] from the chunks' logits; ``teacher(rows)``: a chunk's teacher."""

    def chunk_stats(z, rows):
        y = teacher(rows)
        if target_is == "logits":
            return *logit_row_stats(z, temperature), *logit_row_stats(y, temperature)
        lp, p = teacher_probs(y, target_is)  # the check's statistics: largest log-prob (or -prob), log of the mass
        largest = lp.amax(-1) if target_is == "logprobs" else p.neg().amax(-1)
        return *logit_row_stats(z, temperature), largest, p.sum(-1).log()

    mq, lsq, mp, lsp = all_gather_rows(sweep(4, chunk_stats), shard.group).unbind(-1)
    top_q, total_q, _ = merge_logsumexp(mq, lsq, temperature)
    if target_is == "logits":
        top_p, total_p, _ = merge_logsumexp(mp, lsp, temperature)
    else:
        _inputs.check_teacher_rows("teacher_logits", target_is, teacher_dtype, shard.total, valid,
                                   mp.amax(0), torch.logsumexp(lsp, 0))  # fmt: skip
        top_p, total_p = torch.zeros_like(top_q), torch.zeros_like(top_q)

    def chunk_sums(z, rows):
        lq = log_softmax_from_stats(z, top_q[rows][None], total_q[rows][None], temperature)
        y = teacher(rows)
        if target_is == "logits":
            lp = log_softmax_from_stats(y, top_p[rows][None], total_p[rows][None], temperature)
            p = lp.exp()
        else:
            lp, p = teacher_probs(y, target_is)
        return row_sums(lq, lq.exp(), lp, p, kind, coef)

    rows, gbar = torch.where(valid[..., None], all_reduce_sum(sweep(2, chunk_sums), shard.group), 0.0).unbind(-1)
    return rows, top_q, total_q, top_p, total_p, gbar


# ----------------------------------------------------------------------------------------------------
# a TopK teacher (klops/topk.py): its k global ids per row, each held by one shard
#
# Per rank and row, from the chunk's logits: the shard's statistics outside the top-k (m^c_r, logsum^c_r) and the
# logits of the ids it holds (0 for the others): 2 + k fp32, one all-gather. Merged: the complement's (M_c, logsum_c)
# and the k logits z_S (summed over the shards). The rest is the single-process op (klops::topk_divergence) on a
# row of k + 1 entries: z_S and one entry c = M_c + T logsum_c that carries the complement's mass
# (exp((c - M) / T) = sum_{v not in S} exp((z_v - M) / T)); no entry when k = V. It gives D, tail_scale and member_d,
# and the backward writes, per chunk, dz = g tail_scale q^c outside the top-k and g member_d on it, q^c =
# exp((z - M_c) / T - logsum_c), as topk_backward does.


class _LinearTopK(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, indices, teacher_logprobs, valid, shard, options, softcap, backend):
        kind, tail, temperature, coef, tail_loss, tail_grad = options
        local = indices.long() - shard.start
        owned = (local >= 0) & (local < shard.size)
        local = torch.where(owned, local, 0)

        def chunk_stats(z, rows):
            idx, held = local[rows][None], owned[rows][None]
            max_c, logsum_c = logit_row_stats(z.masked_fill(topk_members(z, idx, held), -math.inf), temperature)
            return max_c, logsum_c, *torch.where(held, z.gather(-1, idx).float(), 0.0).unbind(-1)

        k = indices.shape[-1]
        stats = chunked_rows(hidden, weight, bias, softcap, empty_rows(hidden, 2 + k), chunk_stats)
        gathered = all_gather_rows(torch.stack(stats, -1), shard.group)
        top_c, total_c, _ = merge_logsumexp(gathered[..., 0], gathered[..., 1], temperature)
        compact = gathered[..., 2:].sum(0)  # each id's logit, from the shard that holds it
        if k < shard.total:
            compact = torch.cat((compact, (top_c + temperature * total_c)[..., None]), -1)
        ids = torch.arange(k, dtype=torch.int32, device=hidden.device).expand(indices.shape)
        compact, ids = compact.contiguous(), ids.contiguous()
        rows, _, _, tail_scale, member_d, _ = topk_divergence_op(compact, ids, teacher_logprobs, valid, None, *options,
                                                                 backend)  # fmt: skip
        ctx.save_for_backward(hidden, weight, bias, local, owned, valid, top_c, total_c, tail_scale, member_d)
        ctx.params = (shard, temperature, softcap)
        return rows

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, bias, local, owned, valid, top_c, total_c, tail_scale, member_d = ctx.saved_tensors
        shard, temperature, softcap = ctx.params
        tail_coef, member_value = grad * tail_scale, grad[..., None] * member_d

        def chunk_grad(z, rows):
            z, idx, held = z[0].float(), local[rows], owned[rows]
            q_c = log_softmax_from_stats(z, top_c[rows], total_c[rows], temperature).exp_()
            dz = torch.where((z == -math.inf) | topk_members(z, idx, held), 0.0, q_c.mul_(tail_coef[rows][:, None]))
            dz.scatter_add_(-1, idx, torch.where(held, member_value[rows], 0.0))
            return dz.mul_((valid[rows] / temperature)[:, None])[None]

        grads = _sum_grad_hidden(ctx, chunked_backward(hidden, weight, bias, softcap, chunk_grad), shard)
        return *grads, *(None,) * 7


def _dense_rows(hidden, weight, bias, t_hidden, t_weight, t_bias, t_logits, valid, shard, kind, target_is,
                temperature, coef, softcap, t_softcap, backend):  # fmt: skip
    """D per row ``[...]`` against a teacher head shard or teacher logits; the (B, L) rows for _LinearDivergence."""
    backend = resolve("divergence", backend, hidden.device)  # the row op run on each chunk
    if t_logits is not None:
        hidden3, t_logits = _inputs.as_rows(hidden, t_logits)
    else:
        hidden3, t_hidden = _inputs.as_rows(hidden, t_hidden)
    teacher = tuple(None if x is None else x.detach() for x in (t_hidden, t_weight, t_bias, t_logits))  # no gradient
    rows = _LinearDivergence.apply(hidden3, weight, bias, *teacher, valid.reshape(hidden3.shape[:2]), shard, kind,
                                   target_is, temperature, coef, softcap, t_softcap, backend)  # fmt: skip
    return rows.reshape(valid.shape)


def _topk_rows(hidden, weight, bias, topk, valid, shard, kind, user_kind, coef, temperature, softcap, backend):
    """D per row ``[...]`` between a TopK teacher and the student's sharded head (its ids checked as the
    single-process op checks them); the (B, L) rows for _LinearTopK."""
    tail_terms = renormalized_tail_terms(kind, coef, user_kind) if topk.tail == "renormalize" else (0.0, 0.0)
    indices, logprobs = sorted_topk(topk, "teacher_hidden", "student_hidden", hidden, shard.total, valid)
    backend = resolve("topk", backend, hidden.device, vocab=indices.shape[-1] + 1)  # the row op on k + 1 entries
    hidden3, indices3, logprobs3 = _inputs.as_rows(hidden, indices, logprobs)
    options = (kind, topk.tail, temperature, coef, *tail_terms)
    rows = _LinearTopK.apply(hidden3, weight, bias, indices3, logprobs3, valid.reshape(hidden3.shape[:2]), shard,
                             options, softcap, backend)  # fmt: skip
    return rows.reshape(valid.shape)


def _sharded_inputs(teacher_hidden, heads, target_is, teacher_softcap, teacher_logit_scale):
    """The names of fused_linear_kl's vocabulary-sharded inputs (``heads``: the head tensors and teacher logits by
    name, None where not given), after the checks of how the teacher is given (one of a ``TopK``,
    ``teacher_logits [..., V_r]``, or ``teacher_hidden`` with a head shard)."""
    teacher_weight, teacher_bias, teacher_logits = (heads[n] for n in ("teacher_weight", "teacher_bias",
                                                                       "teacher_logits"))  # fmt: skip
    if isinstance(teacher_hidden, TopK):
        if teacher_weight is not None or teacher_bias is not None or teacher_logits is not None:
            raise ValueError("a TopK teacher (in the teacher_hidden position) takes no teacher_weight, bias or logits")
        if target_is != "logits" or teacher_softcap != "same" or teacher_logit_scale != "same":
            raise ValueError("a TopK teacher carries its log-probs: target_is, teacher_softcap and teacher_logit_scale "
                             "are for teacher_logits or a teacher head")  # fmt: skip
        return ("student_weight", "student_bias")
    if teacher_logits is not None:
        if teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None:
            raise ValueError("give the teacher as teacher_hidden + teacher_weight or as teacher_logits, not both")
        if teacher_softcap != "same" or teacher_logit_scale != "same":
            raise ValueError("teacher_softcap and teacher_logit_scale apply to a teacher given as hidden states and "
                             "a head")  # fmt: skip
        return ("student_weight", "student_bias", "teacher_logits")
    if teacher_hidden is None or teacher_weight is None:
        raise ValueError("the teacher is missing: give teacher_hidden and teacher_weight, or teacher_logits")
    if target_is != "logits":
        raise ValueError(f"a teacher given as hidden states gives logits; target_is={target_is!r} is for "
                         "teacher_logits")  # fmt: skip
    return ("student_weight", "student_bias", "teacher_weight", "teacher_bias")


def _check_teacher(student_hidden, teacher_hidden, local):
    """The shapes of a teacher given as local ``teacher_logits [..., V_r]`` or ``teacher_hidden`` with a head shard
    (``local``: the shards by name) against the student's rows."""
    if "teacher_logits" in local:
        teacher_logits = local["teacher_logits"]
        _inputs.check_logits("teacher_logits", teacher_logits)
        if teacher_logits.shape[:-1] != student_hidden.shape[:-1] or teacher_logits.device != student_hidden.device:
            raise ValueError(f"teacher_logits must have the rows {tuple(student_hidden.shape[:-1])} of student_hidden "
                             f"on {student_hidden.device}, got {tuple(teacher_logits.shape)} on "
                             f"{teacher_logits.device}")  # fmt: skip
    elif "teacher_weight" in local:
        _inputs.check_linear("teacher_hidden", teacher_hidden, "teacher_weight", local["teacher_weight"],
                             "teacher_bias", local.get("teacher_bias"))  # fmt: skip
        if teacher_hidden.shape[:-1] != student_hidden.shape[:-1] or teacher_hidden.device != student_hidden.device:
            raise ValueError(f"teacher_hidden must have the rows {tuple(student_hidden.shape[:-1])} of student_hidden "
                             f"on {student_hidden.device}, got {tuple(teacher_hidden.shape[:-1])} on "
                             f"{teacher_hidden.device}")  # fmt: skip


@vocab_parallel_form("fused_linear_kl")
def fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, *, teacher_logits, student_bias,
                    teacher_bias, kind, beta, alpha, temperature, softcap, logit_scale, teacher_softcap,
                    teacher_logit_scale, labels, mask, weights, ignore_index, reduction, num_items, target_is,
                    backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.fused_linear_kl`` with the student's head shard ``student_weight [V_r, D]`` (and bias) and the teacher
    as a head shard of the same slice ``teacher_weight [V_r, Dt]`` with replicated ``teacher_hidden``, or as
    ``teacher_logits [..., V_r]`` (read as ``target_is``), or a ``klops.TopK`` (global ids) in the ``teacher_hidden``
    position. Forward per token sent by each rank: 20 bytes (forward / reverse KL of a logits teacher: one all-gather
    of 5 fp32), 16 + 8 (other kinds, log-probs / probs teachers: an all-gather of 4 fp32, an all-reduce of 2, and a
    second sweep over the student's chunk logits) or 8 + 4 k (a TopK teacher: one all-gather of 2 + k fp32), plus the
    shard sizes; backward: one all-reduce of ``grad_hidden [N, D]``. Heads may be DTensors placed Shard(0) on one
    1-D mesh (teacher logits Shard(-1)) with each hidden a DTensor on it: no shard sizes, and DTensor reduces
    ``grad_hidden`` to the student hidden's placement (head_hidden). Returns a plain tensor, replicated."""
    student_hidden = head_hidden("student_hidden", student_hidden, "student_weight", student_weight)
    if teacher_weight is not None:
        teacher_hidden = head_hidden("teacher_hidden", teacher_hidden, "teacher_weight", teacher_weight)
    teacher_hidden, labels, mask, weights = plain(teacher_hidden), plain(labels), plain(mask), plain(weights)
    heads = dict(student_weight=student_weight, student_bias=student_bias, teacher_weight=teacher_weight,
                 teacher_bias=teacher_bias, teacher_logits=teacher_logits)  # fmt: skip
    names = _sharded_inputs(teacher_hidden, heads, target_is, teacher_softcap, teacher_logit_scale)

    def check(local):
        _inputs.check_linear("student_hidden", student_hidden, "student_weight", local["student_weight"],
                             "student_bias", local.get("student_bias"))  # fmt: skip
        _check_teacher(student_hidden, teacher_hidden, local)

    local, shard = _head_shard(names, [heads[name] for name in names], vocab_group, vocab_start, check)
    student_weight, student_bias = local["student_weight"], local.get("student_bias")
    teacher_weight, teacher_bias, teacher_logits = (local.get(n) for n in ("teacher_weight", "teacher_bias",
                                                                           "teacher_logits"))  # fmt: skip
    kernel_kind, coef, temperature = check_divergence_options(kind, beta, alpha, temperature, target_is, reduction,
                                                              num_items)  # fmt: skip
    softcap = _inputs.check_softcap(softcap)
    teacher_softcap = softcap if teacher_softcap == "same" else _inputs.check_softcap(teacher_softcap,
                                                                                       "teacher_softcap")  # fmt: skip
    if teacher_weight is not None:
        scale = logit_scale if teacher_logit_scale == "same" else teacher_logit_scale
        teacher_hidden, teacher_bias = _inputs.scale_head_inputs("teacher_logit_scale", scale, teacher_hidden,
                                                                 teacher_bias)  # fmt: skip
    student_hidden, student_bias = _inputs.scale_head_inputs("logit_scale", logit_scale, student_hidden, student_bias)
    valid, weights = valid_rows_and_weights("student_hidden", student_hidden, shard.total, labels, mask, weights,
                                            ignore_index)  # fmt: skip
    if isinstance(teacher_hidden, TopK):
        rows = _topk_rows(student_hidden, student_weight, student_bias, teacher_hidden, valid, shard, kernel_kind, kind,
                          coef, temperature, softcap, backend)  # fmt: skip
    else:
        rows = _dense_rows(student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias,
                           teacher_logits, valid, shard, kernel_kind, target_is, temperature, coef, softcap,
                           teacher_softcap, backend)  # fmt: skip
    if weights is not None:
        rows = rows * weights.float()
    return reduce_rows(rows, valid, reduction, num_items)
