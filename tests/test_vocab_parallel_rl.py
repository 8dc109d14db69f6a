"""Vocabulary-parallel sequence_logprobs, grpo_loss_from_logits and tdpo_loss (klops/vocab_parallel_rl.py, issue 33)
against the single-process op on the gathered logits.

Each test spawns a gloo group of 2 or 3 CPU processes (V = 37, uneven shards) and runs many checks in it: the processes
build the same full logits from one seed (tests/test_vocab_parallel.py's ``_inputs``: -inf entries, a row whose slice
of rank 1 is all -inf, ignored labels, a fully masked sequence), each takes its slice of the vocabulary, and every loss,
metric and gradient must equal the single-process op's (its slice of the gradient).
"""

import math

import pytest
import torch
import torch.distributed as dist

import klops

from ._distributed import close as _close
from ._distributed import shard_slice as _slice
from ._distributed import spawn as _spawn
from ._distributed import traffic_of
from .test_vocab_parallel import SIZES, D, V, _inputs


def _policy_batch(world: int, dtype=torch.float32):
    """(policy logits, reference logits, completion ids, mask) [B, L(, V)]: the mask leaves out the ignored labels
    and any label on a -inf entry (its log-prob is -inf), and one more token."""
    z, y, labels = _inputs(world, dtype)
    ids = labels.clamp(min=0)
    finite = z.gather(-1, ids[..., None])[..., 0].isfinite()
    mask = ((labels != -100) & finite).float()
    mask[1, 0] = 0.0
    return z, y, ids, mask


def _compare(what, out, expected, grads) -> None:
    """(loss, metrics) against the single-process (loss, metrics); grads: (local grad, full grad's slice) pairs."""
    (loss, metrics), (loss_f, metrics_f) = out, expected
    _close(loss, loss_f, what)
    assert metrics.keys() == metrics_f.keys(), (what, metrics.keys(), metrics_f.keys())
    for name in metrics:
        _close(metrics[name], metrics_f[name], f"{what} metric {name}")
    for i, (grad, grad_f) in enumerate(grads):
        _close(grad, grad_f, f"{what} grad {i}")


# ----------------------------------------------------------------------------------------------------
# values and gradients


def _check_sequence_logprobs(rank: int, world: int) -> None:
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, _, labels = _inputs(world)
    mask = torch.ones(labels.shape)
    mask[0, 2] = 0.0
    for options in (dict(), dict(average=True, temperature=0.7), dict(mask=mask), dict(backend="torch")):
        zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
        labels_ = torch.where(z.gather(-1, labels.clamp(min=0)[..., None])[..., 0].isfinite(), labels, -100)
        out = klops.sequence_logprobs(zl, labels_, vocab_group=group, **options)
        expected = klops.sequence_logprobs(zf, labels_, **options)
        what = f"sequence_logprobs {options.keys()}"
        _close(out, expected, what)
        (out * torch.arange(1.0, 4.0)).sum().backward(), (expected * torch.arange(1.0, 4.0)).sum().backward()
        _close(zl.grad, zf.grad[..., own], what + " grad")
    # packed: the three sequences end to end in one row, by position_ids and by cu_seqlens
    packed_z, packed_labels = z.reshape(1, -1, V), labels.reshape(1, -1)
    packed_labels = torch.where(packed_z.gather(-1, packed_labels.clamp(min=0)[..., None])[..., 0].isfinite(),
                                packed_labels, -100)  # fmt: skip
    position_ids = torch.arange(labels.shape[1]).repeat(labels.shape[0])[None]
    cu_seqlens = torch.arange(0, labels.numel() + 1, labels.shape[1])
    for packing in (dict(position_ids=position_ids), dict(cu_seqlens=cu_seqlens, average=True)):
        zl, zf = packed_z[..., own].clone().requires_grad_(), packed_z.clone().requires_grad_()
        out = klops.sequence_logprobs(zl, packed_labels, vocab_group=group, **packing)
        expected = klops.sequence_logprobs(zf, packed_labels, **packing)
        assert out.shape == (3,)
        _close(out, expected, f"packed sequence_logprobs {packing.keys()}")
        out.sum().backward(), expected.sum().backward()
        _close(zl.grad, zf.grad[..., own], f"packed sequence_logprobs {packing.keys()} grad")


