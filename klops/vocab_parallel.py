"""Vocabulary-parallel forms of ``klops.logprobs``, ``klops.fused_kl`` and ``klops.fused_linear_cross_entropy``
(issue 33; docs/losses.md "Vocabulary-parallel ops"). Reached through ``vocab_group=`` (a ``ProcessGroup``), a
logits DTensor placed ``Shard(-1)`` on a 1-D mesh, or a head DTensor placed ``Shard(0)`` with hidden states that are
DTensors on its mesh (head_hidden); nothing here is public API of its own except ``record_traffic``.

Layout. Rank ``r`` of the group holds the vocabulary slice ``[start_r, start_r + V_r)`` in rank order (uneven
shards allowed): logits ``[..., V_r]`` or a head shard ``[V_r, D]`` with replicated hidden states. Offsets come from
the shard sizes, all-gathered once per call with ``vocab_start`` (one int64 each per rank), or from ``vocab_start=``
(any layout that tiles ``[0, V)``, which every rank checks); a DTensor carries them, so it costs no collective.
With plain tensors the sizes reach the host (``.tolist()``): a graph break under torch.compile, which DTensors avoid.
Labels are global ids. Every rank returns the same values; gradients go to each rank's own shard (and, for the
fused-linear op, the hidden states' gradient is summed over the group: one all-reduce of ``[N, D]`` in backward).

Merging row statistics (one all-gather of a few fp32 per row, as Transformer Engine does). Each rank reduces its
shard to its raw row max ``m_r`` and ``logsum_r = log sum_{v in r} exp((z_v - m_r) / T)``; then, with
``M = max_r m_r`` (0 when every shard is -inf, the raw-max convention of docs/losses.md §0)::

    logsum = log sum_r exp((m_r - M) / T + logsum_r)      pi_r = exp((m_r - M) / T + logsum_r - logsum)

``pi_r`` is shard r's share of the softmax mass. The backward of the logits-level ops needs no collective: the
forward keeps the global ``(M, logsum)`` (and what a kind's gradient needs, ``gbar`` or the entropy), and each
rank writes its shard's gradient from them with the single-process formula.
"""

import contextlib
import math
from typing import NamedTuple

import torch
import torch.distributed as dist

from . import _inputs
from ._chunked import (
    chunked_backward,
    chunked_rows,
    empty_rows,
    log_softmax_from_stats,
    row_chunks,
    row_stats,
)
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
from .logprobs import LogprobOutputs, logprobs_backward_op, logprobs_op

__all__ = ["record_traffic", "is_sharded"]


# ----------------------------------------------------------------------------------------------------
# communication: functional collectives only, each call recorded for record_traffic


_recorders: list[list] = []


@contextlib.contextmanager
def record_traffic():
    """Records, inside the ``with`` block, each collective this module issues on this rank as ``(name, bytes sent
    by this rank)``: an all-gather sends its input once, an all-reduce its tensor (a ring moves about twice that);
    yields the list."""
    calls = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


def _record(name: str, x: torch.Tensor) -> None:
    for calls in _recorders:
        calls.append((name, x.numel() * x.element_size()))


def _waited(x: torch.Tensor) -> torch.Tensor:
    """The result of a functional collective as a plain tensor (eager: wait for it; traced: already is)."""
    from torch.distributed._functional_collectives import AsyncCollectiveTensor

    return x.wait() if isinstance(x, AsyncCollectiveTensor) else x


