"""Vocabulary-parallel forms of ``sequence_logprobs``, ``grpo_loss_from_logits`` and ``tdpo_loss`` (issue 33), on the
plumbing of klops/vocab_parallel.py. Reached through ``vocab_group=`` / ``vocab_start=`` or logits DTensors placed
``Shard(-1)`` on a 1-D mesh, as ``klops.logprobs`` is.

Each op needs of the vocabulary only per-token values: the label's log-prob, the entropy, and the full-vocabulary KL
between the policy's and the reference's rows. Those come from the vocabulary-parallel forms of ``klops.logprobs``
(one all-gather of 4 fp32 per row), ``klops.fused_kl`` (forward / reverse KL by the chain rule over the shards: one
all-gather of 5 fp32 per row) and, for TDPO, ``divergence_and_label_logprobs`` (klops/vocab_parallel_distill.py), each
with its own all-gather of the shard sizes (none for DTensors). Their outputs are replicated, so every rank then runs
the single-process op's own ``[B, L]`` / ``[B]`` math alike (``grpo.loss_from_logits``, ``preference.TdpoPairs``,
``preference.sequence_totals``): the same loss and metrics on every rank, and the gradient of each rank's shard from
the local backward of each sweep, with no collective.

Bytes sent per token by each rank (forward; the backward sends nothing), besides the shard sizes:

- ``sequence_logprobs``: 16 (the label's log-prob);
- ``grpo_loss_from_logits``: 16 (log-prob and entropy), + 16 with ``ref_logits`` (the reference's log-prob), or
  + 20 instead with ``kl_estimator="full"`` and ``beta > 0`` (the reverse KL to ``ref_logits``);
- ``tdpo_loss``: 28 (KL(p || q) and both models' label log-probs: one all-gather of 7 fp32).

Head shards ``weight [V_r, D]`` with replicated hidden states: ``sequence_logprobs``, ``fused_linear_grpo_loss`` (in
klops/grpo.py, which passes ``vocab_group`` to its sweeps) and ``tdpo_loss`` run the sweeps of the vocabulary-parallel
``fused_linear_logprobs`` / ``fused_linear_kl`` (klops/vocab_parallel_linear.py): in forward the bytes above, but
``tdpo_loss`` 20 + 16 + 16 (the KL and each model's log-prob, three sweeps); in backward one all-reduce of
``grad_hidden [N, D]`` per sweep that takes a gradient (two for ``fused_linear_grpo_loss`` with the full KL and for
``tdpo_loss``: the log-prob's and the KL's).
"""

import torch

from . import _inputs
from ._packed import packing
from .distributed import VOCAB_PARALLEL_FORMS, vocab_parallel_form
from .grpo import loss_from_logits
from .linear import fused_linear_logprobs
from .linear_divergence import fused_linear_kl
from .preference import TdpoPairs, check_head_options, sequence_totals
from .vocab_parallel import plain, vocab_shard