TRUNCATE_ROLLOUT = dict(rollout_correction="token_truncate", rollout_clip_max=2.0)
GRPO_CASES = [
    dict(),
    dict(loss_type="grpo", epsilon_high=0.28, beta=0.1, kl_estimator="full", entropy_coef=0.01, temperature=0.7),
    dict(loss_type="bnpo", delta=1.5, beta=0.05, kl_estimator="k1", with_old=True),
    dict(loss_type="dr_grpo", beta=0.2, kl_estimator="k2", max_completion_length=8, with_old=True),
    dict(loss_type="dapo", beta=0.1, kl_estimator="abs", top_entropy_quantile=0.5, with_old=True, num_items=11),
    dict(loss_type="cispo", epsilon_high=1.5, with_old=True, with_rollout=True, **TRUNCATE_ROLLOUT),
    dict(loss_type="gspo", with_old=True, beta=0.1, kl_estimator="full", use_bias_correction_kl=True),
    dict(loss_type="sapo", importance_sampling_level="sequence", with_old=True, ref_given_as="logp"),
    dict(loss_type="vespo", with_old=True, with_rollout=True, rollout_correction="token_mask", backend="torch"),
    dict(loss_type="dppo_kl", with_old=True, beta=0.1, kl_estimator="k3", kl_clamp=1.0),
    dict(loss_type="dro", dro_beta=0.5, with_old=True, off_policy_mask_threshold=0.1, with_rollout=True),
]


def _check_grpo(rank: int, world: int) -> None:
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, ids, mask = _policy_batch(world)
    gen = torch.Generator().manual_seed(5)
    advantages = torch.randn(ids.shape[0], generator=gen)
    with torch.no_grad():
        logp_now = klops.logprobs(z, torch.where(mask != 0, ids, -100))
        old = logp_now + 0.3 * torch.randn(ids.shape, generator=gen)
        rollout = old + 0.2 * torch.randn(ids.shape, generator=gen)
        ref_logp = klops.logprobs(y, torch.where(mask != 0, ids, -100))
    for case in GRPO_CASES:
        options = dict(case)
        with_old, with_rollout = options.pop("with_old", False), options.pop("with_rollout", False)
        ref_given_as = options.pop("ref_given_as", "logits")
        if with_old:
            options["old_logp"] = old
        if with_rollout:
            options["rollout_logp"] = rollout
        zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
        if ref_given_as == "logits":
            local_ref, full_ref = dict(ref_logits=y[..., own]), dict(ref_logits=y)
        else:
            local_ref = full_ref = dict(ref_logp=ref_logp)
        out = klops.grpo_loss_from_logits(zl, ids, advantages, mask, vocab_group=group, **local_ref, **options)
        expected = klops.grpo_loss_from_logits(zf, ids, advantages, mask, **full_ref, **options)
        out[0].backward(), expected[0].backward()
        _compare(f"grpo {case}", out, expected, [(zl.grad, zf.grad[..., own])])
    # packed: the sequences end to end in one row (cu_seqlens), one advantage per sequence
    zl, zf = z[..., own].reshape(1, -1, SIZES[world][rank]).clone().requires_grad_(), z.reshape(1, -1, V).clone()
    zf.requires_grad_()
    cu_seqlens = torch.arange(0, ids.numel() + 1, ids.shape[1])
    row = (ids.reshape(1, -1), advantages, mask.reshape(1, -1))
    packed = dict(cu_seqlens=cu_seqlens, loss_type="grpo", beta=0.1, kl_estimator="full")
    out = klops.grpo_loss_from_logits(zl, *row, ref_logits=y[..., own].reshape(zl.shape), vocab_group=group, **packed)
    expected = klops.grpo_loss_from_logits(zf, *row, ref_logits=y.reshape(zf.shape), **packed)
    out[0].backward(), expected[0].backward()
    _compare("grpo packed", out, expected, [(zl.grad, zf.grad[..., own])])
    # bf16 logits, per-token advantages
    z16, y16 = z.bfloat16(), y.bfloat16()
    zl, zf = z16[..., own].clone().requires_grad_(), z16.clone().requires_grad_()
    per_token = advantages[:, None].expand(ids.shape).contiguous()
    options = dict(beta=0.1, kl_estimator="full", entropy_coef=0.01)
    out = klops.grpo_loss_from_logits(zl, ids, per_token, mask, ref_logits=y16[..., own], vocab_group=group, **options)
    expected = klops.grpo_loss_from_logits(zf, ids, per_token, mask, ref_logits=y16, **options)
    out[0].backward(), expected[0].backward()
    _compare("grpo bf16", out, expected, [(zl.grad, zf.grad[..., own])])