def all_gather_rows(stats: torch.Tensor, group) -> torch.Tensor:
    """[W, *stats.shape]: every rank's ``stats`` (fp32 ``[N, k]`` row statistics), one all-gather."""
    from torch.distributed import _functional_collectives as funcol

    # all_gather_single where torch has it (all_gather_tensor is deprecated there), all_gather_tensor in torch 2.11
    all_gather = getattr(funcol, "all_gather_single", None) or funcol.all_gather_tensor
    _record("all_gather", stats)
    gathered = _waited(all_gather(stats.contiguous(), 0, group))
    return gathered.view(dist.get_world_size(group), *stats.shape)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over the group, one all-reduce."""
    from torch.distributed._functional_collectives import all_reduce

    _record("all_reduce", x)
    return _waited(all_reduce(x.contiguous(), "sum", group))


# ----------------------------------------------------------------------------------------------------
# the layout: which slice of the vocabulary this rank holds


class VocabShard(NamedTuple):
    group: dist.ProcessGroup
    start: int  # this rank's first global vocabulary id
    size: int  # V_r, its number of ids
    total: int  # V, the whole vocabulary
    grad_hidden_partial: bool = False  # a fused-linear backward leaves grad_hidden a per-rank partial sum (head_hidden)


def _dtensor_shard(name: str, x, group, dim: int = -1) -> tuple[torch.Tensor, VocabShard]:
    """(local tensor, layout) of a DTensor placed Shard(dim) on a 1-D mesh (the vocabulary: logits' last dim, a
    head's first); ``group``, if given, must be its mesh's."""
    from torch.distributed.tensor import Shard

    mesh, placements, given = x.device_mesh, x.placements, dim
    dim %= x.dim()
    if mesh.ndim != 1 or not (isinstance(placements[0], Shard) and placements[0].dim % x.dim() == dim):
        raise ValueError(
            f"{name}: a DTensor must be placed Shard({given}) (the vocabulary) on a 1-D mesh, got placements "
            f"{tuple(placements)} on a {mesh.ndim}-D mesh"
        )
    mesh_group = mesh.get_group()
    mesh_ranks = dist.get_process_group_ranks(mesh_group)
    if group is not None:
        ranks = dist.get_process_group_ranks(group) if isinstance(group, dist.ProcessGroup) else "without this rank"
        if ranks != mesh_ranks:
            raise ValueError(
                f"vocab_group (ranks {ranks}) does not match the mesh of {name} (ranks {mesh_ranks}); pass "
                "vocab_group=None to use the mesh's"
            )
    local, total = x.to_local(), x.shape[dim]
    chunk = -(-total // mesh.size())  # Shard splits as torch.chunk: ceil(V / W) ids per rank, the last ones fewer
    return local, VocabShard(mesh_group, min(total, mesh.get_local_rank() * chunk), local.shape[dim], total)


def plain(x):
    """A replicated DTensor (labels, mask, weights) as its local tensor; anything else as it is."""
    return x.to_local() if is_sharded(x) else x


def head_hidden(name: str, hidden, head_name: str, head):
    """The hidden states ``[..., D]`` that feed a vocabulary-sharded head, as a tensor replicated over the group.

    A plain head (``vocab_group=``): ``hidden`` itself (a replicated DTensor's local tensor). A head DTensor placed
    Shard(0) on a 1-D mesh (tensor parallelism, as ColwiseParallel): ``hidden`` must be a DTensor on that mesh,
    Replicate or sharded (Shard(1) under sequence parallelism), and DTensor redistributes it to Replicate (the
    all-gather ColwiseParallel does). Its gradient is then left per rank a partial sum, placed Partial, which DTensor
    reduces back to ``hidden``'s placement (a reduce-scatter under sequence parallelism, an all-reduce for Replicate)
    and the form's backward skips its own all-reduce (``VocabShard.grad_hidden_partial``). A plain ``hidden`` with a
    head DTensor is refused: FSDP2 also shards a head on dim 0, over the data-parallel mesh, where ranks' rows
    differ."""
    if not is_sharded(head):
        return plain(hidden)
    if not is_sharded(hidden):
        raise ValueError(
            f"{head_name} is a DTensor but {name} is not: a head sharded on dim 0 with plain hidden states is FSDP2's "
            f"layout (data parallel, rows that differ by rank), not a vocabulary-parallel one. Give {name} as a "
            f"DTensor on {head_name}'s mesh (tensor parallelism), or pass {head_name}.to_local() with vocab_group="
        )
    if hidden.device_mesh != head.device_mesh:
        raise ValueError(f"{name} is a DTensor on {hidden.device_mesh}, {head_name} on {head.device_mesh}: give both "
                         "on one mesh")  # fmt: skip
    from torch.distributed.tensor import Partial, Replicate

    return hidden.redistribute(hidden.device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])


def vocab_shard(names, tensors, group, vocab_start, dims=None) -> tuple[list[torch.Tensor], VocabShard]:
    """(local tensors, layout) of the vocabulary-sharded inputs (logits or heads; the vocabulary is their last dim,
    a head's first). DTensors: from their placement, no collective. Plain tensors: their shard sizes and
    ``vocab_start`` all-gathered once (one int64 each per rank), which every rank checks alike (so all raise, none
    hangs); the offset is the sum of the lower ranks' sizes, or ``vocab_start`` (any layout that tiles [0, V))."""
    dims = dims or [-1] * len(tensors)
    if is_sharded(tensors[0]):
        local, shard = _dtensor_shard(names[0], tensors[0], group, dims[0])
        locals_ = [local]
        for name, x, dim in zip(names[1:], tensors[1:], dims[1:]):
            if not is_sharded(x):
                raise ValueError(f"{name} must be a DTensor sharded as {names[0]} is")
            other, other_shard = _dtensor_shard(name, x, shard.group, dim)
            if other_shard.total != shard.total:
                raise ValueError(f"{name} has V={other_shard.total} but {names[0]} has V={shard.total}")
            locals_.append(other)
        if vocab_start is not None and vocab_start != shard.start:
            raise ValueError(f"vocab_start={vocab_start} differs from the DTensor's offset {shard.start}")
        return locals_, shard
    for name, x in zip(names[1:], tensors[1:]):
        if is_sharded(x):
            raise ValueError(f"{name} is a DTensor but {names[0]} is not: shard them alike")
    if group is None:
        raise ValueError(f"{names[0]}: vocab_start needs vocab_group (the process group over which V is sharded)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"vocab_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}")
    if vocab_start is not None:
        _inputs.check_int("vocab_start", vocab_start, 0)
    sizes = [x.shape[d] for x, d in zip(tensors, dims)] + [-1 if vocab_start is None else vocab_start]
    table = all_gather_rows(torch.tensor(sizes, dtype=torch.int64, device=tensors[0].device), group).tolist()
    for i, name in enumerate(names[1:], 1):  # table: [W][the tensors' sizes, then vocab_start or -1]
        if any(row[i] != row[0] for row in table):
            raise ValueError(
                f"mismatched vocabulary shards: {names[0]} has {[row[0] for row in table]} entries per rank, "
                f"{name} has {[row[i] for row in table]}"
            )
    rank, total = dist.get_rank(group), sum(row[0] for row in table)
    starts = [sum(row[0] for row in table[:r]) for r in range(len(table))]
    if vocab_start is not None or any(row[-1] != -1 for row in table):
        starts = [row[-1] for row in table]
        spans = sorted((start, start + row[0]) for start, row in zip(starts, table))
        if -1 in starts or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) or spans[0][0] != 0:
            raise ValueError(
                f"vocab_start {starts} with shard sizes {[row[0] for row in table]} (rank by rank) must tile the "
                f"vocabulary [0, {total}) without gap or overlap; every rank gives vocab_start, or none"
            )
    return list(tensors), VocabShard(group, starts[rank], table[rank][0], total)


def local_labels(labels: torch.Tensor, valid: torch.Tensor, shard: VocabShard) -> tuple[torch.Tensor, torch.Tensor]:
    """(label - start where this shard holds it, else 0 (int64); owned: valid and held here). Also a TopK
    teacher's ids ``[..., k]``, with ``valid[..., None]``."""
    local = labels.long() - shard.start
    owned = valid & (local >= 0) & (local < shard.size)
    return torch.where(owned, local, 0), owned


def merge_logsumexp(row_max: torch.Tensor, logsum: torch.Tensor, temperature: float):
    """(M, logsum, log_pi) from the all-gathered [W, N] raw maxima and log-sums of the shards (the module's merge):
    ``M = max_r m_r`` over the shards holding mass (0 if none), ``logsum = log sum_r exp((m_r - M)/T + logsum_r)``
    and ``log pi_r`` (-inf for an all -inf shard), exactly the statistics of the single-process sweep."""
    empty = logsum == -math.inf
    top = torch.where(empty, -math.inf, row_max).amax(0)
    top = torch.where(top == -math.inf, 0.0, top)
    term = torch.where(empty, -math.inf, (row_max - top) / temperature + logsum)
    total = torch.logsumexp(term, 0)
    return top, total, term - total


# ----------------------------------------------------------------------------------------------------
# log-probs and entropy (docs/losses.md §2)
#
# Per rank, from klops's own row op (klops::logprobs) on its shard with a label held or any in-shard one:
# m_r, logsum_r, A_r = sum_v q^r_v d_v (the shard's mean of d = (z - m_r) / T, = logsum_r - H_r) and z_y if it
# holds the label (else 0): 4 fp32 per row all-gathered. Then logprob = (z_y - M) / T - logsum and
# H = logsum - sum_r pi_r (A_r + (m_r - M) / T). Backward: the single-process gradient from (M, logsum, H), by
# klops's own backward row op (klops::logprobs_backward), the one-hot on the rank holding the label only.


class _LogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, labels, valid, shard, temperature, with_entropy, with_stats, backend):
        local, owned = local_labels(labels, valid, shard)
        options = (shard, temperature, with_entropy, with_stats, backend)
        stats = shard_logprob_stats(logits, local, owned, valid, *options)
        logp, entropy, top, total, extra = merge_logprobs(all_gather_rows(stats, shard.group), valid, *options[:2])
        ctx.save_for_backward(logits, local, owned, valid, top, total, entropy)
        ctx.params = (temperature, with_entropy, backend)
        if not with_stats:
            return logp, entropy, None, None, None
        ctx.mark_non_differentiable(*extra)
        return logp, entropy, *extra

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy, *_grad_stats):
        logits, local, owned, valid, top, total, entropy = ctx.saved_tensors
        dz = shard_logprob_grad((grad_logp, grad_entropy), logits, local, owned, valid, top, total, entropy,
                                *ctx.params)  # fmt: skip
        return dz, None, None, None, None, None, None, None