@vocab_parallel_form("sequence_logprobs")
def sequence_logprobs(logits_or_hidden, labels, mask, *, weight, bias, average, temperature, softcap, logit_scale,
                      ignore_index, position_ids, cu_seqlens, backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.sequence_logprobs`` over vocabulary-sharded logits ``[B, L, V_r]`` (or a head shard ``weight [V_r,
    D]``, through the vocabulary-parallel ``fused_linear_logprobs``): the per-token log-probs, then the
    single-process sums. 16 bytes per token sent by each rank. Returns a plain ``[B]`` (or ``[S]``), replicated."""
    labels, mask, position_ids, cu_seqlens = (plain(x) for x in (labels, mask, position_ids, cu_seqlens))
    packed = packing(position_ids, cu_seqlens, labels)
    check_head_options(weight, bias, softcap, logit_scale)
    _inputs.check_bool("average", average)
    sample = dict(temperature=temperature, ignore_index=ignore_index, backend=backend, vocab_group=vocab_group,
                  vocab_start=vocab_start)  # fmt: skip
    if weight is None:
        token_logp = VOCAB_PARALLEL_FORMS["logprobs"](logits_or_hidden, labels, return_entropy=False,
                                                      return_row_stats=False, **sample)  # fmt: skip
    else:
        token_logp = fused_linear_logprobs(logits_or_hidden, weight, labels, bias=bias, softcap=softcap,
                                           logit_scale=logit_scale, **sample)  # fmt: skip
    return sequence_totals(token_logp, labels, mask, average, ignore_index, packed)


@vocab_parallel_form("grpo_loss_from_logits")
def grpo_loss_from_logits(logits, completion_ids, advantages, mask, *, ref_logits, ref_logp, old_logp, temperature,
                          kl_estimator, backend, vocab_group, vocab_start, **kwargs):  # fmt: skip
    """``klops.grpo_loss_from_logits`` over vocabulary-sharded policy (and reference) logits ``[B, L, V_r]``: the
    single-process op's sweeps (log-prob and entropy; the reference's log-prob, or the reverse KL to it for
    ``kl_estimator="full"``) each through its vocabulary-parallel form, then ``grpo_loss`` on their replicated
    outputs. 16 bytes per token sent by each rank, + 16 with ``ref_logits`` (+ 20 instead for the full KL); with
    ``ref_logits`` as plain tensors, one more all-gather of the shard sizes first checks that both logits have the
    same. Returns plain tensors."""
    if ref_logits is not None:  # every rank raises alike if a rank's two shards differ
        vocab_shard(["logits", "ref_logits"], [logits, ref_logits], vocab_group, vocab_start)
    completion_ids, advantages, mask, ref_logp, old_logp = (
        plain(x) for x in (completion_ids, advantages, mask, ref_logp, old_logp)
    )
    kwargs = {name: plain(x) for name, x in kwargs.items()}
    sample = dict(temperature=temperature, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start)
    return loss_from_logits(logits, completion_ids, advantages, mask, ref_logits, ref_logp, old_logp, kl_estimator,
                            sample, kwargs)  # fmt: skip


@vocab_parallel_form("tdpo_loss")
def tdpo_loss(policy, ref, labels, mask, chosen_index, rejected_index, *, beta, alpha, variant, temperature, softcap,
              logit_scale, ignore_index, position_ids, cu_seqlens, backend, vocab_group, vocab_start):  # fmt: skip
    """``klops.tdpo_loss`` over vocabulary-sharded policy and reference logits ``[B, L, V_r]``: KL(p || q) and both
    models' label log-probs per token from the vocabulary-parallel ``divergence_and_label_logprobs`` (one all-gather
    of 7 fp32 per row: 28 bytes per token sent by each rank), then the single-process sequence-level steps. Models
    given as ``(hidden, weight[, bias])`` with head shards: ``_linear_tdpo``. Returns plain tensors, replicated."""
    if not isinstance(policy, torch.Tensor) or not isinstance(ref, torch.Tensor):
        return _linear_tdpo(policy, ref, labels, mask, chosen_index, rejected_index, beta=beta, alpha=alpha,
                            variant=variant, temperature=temperature, softcap=softcap, logit_scale=logit_scale,
                            ignore_index=ignore_index, position_ids=position_ids, cu_seqlens=cu_seqlens,
                            backend=backend, vocab_group=vocab_group, vocab_start=vocab_start)  # fmt: skip
    if softcap is not None or logit_scale != 1.0:
        raise ValueError("softcap and logit_scale apply to models given as (hidden, weight); logits are used as given")
    labels, mask, chosen_index, rejected_index, position_ids, cu_seqlens = (
        plain(x) for x in (labels, mask, chosen_index, rejected_index, position_ids, cu_seqlens)
    )
    pairs = TdpoPairs.check(policy, labels, mask, chosen_index, rejected_index, beta, alpha, variant, ignore_index,
                            position_ids, cu_seqlens)  # fmt: skip
    kl, policy_logp, ref_logp = VOCAB_PARALLEL_FORMS["divergence_and_label_logprobs"](
        policy, ref.detach(), labels, "forward", beta=None, alpha=None, temperature=temperature, mask=mask,
        ignore_index=ignore_index, backend=backend, vocab_group=vocab_group, vocab_start=vocab_start,
    )  # fmt: skip
    return pairs.loss(kl, policy_logp, ref_logp)


def _linear_tdpo(policy, ref, labels, mask, chosen_index, rejected_index, *, beta, alpha, variant, temperature, softcap,
                 logit_scale, ignore_index, position_ids, cu_seqlens, backend, vocab_group, vocab_start):  # fmt: skip
    """tdpo_loss's vocabulary-parallel form for models given as ``(hidden, weight[, bias])`` with head shards
    ``weight [V_r, D]``: KL(p || q) from the vocabulary-parallel ``fused_linear_kl`` and each model's label
    log-probs from ``fused_linear_logprobs``."""
    policy_h, policy_w, policy_b = _inputs.split_model("policy", policy)
    ref_h, ref_w, ref_b = _inputs.split_model("ref", ref)
    if policy_w is None or ref_w is None:
        raise ValueError("give policy and ref both as logits or both as (hidden, weight)")
    labels, mask, chosen_index, rejected_index, position_ids, cu_seqlens = (
        plain(x) for x in (labels, mask, chosen_index, rejected_index, position_ids, cu_seqlens)
    )
    pairs = TdpoPairs.check(policy_h, labels, mask, chosen_index, rejected_index, beta, alpha, variant, ignore_index,
                            position_ids, cu_seqlens)  # fmt: skip
    ref_h, ref_w, ref_b = (None if x is None else x.detach() for x in (ref_h, ref_w, ref_b))
    labels = torch.where(pairs.keep != 0, labels, ignore_index)
    head = dict(temperature=temperature, softcap=softcap, logit_scale=logit_scale, ignore_index=ignore_index,
                backend=backend, vocab_group=vocab_group, vocab_start=vocab_start)  # fmt: skip
    kl = fused_linear_kl(policy_h, policy_w, ref_h, ref_w, student_bias=policy_b, teacher_bias=ref_b, kind="forward",
                         labels=labels, reduction="none", **head)  # fmt: skip
    policy_logp = fused_linear_logprobs(policy_h, policy_w, labels, bias=policy_b, **head)
    with torch.no_grad():
        ref_logp = fused_linear_logprobs(ref_h, ref_w, labels, bias=ref_b, **head)
    return pairs.loss(kl, policy_logp, ref_logp)