def _check_tdpo(rank: int, world: int) -> None:
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, labels = _inputs(world)
    labels = torch.where(z.gather(-1, labels.clamp(min=0)[..., None])[..., 0].isfinite(), labels, -100)
    mask = torch.ones(labels.shape, dtype=torch.bool)
    mask[1, 4] = False
    pairs = dict(chosen_index=torch.tensor([0, 2]), rejected_index=torch.tensor([1, 0]))
    for options in (dict(variant=1), dict(variant=2, alpha=0.3, temperature=0.7, mask=mask), dict(backend="torch")):
        options = dict(dict(mask=None, beta=0.2), **options)
        zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
        out = klops.tdpo_loss(zl, y[..., own], labels, vocab_group=group, **pairs, **options)
        expected = klops.tdpo_loss(zf, y, labels, **pairs, **options)
        out[0].backward(), expected[0].backward()
        _compare(f"tdpo {options}", out, expected, [(zl.grad, zf.grad[..., own])])
    # packed: the sequences end to end, pairs of the packed sequences
    zl, zf = z[..., own].reshape(1, -1, SIZES[world][rank]).clone().requires_grad_(), z.reshape(1, -1, V).clone()
    zf.requires_grad_()
    cu_seqlens = torch.arange(0, labels.numel() + 1, labels.shape[1])
    packed = dict(cu_seqlens=cu_seqlens, mask=None, **pairs)
    out = klops.tdpo_loss(zl, y[..., own].reshape(zl.shape), labels.reshape(1, -1), vocab_group=group, **packed)
    expected = klops.tdpo_loss(zf, y.reshape(zf.shape), labels.reshape(1, -1), **packed)
    out[0].backward(), expected[0].backward()
    _compare("tdpo packed", out, expected, [(zl.grad, zf.grad[..., own])])