def shard_logprob_stats(logits, local, owned, valid, shard, temperature, with_entropy, with_stats, backend):
    """[B, L, 4] fp32 statistics of a shard's logits [B, L, V_r] for merge_logprobs, from klops's own row op:
    m_r, logsum_r, A_r (the shard's mean of d = (z - m_r) / T, logsum_r - H_r; 0 without the entropy) and z_y where
    this rank holds the label (``local`` / ``owned``: local_labels), else 0; with_stats 5 more: log sum (q^r)^2,
    sum_{v in r} z_v / T, the label first in the shard and held here, held here, start_r."""
    op_labels = torch.where(valid, local, -1)  # every valid row gets its shard's statistics
    _, entropy, row_max, logsum, log_sum_sq, mean_logit, is_top1 = logprobs_op(
        logits, op_labels, temperature, with_entropy, with_stats, -1, backend
    )
    z_label = logits.gather(-1, local[..., None])[..., 0].float()
    mean_d = torch.where(logsum == -math.inf, 0.0, logsum - entropy) if with_entropy else torch.zeros_like(logsum)
    stats = [row_max, logsum, mean_d, torch.where(owned, z_label, 0.0)]
    if with_stats:
        start = torch.full_like(logsum, float(shard.start))
        stats += [log_sum_sq, mean_logit * logits.shape[-1], is_top1 * owned, owned.float(), start]
    return torch.stack(stats, -1)


def shard_logprob_grad(grads, logits, local, owned, valid, top, total, entropy, temperature, with_entropy, backend):
    """The gradient of a shard's logits [B, L, V_r] from the merged (M, logsum, H) [B, L] and ``grads`` =
    (grad_logp, grad_entropy), by klops's own backward row op: ``((onehot - q) g - g_H q (log q + H)) / T``, the
    one-hot on the rank holding the label only (the others pass V_r, outside the shard: none), 0 on invalid rows."""
    labels = torch.where(valid, torch.where(owned, local, logits.shape[-1]), -1)
    grad_logp, grad_entropy = (torch.zeros_like(top) if g is None else g.float() for g in grads)
    return logprobs_backward_op(grad_logp, grad_entropy, logits, labels, top, total, entropy, temperature,
                                with_entropy, -1, backend)  # fmt: skip


def merge_logprobs(gathered, valid, shard, temperature):
    """(logprob, entropy, M, logsum, row statistics: () or merge_row_stats's three) per row from the all-gathered
    [W, B, L, 4 or 9] shard_logprob_stats: ``logprob = (z_y - M) / T - logsum``, ``H = logsum - sum_r pi_r (A_r +
    (m_r - M) / T)``, 0 on invalid rows."""
    m, ls, a, zy, *row_stats = gathered.unbind(-1)
    top, total, log_pi = merge_logsumexp(m, ls, temperature)
    logp = torch.where(valid, (zy.sum(0) - top) / temperature - total, 0.0)
    mean_shift = torch.where(log_pi == -math.inf, 0.0, log_pi.exp() * (a + (m - top) / temperature)).sum(0)
    entropy = torch.where(valid, total - mean_shift, 0.0)
    if not row_stats:
        return logp, entropy, top, total, ()
    extra = tuple(torch.where(valid, x, 0.0) for x in merge_row_stats(m, ls, zy, log_pi, *row_stats, shard))
    return logp, entropy, top, total, extra