def _check_dtensor(rank: int, world: int) -> None:
    """Logits DTensors placed Shard(-1) (split as torch.chunk splits), the other inputs replicated DTensors."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    chunk = -(-V // world)
    own = slice(min(V, rank * chunk), min(V, (rank + 1) * chunk))
    z, y, ids, mask = _policy_batch(world)

    def sharded(x):
        return DTensor.from_local(x, mesh, [Shard(2)], run_check=False, shape=z.shape, stride=z.stride())

    def replicated(x):
        return distribute_tensor(x, mesh, [Replicate()])

    zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
    advantages = torch.linspace(-1, 1, ids.shape[0])
    options = dict(beta=0.1, kl_estimator="full")
    out = klops.grpo_loss_from_logits(sharded(zl), replicated(ids), replicated(advantages), replicated(mask),
                                      ref_logits=sharded(y[..., own]), **options)  # fmt: skip
    expected = klops.grpo_loss_from_logits(zf, ids, advantages, mask, ref_logits=y, **options)
    assert type(out[0]) is torch.Tensor
    out[0].backward(), expected[0].backward()
    _compare("DTensor grpo", out, expected, [(zl.grad, zf.grad[..., own])])

    labels = torch.where(mask != 0, ids, -100)
    zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
    out = klops.sequence_logprobs(sharded(zl), replicated(labels))
    expected = klops.sequence_logprobs(zf, labels)
    _close(out, expected, "DTensor sequence_logprobs")
    out.sum().backward(), expected.sum().backward()
    _close(zl.grad, zf.grad[..., own], "DTensor sequence_logprobs grad")

    zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
    pairs = (torch.tensor([0]), torch.tensor([1]))
    out = klops.tdpo_loss(sharded(zl), sharded(y[..., own]), replicated(labels), None, *pairs)
    expected = klops.tdpo_loss(zf, y, labels, None, *pairs)
    out[0].backward(), expected[0].backward()
    _compare("DTensor tdpo", out, expected, [(zl.grad, zf.grad[..., own])])


def _heads(world: int, rank: int):
    """([(hidden [B, L, D], weight [V, D], bias [V], this rank's weight shard, its bias shard)] of the policy and of
    the reference model, labels [B, L] as _inputs's)."""
    gen, own = torch.Generator().manual_seed(6), _slice(rank, SIZES[world])
    _, _, labels = _inputs(world)
    models = []
    for _ in range(2):
        hidden, weight = torch.randn(*labels.shape, D, generator=gen), torch.randn(V, D, generator=gen)
        bias = torch.randn(V, generator=gen)
        models.append((hidden, weight, bias, weight[own], bias[own]))
    return models, labels


def _leaves(*tensors):
    """Fresh copies that take a gradient."""
    return [x.clone().requires_grad_() for x in tensors]


def _check_linear(rank: int, world: int) -> None:
    """Head shards: sequence_logprobs, fused_linear_grpo_loss and tdpo_loss's hidden-state form."""
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    ((hidden, weight, bias, weight_r, bias_r), (ref_h, ref_w, ref_b, ref_w_r, ref_b_r)), labels = _heads(world, rank)
    head = dict(softcap=3.0, logit_scale=0.5)
    for options in (dict(), dict(average=True, temperature=0.7, **head)):
        h, w, b = _leaves(hidden, weight_r, bias_r)
        hf, wf, bf = _leaves(hidden, weight, bias)
        out = klops.sequence_logprobs(h, labels, weight=w, bias=b, vocab_group=group, **options)
        expected = klops.sequence_logprobs(hf, labels, weight=wf, bias=bf, **options)
        _close(out, expected, f"linear sequence_logprobs {options}")
        out.sum().backward(), expected.sum().backward()
        grads = [(h.grad, hf.grad), (w.grad, wf.grad[own]), (b.grad, bf.grad[own])]
        for i, (grad, grad_f) in enumerate(grads):
            _close(grad, grad_f, f"linear sequence_logprobs {options} grad {i}")

    ids, mask = labels.clamp(min=0), (labels != -100).float()
    advantages = torch.linspace(-1, 1, ids.shape[0])
    cases = [dict(beta=0.1, **head), dict(beta=0.1, kl_estimator="full", entropy_coef=0.01, loss_type="grpo"),
             dict(beta=0.0, kl_estimator="full", top_entropy_quantile=0.5, temperature=0.7)]  # fmt: skip
    for options in cases:
        h, w, b = _leaves(hidden, weight_r, bias_r)
        hf, wf, bf = _leaves(hidden, weight, bias)
        out = klops.fused_linear_grpo_loss(h, w, ids, advantages, mask, bias=b, ref_hidden=ref_h, ref_weight=ref_w_r,
                                           ref_bias=ref_b_r, vocab_group=group, **options)  # fmt: skip
        expected = klops.fused_linear_grpo_loss(hf, wf, ids, advantages, mask, bias=bf, ref_hidden=ref_h,
                                                ref_weight=ref_w, ref_bias=ref_b, **options)  # fmt: skip
        out[0].backward(), expected[0].backward()
        grads = [(h.grad, hf.grad), (w.grad, wf.grad[own]), (b.grad, bf.grad[own])]
        _compare(f"fused_linear_grpo_loss {options}", out, expected, grads)

    pairs = dict(chosen_index=torch.tensor([0, 2]), rejected_index=torch.tensor([1, 0]))
    mask = torch.ones(labels.shape)
    mask[0, 1] = 0.0
    for options in (dict(variant=1, mask=None), dict(variant=2, mask=mask, temperature=0.7, **head)):
        h, w, b = _leaves(hidden, weight_r, bias_r)
        hf, wf, bf = _leaves(hidden, weight, bias)
        out = klops.tdpo_loss((h, w, b), (ref_h, ref_w_r, ref_b_r), labels, vocab_group=group, **pairs, **options)
        expected = klops.tdpo_loss((hf, wf, bf), (ref_h, ref_w, ref_b), labels, **pairs, **options)
        out[0].backward(), expected[0].backward()
        grads = [(h.grad, hf.grad), (w.grad, wf.grad[own]), (b.grad, bf.grad[own])]
        _compare(f"linear tdpo {options}", out, expected, grads)


@pytest.mark.parametrize("world", [2, 3])
def test_values_and_gradients(tmp_path, world):
    """Plain shards (uneven), DTensors, head shards."""
    _spawn(tmp_path, world, _check_sequence_logprobs, _check_grpo, _check_tdpo, _check_dtensor, _check_linear)


# ----------------------------------------------------------------------------------------------------
# traffic: O(N), independent of V


def _traffic(rank: int, world: int, rows: int, vocab: int) -> dict:
    """The collectives (name, bytes sent by this rank) of each op on [1, rows] tokens over vocab entries per rank,
    forward and backward."""
    group, gen = dist.group.WORLD, torch.Generator().manual_seed(rank)
    z, y = torch.randn(1, rows, vocab, generator=gen).requires_grad_(), torch.randn(1, rows, vocab, generator=gen)
    hidden, weight = torch.randn(1, rows, D).requires_grad_(), torch.randn(vocab, D).requires_grad_()
    ref_hidden, ref_weight = torch.randn(1, rows, D), torch.randn(vocab, D)
    labels = torch.randint(0, vocab * world, (1, rows), generator=gen)
    mask, advantages, pair = torch.ones(1, rows), torch.ones(1), (torch.tensor([0]), torch.tensor([0]))
    grpo, ref = dict(advantages=advantages, mask=mask, vocab_group=group), dict(ref_logits=y, beta=0.1)
    ref_head = dict(ref_hidden=ref_hidden, ref_weight=ref_weight, beta=0.1, kl_estimator="full")
    calls = {
        "sequence_logprobs": lambda: klops.sequence_logprobs(z, labels, vocab_group=group).sum(),
        "grpo": lambda: klops.grpo_loss_from_logits(z, labels, **grpo)[0],
        "grpo ref_logits": lambda: klops.grpo_loss_from_logits(z, labels, **grpo, **ref)[0],
        "grpo full kl": lambda: klops.grpo_loss_from_logits(z, labels, **grpo, **ref, kl_estimator="full")[0],
        "tdpo": lambda: klops.tdpo_loss(z, y, labels, None, *pair, vocab_group=group)[0],
        "sequence_logprobs head": lambda: klops.sequence_logprobs(
            hidden, labels, weight=weight, vocab_group=group
        ).sum(),
        "fused_linear_grpo_loss full kl": lambda: klops.fused_linear_grpo_loss(
            hidden, weight, labels, **grpo, **ref_head
        )[0],
        "tdpo head": lambda: klops.tdpo_loss(
            (hidden, weight), (ref_hidden, ref_weight), labels, None, *pair, vocab_group=group
        )[0],
    }
    return traffic_of(calls)


def _check_traffic(rank: int, world: int) -> None:
    small, wide, long = _traffic(rank, world, 16, 8), _traffic(rank, world, 16, 64), _traffic(rank, world, 32, 8)
    assert small == wide, "the traffic depends on V"
    per_token = {  # bytes sent per token by each rank: forward, backward
        "sequence_logprobs": (16, 0),
        "grpo": (16, 0),
        "grpo ref_logits": (16 + 16, 0),
        "grpo full kl": (16 + 20, 0),
        "tdpo": (28, 0),
        "sequence_logprobs head": (16, 4 * D),  # grad_hidden [N, D] fp32, all-reduced
        "fused_linear_grpo_loss full kl": (16 + 20, 2 * 4 * D),  # the log-probs' and the KL's grad_hidden
        "tdpo head": (20 + 16 + 16, 2 * 4 * D),
    }
    for name, expected in per_token.items():
        assert expected[1] > 0 or small[name][1] == [], (name, small[name][1])  # logits: no collective in backward
        for direction, (calls, long_calls) in enumerate(zip(small[name], long[name])):
            assert len(calls) == len(long_calls) <= 6, (name, calls)  # rounds per call, whatever N
            per_row = (sum(b for _, b in long_calls) - sum(b for _, b in calls)) / 16
            assert per_row == expected[direction], (name, direction, calls, long_calls)
            # what does not grow with N: the shard sizes and vocab_start, one int64 each per sweep (2 or 3 per rank)
            sizes = sum(b for _, b in calls) - 16 * per_row
            assert sizes == sum(b for (_, b), (_, c) in zip(calls, long_calls) if b == c) <= 3 * 24, (name, calls)


# ----------------------------------------------------------------------------------------------------
# errors: raised on every rank alike


def _check_errors(rank: int, world: int) -> None:
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, ids, mask = _policy_batch(world)
    zl, yl, advantages = z[..., own], y[..., own], torch.zeros(ids.shape[0])
    outside = ids.clone()
    outside[0, 2] = V
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.grpo_loss_from_logits(zl, outside, advantages, mask, vocab_group=group)
    outside[0, 2] = -100
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.sequence_logprobs(zl, outside.masked_fill(outside == -100, V), vocab_group=group)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.tdpo_loss(zl, yl, outside.masked_fill(outside == -100, V), None, torch.tensor([0]), torch.tensor([1]),
                        vocab_group=group)  # fmt: skip
    short = yl[..., :-1] if rank == 1 else yl  # only rank 1's reference shard is short: every rank raises
    with pytest.raises(ValueError, match="mismatched vocabulary shards"):
        klops.grpo_loss_from_logits(zl, ids, advantages, mask, ref_logits=short, vocab_group=group)
    with pytest.raises(ValueError, match=r"ref_logits must have the rows of logits"):
        klops.grpo_loss_from_logits(zl, ids, advantages, mask, ref_logits=yl[:1], vocab_group=group)
    with pytest.raises(ValueError, match='kl_estimator="full" needs the reference model'):
        klops.grpo_loss_from_logits(zl, ids, advantages, mask, kl_estimator="full", beta=0.1, vocab_group=group)
    with pytest.raises(ValueError, match="mask must have shape"):
        klops.grpo_loss_from_logits(zl, ids, advantages, mask[:, :2], vocab_group=group)
    with pytest.raises(ValueError, match=r"both as logits or both as \(hidden, weight\)"):
        klops.tdpo_loss(zl, (torch.randn(3, 5, 4), torch.randn(4, 4)), ids, None, torch.tensor([0]),
                        torch.tensor([1]), vocab_group=group)  # fmt: skip
    with pytest.raises(ValueError, match="variant must be 1"):
        klops.tdpo_loss(zl, yl, ids, None, torch.tensor([0]), torch.tensor([1]), variant=3, vocab_group=group)
    with pytest.raises(ValueError, match="vocab_start needs vocab_group"):
        klops.sequence_logprobs(zl, ids, vocab_start=0)
    with pytest.raises(ValueError, match="temperature"):
        klops.grpo_loss_from_logits(zl, ids, advantages, mask, temperature=0.0, vocab_group=group)
    # vocab_start: another layout, rank 0 holding the top of the vocabulary
    top = SIZES[world][0]
    mine = slice(top, V) if rank == 0 else slice(0, top)
    zl_, zf = z[..., mine].clone().requires_grad_(), z.clone().requires_grad_()
    out = klops.grpo_loss_from_logits(zl_, ids, advantages + 1, mask, ref_logits=y[..., mine], beta=0.1,
                                      kl_estimator="full", vocab_group=group, vocab_start=mine.start)  # fmt: skip
    expected = klops.grpo_loss_from_logits(zf, ids, advantages + 1, mask, ref_logits=y, beta=0.1, kl_estimator="full")
    out[0].backward(), expected[0].backward()
    _compare("vocab_start grpo", out, expected, [(zl_.grad, zf.grad[..., mine])])
    # after all that, the group still works: no rank is left inside a collective
    labels = torch.where(mask != 0, ids, -100)
    _close(klops.sequence_logprobs(zl, labels, vocab_group=group), klops.sequence_logprobs(z, labels), "after errors")
    assert math.isfinite(klops.sequence_logprobs(zl, labels, vocab_group=group).sum().item())


def test_traffic_and_errors(tmp_path):
    """Bytes per token of each op (O(N), one round per sweep, nothing in backward); the errors."""
    _spawn(tmp_path, 2, _check_traffic, _check_errors)