def merge_row_stats(m, logsum, z_label, log_pi, log_sum_sq, sum_z, top1, owned, start, shard):
    """(log sum_v q_v^2, mean_v z_v / T, is_top1 as 0 / 1) of LogprobOutputs from the shards' [W, N] statistics:
    ``log sum q^2 = logsumexp_r(2 log pi_r + log sum (q^r)^2)``; the mean from the shards' sums; the label is the
    first argmax where it is first in its shard, no shard's max exceeds its logit, and no shard of lower ids equals
    it (ids below 2^24 are exact in fp32)."""
    log_sum_sq = torch.logsumexp(torch.where(log_pi == -math.inf, -math.inf, 2.0 * log_pi + log_sum_sq), 0)
    z_y, owner_start = z_label.sum(0), (start * owned).sum(0)
    m = torch.where(logsum == -math.inf, -math.inf, m)  # an all -inf shard's max is -inf here, not 0
    beaten = (m > z_y) | ((m == z_y) & (start < owner_start))
    is_top1 = (top1.sum(0) > 0) & ~beaten.any(0)
    return log_sum_sq, sum_z.sum(0) / shard.total, is_top1.float()


@vocab_parallel_form("logprobs")
def logprobs(logits, labels, *, temperature, return_entropy, return_row_stats, ignore_index, backend, vocab_group,
             vocab_start):  # fmt: skip
    """``klops.logprobs`` over a vocabulary-sharded ``logits [..., V_r]``: one all-gather of 4 fp32 per row
    (16 bytes per token sent by each rank; 36 with ``return_row_stats``: 9 fp32), plus the shard sizes. Returns plain
    tensors, replicated."""
    (logits,), shard = vocab_shard(["logits"], [logits], vocab_group, vocab_start)
    labels = plain(labels)
    _inputs.check_logits("logits", logits)
    labels = _inputs.as_labels("labels", labels, "logits", logits)
    _inputs.check_labels_in_range("labels", labels, shard.total, ignore_index)
    temperature = _inputs.check_temperature(temperature)
    _inputs.check_bool("return_entropy", return_entropy)
    _inputs.check_bool("return_row_stats", return_row_stats)
    backend = resolve("logprobs", backend, logits.device)
    (logits3,) = _inputs.as_rows(logits)
    labels3 = labels.reshape(logits3.shape[:2])
    logp, entropy, *row_stats = _LogProbs.apply(logits3, labels3, labels3 != ignore_index, shard, temperature,
                                                return_entropy, return_row_stats, backend)  # fmt: skip
    logp, entropy = logp.reshape(labels.shape), entropy.reshape(labels.shape)
    if return_row_stats:
        log_sum_sq, mean_logits, is_top1 = (x.reshape(labels.shape) for x in row_stats)
        return LogprobOutputs(logp, entropy if return_entropy else None, log_sum_sq, mean_logits, is_top1.bool())
    return (logp, entropy) if return_entropy else logp


# ----------------------------------------------------------------------------------------------------
# divergences (docs/losses.md §1)
#
# forward / reverse KL between logit rows, one round: the chain rule of the KL over the partition of the vocabulary
# into shards, with pi^p_r, pi^q_r the shards' masses and p^r, q^r the softmaxes within shard r,
#     KL(p||q) = sum_r pi^p_r (log pi^p_r - log pi^q_r + KL(p^r||q^r))      (reverse KL: p and q swapped)
# where KL(p^r||q^r) is klops's own row op (klops::divergence) on the shard: 5 fp32 per row all-gathered (both
# inputs' m_r, logsum_r and the shard's KL). gbar = -1 (forward) or D (reverse).
#
# Every other kind (and a teacher given as log-probs or probs), two rounds: all-gather each input's m_r, logsum_r
# (4 fp32 per row; for log-probs / probs the largest entry and log-mass of the teacher's check), then each rank sums
# its entries' loss and a with the global log q, log p (the single-process per-entry math, klops/_terms.py) and one
# all-reduce adds (D, gbar): 2 fp32 per row. Backward for all: klops::divergence_backward with the global statistics.


def chain_rule_kl(student, teacher, valid, shard, kind, temperature, backend, extra=None):
    """(D, M_q, logsum_q, M_p, logsum_p, gbar, summed extra) per row of forward / reverse KL between logit rows, one
    all-gather; ``extra`` ([B, L, k] fp32 or None) rides along in it and comes back summed over the shards."""
    local, max_q, logsum_q, max_p, logsum_p, _, _ = divergence_op(student, teacher, valid, None, kind, "logits",
                                                                  temperature, 0.0, backend)  # fmt: skip
    local = torch.where((logsum_q == -math.inf) | (logsum_p == -math.inf), 0.0, local)  # a shard without one's mass
    stats = torch.stack((max_q, logsum_q, max_p, logsum_p, local), -1)
    stats = all_gather_rows(stats if extra is None else torch.cat((stats, extra), -1), shard.group)
    merged = merge_chain_rule(stats[..., :5], valid, kind, temperature)
    return *merged, None if extra is None else stats[..., 5:].sum(0)


def merge_chain_rule(stats, valid, kind, temperature):
    """(D, M_q, logsum_q, M_p, logsum_p, gbar) per row of forward / reverse KL from the all-gathered [W, ..., 5]
    shard statistics (m_q, logsum_q, m_p, logsum_p, the KL of the shard's softmaxes), by the chain rule."""
    mq, lsq, mp, lsp, d = stats.unbind(-1)
    top_q, total_q, log_pi_q = merge_logsumexp(mq, lsq, temperature)
    top_p, total_p, log_pi_p = merge_logsumexp(mp, lsp, temperature)
    first, second = (log_pi_p, log_pi_q) if kind == "forward" else (log_pi_q, log_pi_p)
    rows = torch.where(valid, chain_rule(first, second, d), 0.0)
    gbar = torch.full_like(rows, -1.0) if kind == "forward" else rows
    return rows, top_q, total_q, top_p, total_p, gbar


def chain_rule(first, second, within):
    """KL over the whole vocabulary from its shards: sum_r pi_r (log pi_r - log sigma_r + KL within shard r), from
    the [W, N] log-masses of the two distributions' shards (``first`` is the one the KL averages over) and the
    shards' own KLs."""
    return torch.where(first == -math.inf, 0.0, first.exp() * (first - second + within)).sum(0)


def topk_members(z, local, held):
    """Whether each entry of a chunk of logits ``z [..., V_r]`` is one of the teacher's top-k ids held here
    (``local [..., k]``: local_labels of the ids, those not held pointing at 0; ``held [..., k]``)."""
    return torch.zeros_like(z, dtype=torch.float32).scatter_add_(-1, local, held.float()) > 0


def two_round_divergence(student, teacher, valid, shard, kind, target_is, temperature, coef, extra=None):
    """(D, M_q, logsum_q, M_p, logsum_p, gbar, summed extra) per row of any kind: statistics all-gathered, then
    (D, gbar) summed over the shards by one all-reduce; ``extra`` ([B, L, k] fp32 or None) rides along in the
    all-gather and comes back summed over the shards. For a teacher given as log-probs or probs, M_p / logsum_p are 0
    and the teacher's check runs on its merged largest entry and log-mass."""
    B, L, V = student.shape
    stats = student.new_zeros((B, L, 4), dtype=torch.float32)
    for b, rows in row_chunks(B, L, V):
        stats[b, rows, 0], stats[b, rows, 1] = row_stats(student[b, rows], temperature)
        if target_is == "logits":
            stats[b, rows, 2], stats[b, rows, 3] = row_stats(teacher[b, rows], temperature)
        else:  # the check's statistics: largest log-prob (or negated probability), log of the shard's mass
            lp, p = teacher_probs(teacher[b, rows], target_is)
            stats[b, rows, 2] = lp.amax(-1) if target_is == "logprobs" else p.neg().amax(-1)
            stats[b, rows, 3] = p.sum(-1).log()
    gathered = all_gather_rows(stats if extra is None else torch.cat((stats, extra), -1), shard.group)
    mq, lsq, mp, lsp = gathered[..., :4].unbind(-1)
    top_q, total_q, _ = merge_logsumexp(mq, lsq, temperature)
    if target_is == "logits":
        top_p, total_p, _ = merge_logsumexp(mp, lsp, temperature)
    else:
        _inputs.check_teacher_rows("teacher_logits", target_is, teacher.dtype, shard.total, valid, mp.amax(0),
                                   torch.logsumexp(lsp, 0))  # fmt: skip
        top_p, total_p = torch.zeros_like(top_q), torch.zeros_like(top_q)
    sums = student.new_zeros((B, L, 2), dtype=torch.float32)
    for b, rows in row_chunks(B, L, V):
        lq = log_softmax_from_stats(student[b, rows], top_q[b, rows], total_q[b, rows], temperature)
        if target_is == "logits":
            lp = log_softmax_from_stats(teacher[b, rows], top_p[b, rows], total_p[b, rows], temperature)
            p = lp.exp()
        else:
            lp, p = teacher_probs(teacher[b, rows], target_is)
        sums[b, rows, 0], sums[b, rows, 1] = row_sums(lq, lq.exp(), lp, p, kind, coef)
    rows, gbar = torch.where(valid[..., None], all_reduce_sum(sums, shard.group), 0.0).unbind(-1)
    return rows, top_q, total_q, top_p, total_p, gbar, None if extra is None else gathered[..., 4:].sum(0)


class _Divergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, valid, shard, kind, target_is, temperature, coef, backend):
        if kind in ("forward", "reverse") and target_is == "logits":
            rows, *stats, _ = chain_rule_kl(student, teacher, valid, shard, kind, temperature, backend)
        else:
            rows, *stats, _ = two_round_divergence(student, teacher, valid, shard, kind, target_is, temperature, coef)
        ctx.save_for_backward(student, teacher, valid, *stats)
        ctx.params = (kind, target_is, temperature, coef, backend)
        return rows

    @staticmethod
    def backward(ctx, grad):
        student, teacher, valid, *stats = ctx.saved_tensors
        dz = divergence_backward_op(grad, None, student, teacher, valid, None, *stats, *ctx.params)
        return dz, None, None, None, None, None, None, None, None


@vocab_parallel_form("fused_kl")
def fused_kl(student_logits, teacher_logits, kind, *, beta, alpha, temperature, labels, mask, weights, ignore_index,
             reduction, num_items, target_is, backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.fused_kl`` over vocabulary-sharded student and teacher logits ``[..., V_r]`` (the same shards).
    Per token each rank sends 20 bytes (forward / reverse KL between logits: one all-gather of 5 fp32) or 16 + 8
    (other kinds, log-probs / probs teachers: an all-gather of 4 fp32, an all-reduce of 2), plus the shard sizes.
    Returns a plain tensor, replicated. (A TopK teacher: klops/vocab_parallel_distill.py's fused_kl_topk.)"""
    (student, teacher), shard = vocab_shard(["student_logits", "teacher_logits"], [student_logits, teacher_logits],
                                            vocab_group, vocab_start)  # fmt: skip
    labels, mask, weights = plain(labels), plain(mask), plain(weights)
    _inputs.check_logits("student_logits", student)
    kernel_kind, coef, temperature = check_divergence_options(kind, beta, alpha, temperature, target_is, reduction,
                                                              num_items)  # fmt: skip
    _inputs.check_dense_teacher(teacher, student)
    valid, weights = valid_rows_and_weights("student_logits", student, shard.total, labels, mask, weights,
                                            ignore_index)  # fmt: skip
    backend = resolve("divergence", backend, student.device)
    student3, teacher3 = _inputs.as_rows(student, teacher)
    valid3 = valid.reshape(student3.shape[:2])
    rows = _Divergence.apply(student3, teacher3, valid3, shard, kernel_kind, target_is, temperature, coef, backend)
    rows = rows.reshape(valid.shape)
    if weights is not None:
        rows = rows * weights.float()
    return reduce_rows(rows, valid, reduction, num_items)


# ----------------------------------------------------------------------------------------------------
# fused linear cross-entropy (docs/losses.md §2, fused-linear forms)
#
# Per rank, a chunk of rows' logits z = h W_r^T + b_r at a time (the chunked path, klops/_chunked.py), reduced by
# klops::logprobs to m_r, logsum_r, sum_{v in r} z_v, and z_y where the label is held here: 4 fp32 per row
# all-gathered. lse = M + logsum; loss = (1 - eps) (lse - z_y) + eps (lse - sum_v z_v / V). Backward: each chunk's
# logits formed again, dz = (g + g_lse) q - (1 - eps) g onehot - eps g / V, grad_W_r and grad_b_r local, grad_h
# summed over the group (one all-reduce of [N, D] in the hidden states' dtype).


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, valid, shard, softcap, label_smoothing, backend):
        local, owned = local_labels(labels, valid, shard)
        op_labels = torch.where(valid, local, -1)

        def chunk_stats(z, rows):
            _, _, row_max, logsum, _, mean_z, _ = logprobs_op(z, op_labels[rows][None], 1.0, False,
                                                              label_smoothing > 0, -1, backend)  # fmt: skip
            z_label = z.gather(-1, local[rows][None, :, None])[..., 0].float()
            return row_max, logsum, mean_z * z.shape[-1], torch.where(owned[rows][None], z_label, 0.0)

        stats = torch.stack(chunked_rows(hidden, weight, bias, softcap, empty_rows(hidden, 4), chunk_stats), -1)
        m, ls, sum_z, zy = all_gather_rows(stats, shard.group).unbind(-1)
        top, total, _ = merge_logsumexp(m, ls, 1.0)
        lse = top + total
        loss = (1.0 - label_smoothing) * (lse - zy.sum(0))
        if label_smoothing > 0:
            loss = loss + label_smoothing * (lse - sum_z.sum(0) / shard.total)
        ctx.save_for_backward(hidden, weight, bias, local, owned, valid, lse)
        ctx.params = (shard, softcap, label_smoothing)
        return torch.where(valid, loss, 0.0), torch.where(valid, lse, 0.0)

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        hidden, weight, bias, local, owned, valid, lse = ctx.saved_tensors
        shard, softcap, eps = ctx.params
        g = torch.zeros_like(lse) if grad_loss is None else torch.where(valid, grad_loss, 0.0)
        scale = g if grad_lse is None else g + torch.where(valid, grad_lse, 0.0)

        def chunk_grad(z, rows):
            dz = torch.exp(z.float() - lse[rows][None, :, None]).mul_(scale[rows][None, :, None])
            if eps > 0:
                dz.sub_((eps * g[rows] / shard.total)[None, :, None])
            onehot = (-(1.0 - eps) * g[rows] * owned[rows])[None, :, None]
            return dz.scatter_add_(-1, local[rows][None, :, None], onehot).mul_(valid[rows][None, :, None])

        grad_hidden, grad_weight, grad_bias = chunked_backward(hidden, weight, bias, softcap, chunk_grad)
        if ctx.needs_input_grad[0] and not shard.grad_hidden_partial:  # the same on every rank (hidden replicated)
            grad_hidden = all_reduce_sum(grad_hidden, shard.group)
        return grad_hidden, grad_weight, grad_bias if bias is not None else None, *(None,) * 6


@vocab_parallel_form("fused_linear_cross_entropy")
def fused_linear_cross_entropy(
    hidden, weight, labels, *, bias, ignore_index, reduction, label_smoothing, z_loss, softcap, logit_scale, num_items,
    return_lse, backend, vocab_group, vocab_start,
):  # fmt: skip
    """``klops.fused_linear_cross_entropy`` with a head shard ``weight [V_r, D]`` (and ``bias [V_r]``) and replicated
    ``hidden [..., D]``: one all-gather of 4 fp32 per row in forward (16 bytes per token sent by each rank), and in
    backward one all-reduce of ``grad_hidden [N, D]`` (2 D bytes per token in bf16): the O(N D) of any
    tensor-parallel head, never O(N V). Or a head DTensor placed Shard(0) on a 1-D mesh (bias alike) with ``hidden``
    a DTensor on that mesh: layout from the placement (no vocab_group, no shard sizes gathered), and DTensor reduces
    ``grad_hidden`` to ``hidden``'s placement (head_hidden). Returns plain tensors, replicated."""
    hidden, labels = head_hidden("hidden", hidden, "weight", weight), plain(labels)
    names, tensors = ("weight", "bias")[: 1 + (bias is not None)], (weight, bias)[: 1 + (bias is not None)]
    (weight, *bias), shard = vocab_shard(names, tensors, vocab_group, vocab_start, dims=[0] * len(tensors))
    shard = shard._replace(grad_hidden_partial=is_sharded(tensors[0]))  # DTensor sums grad_hidden (head_hidden)
    bias = bias[0] if bias else None
    _inputs.check_linear("hidden", hidden, "weight", weight, "bias", bias)
    labels = _inputs.as_labels("labels", labels, "hidden", hidden)
    _inputs.check_labels_in_range("labels", labels, shard.total, ignore_index)
    _inputs.check_choice("reduction", reduction, ("none", "sum", "mean"))
    label_smoothing = _inputs.check_real("label_smoothing", label_smoothing, low=0.0, high=1.0)
    z_loss = _inputs.check_real("z_loss", z_loss, low=0.0, high=math.inf)
    softcap = _inputs.check_softcap(softcap)
    _inputs.check_num_items(num_items, reduction)
    _inputs.check_bool("return_lse", return_lse)
    hidden, bias = _inputs.scale_head_inputs("logit_scale", logit_scale, hidden, bias)
    backend = resolve("logprobs", backend, hidden.device)  # the row op the chunked path runs on each chunk
    (hidden3,) = _inputs.as_rows(hidden)
    labels3 = labels.reshape(hidden3.shape[:2])
    rows, lse = _LinearCrossEntropy.apply(hidden3, weight, bias, labels3, labels3 != ignore_index, shard, softcap,
                                          label_smoothing, backend)  # fmt: skip
    rows, lse = rows.reshape(labels.shape), lse.reshape(labels.shape)
    if z_loss > 0:
        rows = rows + z_loss * lse.square()
    loss = reduce_rows(rows, labels != ignore_index, reduction, num_items)
    return (loss, lse) if return_lse else loss
