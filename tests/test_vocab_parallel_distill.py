"""Vocabulary-parallel distillation ops (klops/vocab_parallel_distill.py, issue 33) against the single-process op on
the gathered logits: divergence_and_label_logprobs, forward_reverse_kl, akl_weights / akl_loss and dckd_loss, on gloo
groups of 2 and 3 CPU processes (tests/_distributed.py; the inputs of tests/test_vocab_parallel.py: V = 37, uneven
shards, -inf entries, a shard holding only -inf, ignored labels and a fully masked sequence)."""

import pytest
import torch
import torch.distributed as dist

import klops
from klops.kernels.kinds import DIVERGENCE_KINDS

from ._distributed import close as _close
from ._distributed import shard_slice as _slice
from ._distributed import spawn as _spawn
from ._distributed import traffic_of
from .test_vocab_parallel import COEF, SIZES, V, _inputs


def _mask(labels):
    mask = torch.ones(labels.shape, dtype=torch.bool)
    mask[0, 3] = False
    return mask


def _grads(outputs, expected, leaves, what):
    """Each output and its expected value equal; then the gradients of a weighted sum of them equal (leaves: the
    shard and the full logits)."""
    for i, (x, e) in enumerate(zip(outputs, expected)):
        _close(x, e, f"{what} output {i}")
    weighted = [(x, e) for x, e in zip(outputs, expected) if x is not None and x.requires_grad]
    sum((x * torch.linspace(0.5, 1.5, x.numel()).reshape(x.shape)).sum() * (i + 1)
        for i, (x, _) in enumerate(weighted)).backward()  # fmt: skip
    sum((e * torch.linspace(0.5, 1.5, e.numel()).reshape(e.shape)).sum() * (i + 1)
        for i, (_, e) in enumerate(weighted)).backward()  # fmt: skip
    (zl, own), zf = leaves
    _close(zl.grad, zf.grad[..., own], what + " grad")


def _leaves(z, own):
    return z[..., own].clone().requires_grad_(), z.clone().requires_grad_()


def _check_ops(rank: int, world: int) -> None:
    group = dist.group.WORLD
    own = _slice(rank, SIZES[world])
    cases = ((torch.float32, "auto", 1.0), (torch.float32, "auto", 0.7), (torch.bfloat16, "auto", 1.0),
             (torch.float32, "torch", 0.7))  # fmt: skip
    for dtype, backend, temperature in cases:
        z, y, labels = _inputs(world, dtype)
        mask = _mask(labels)
        on = dict(temperature=temperature, backend=backend)
        for kind in DIVERGENCE_KINDS:  # divergence_and_label_logprobs: every kind, one or two rounds
            zl, zf = _leaves(z, own)
            options = dict(mask=mask, **on, **COEF.get(kind, {}))
            out = klops.divergence_and_label_logprobs(zl, y[..., own], labels, kind, vocab_group=group, **options)
            expected = klops.divergence_and_label_logprobs(zf, y, labels, kind, **options)
            assert not out[2].requires_grad
            _grads(out, expected, ((zl, own), zf), f"divergence_and_label_logprobs {kind} {dtype} {on}")
        for alone in (0, 1):  # the divergence alone, the label's log-prob alone carries a gradient
            zl, zf = _leaves(z, own)
            out = klops.divergence_and_label_logprobs(zl, y[..., own], labels, "jsd", vocab_group=group, **on)[alone]
            expected = klops.divergence_and_label_logprobs(zf, y, labels, "jsd", **on)[alone]
            _grads((out,), (expected,), ((zl, own), zf), f"output {alone} alone {dtype} {on}")

        zl, zf = _leaves(z, own)
        options = dict(labels=labels, mask=mask, **on)
        out = klops.forward_reverse_kl(zl, y[..., own], vocab_group=group, **options)
        _grads(out, klops.forward_reverse_kl(zf, y, **options), ((zl, own), zf), f"forward_reverse_kl {dtype} {on}")
        zl, zf = _leaves(z, own)  # one of the two alone
        out = klops.forward_reverse_kl(zl, y[..., own], vocab_group=group, **on)[1]
        _grads((out,), (klops.forward_reverse_kl(zf, y, **on)[1],), ((zl, own), zf), "reverse alone")

        for mu, reduction in ((0.5, "mean"), (0.2, "none"), (0.9, "sum")):
            zl, zf = _leaves(z, own)
            options = dict(labels=labels, mask=mask, mu=mu, **on)
            weights = klops.akl_weights(zl, y[..., own], vocab_group=group, **options)
            _close(weights, klops.akl_weights(zf, y, **options), f"akl_weights {mu} {dtype} {on}")
            loss = klops.akl_loss(zl, y[..., own], reduction=reduction, vocab_group=group, **options)
            expected = klops.akl_loss(zf, y, reduction=reduction, **options)
            _grads((loss,), (expected,), ((zl, own), zf), f"akl_loss {mu} {reduction} {dtype} {on}")


def _check_akl_ties(rank: int, world: int) -> None:
    """Teacher rows with ties at the boundary across shards, and a row whose argmax holds more than mu."""
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, _, labels = _inputs(world)
    y = torch.zeros(2, 4, V)
    y[0, 0, :] = torch.arange(V) % 4  # four tied groups spread over every shard
    y[0, 1, 3], y[0, 1, V - 2] = 2.0, 2.0  # two tied maxima on different shards
    y[0, 2, 7] = 9.0  # one dominant entry
    y[1] = torch.randn(4, V, generator=torch.Generator().manual_seed(5)).round()  # many ties
    z = z[:2, :4]
    for mu in (0.5, 0.3, 0.75):
        options = dict(mu=mu, labels=labels[:2, :4].clamp(min=0))
        weights = klops.akl_weights(z[..., own], y[..., own], vocab_group=group, **options)
        _close(weights, klops.akl_weights(z, y, **options), f"akl_weights ties mu={mu}")


def _topk(y, k, tail="bin"):
    """The teacher's top-k log-probs (global ids, in a shuffled order) as a TopK."""
    values, ids = torch.log_softmax(y.float(), -1).topk(k, -1)
    order = torch.randperm(k, generator=torch.Generator().manual_seed(k))
    return klops.TopK(ids[..., order], values[..., order], tail)


def _check_topk(rank: int, world: int) -> None:
    """fused_kl and divergence_and_label_logprobs with a TopK teacher: ids on every shard, a shard holding none of a
    row's ids (the row whose rank-1 slice is -inf), both tails, k = V (no tail)."""
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, labels = _inputs(world)
    mask = _mask(labels)
    cases = [(kind, "bin", 6, 1.0) for kind in DIVERGENCE_KINDS] + [
        ("forward", "renormalize", 6, 0.7), ("tv", "renormalize", 3, 1.0), ("jsd", "bin", V, 0.7),
        ("forward", "bin", V, 1.0),
    ]  # fmt: skip
    for kind, tail, k, temperature in cases:
        topk = _topk(y, k, tail)
        options = dict(labels=labels, mask=mask, temperature=temperature, **COEF.get(kind, {}))
        what = f"TopK {kind} {tail} k={k} T={temperature}"
        zl, zf = _leaves(z, own)
        loss = klops.fused_kl(zl, topk, kind, reduction="none", vocab_group=group, **options)
        expected = klops.fused_kl(zf, topk, kind, reduction="none", **options)
        _grads((loss,), (expected,), ((zl, own), zf), what)
        zl, zf = _leaves(z, own)
        options.pop("labels")
        out = klops.divergence_and_label_logprobs(zl, topk, labels, kind, vocab_group=group, **options)
        expected = klops.divergence_and_label_logprobs(zf, topk, labels, kind, **options)
        assert out[2] is None and expected[2] is None
        _grads(out[:2], expected[:2], ((zl, own), zf), what + " with labels")
        zl, zf = _leaves(z, own)  # the label's log-prob alone
        out = klops.divergence_and_label_logprobs(zl, topk, labels, kind, vocab_group=group, **options)[1]
        expected = klops.divergence_and_label_logprobs(zf, topk, labels, kind, **options)[1]
        _grads((out,), (expected,), ((zl, own), zf), what + " label log-prob alone")
    with pytest.raises(ValueError, match="infinite against a teacher that is 0 outside its top-k"):
        klops.fused_kl(z[..., own], _topk(y, 4, "renormalize"), "reverse", vocab_group=group)
    with pytest.raises(ValueError, match="TopK indices must lie in"):
        bad = _topk(y, 4)
        klops.fused_kl(z[..., own], klops.TopK(bad.indices + V, bad.logprobs), vocab_group=group)


def _check_dckd(rank: int, world: int) -> None:
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, labels = _inputs(world)
    chosen = torch.tensor([True, False, True])
    for temperature in (1.0, 2.0):
        zl, zf = _leaves(z, own)
        options = dict(temperature=temperature, w_sft=0.7, kind="jsd", beta=0.3)
        loss, metrics = klops.dckd_loss(zl, y[..., own], labels, chosen, vocab_group=group, **options)
        expected, expected_metrics = klops.dckd_loss(zf, y, labels, chosen, **options)
        for name in expected_metrics:
            _close(metrics[name], expected_metrics[name], f"dckd {name} T={temperature}")
        _grads((loss,), (expected,), ((zl, own), zf), f"dckd T={temperature}")
    zl, zf = _leaves(z, own)  # a TopK teacher (top-8 and the tail bin, as ADPA stores it)
    loss, _ = klops.dckd_loss(zl, _topk(y, 8), labels, chosen, vocab_group=group)
    _grads((loss,), (klops.dckd_loss(zf, _topk(y, 8), labels, chosen)[0],), ((zl, own), zf), "dckd TopK")


@pytest.mark.parametrize("world", [2, 3])
def test_values_and_gradients(tmp_path, world):
    _spawn(tmp_path, world, _check_ops, _check_akl_ties, _check_topk, _check_dckd)


# ----------------------------------------------------------------------------------------------------
# traffic: O(N), independent of V; errors


def _traffic(rank: int, world: int, rows: int, vocab: int) -> dict:
    group, gen = dist.group.WORLD, torch.Generator().manual_seed(rank)
    z, y = torch.randn(1, rows, vocab, generator=gen).requires_grad_(), torch.randn(1, rows, vocab, generator=gen)
    labels = torch.randint(0, vocab * world, (1, rows), generator=gen)
    full = torch.randn(1, rows, vocab * world, generator=torch.Generator().manual_seed(0))  # the same on every rank
    topk = _topk(full, 4)
    calls = {
        "divergence_and_label_logprobs forward": lambda: sum(
            x.sum() for x in klops.divergence_and_label_logprobs(z, y, labels, vocab_group=group)[:2]
        ),
        "divergence_and_label_logprobs jsd": lambda: sum(
            x.sum() for x in klops.divergence_and_label_logprobs(z, y, labels, "jsd", vocab_group=group)[:2]
        ),
        "forward_reverse_kl": lambda: sum(x.sum() for x in klops.forward_reverse_kl(z, y, vocab_group=group)),
        "akl_loss": lambda: klops.akl_loss(z, y, vocab_group=group),
        "fused_kl TopK": lambda: klops.fused_kl(z, topk, vocab_group=group),
        "divergence_and_label_logprobs TopK": lambda: sum(
            x.sum() for x in klops.divergence_and_label_logprobs(z, topk, labels, vocab_group=group)[:2]
        ),
    }
    return traffic_of(calls)


def _check_traffic(rank: int, world: int) -> None:
    small, wide, long = _traffic(rank, world, 16, 8), _traffic(rank, world, 16, 64), _traffic(rank, world, 32, 8)
    assert small == wide, "the traffic depends on V"
    per_token = {  # bytes sent per token by each rank in forward (backward: none), and the collectives after the sizes
        "divergence_and_label_logprobs forward": (28, 1),
        "divergence_and_label_logprobs jsd": (24 + 8, 2),
        "forward_reverse_kl": (24, 1),
        "akl_loss": (24 + 30 * 4 + 20, 32),
        "fused_kl TopK": (16 + 8, 2),
        "divergence_and_label_logprobs TopK": (20 + 8, 2),
    }
    for name, (forward, backward) in small.items():
        assert forward[0] == long[name][0][0] and forward[0][0] == "all_gather", (name, forward[0])  # the sizes
        for rows, calls in ((16, forward[1:]), (32, long[name][0][1:])):
            assert sum(b for _, b in calls) == rows * per_token[name][0], (name, rows, calls)
            assert len(calls) == per_token[name][1], (name, calls)
        assert backward == [] and long[name][1] == [], (name, backward)


def _check_errors(rank: int, world: int) -> None:
    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, labels = _inputs(world)
    zl, yl = z[..., own], y[..., own]
    outside = labels.clone()
    outside[0, 0] = V
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.divergence_and_label_logprobs(zl, yl, outside, vocab_group=group)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.akl_loss(zl, yl, labels=outside, vocab_group=group)
    with pytest.raises(ValueError, match="mu must lie in"):
        klops.akl_weights(zl, yl, mu=1.0, vocab_group=group)
    with pytest.raises(ValueError, match="mismatched vocabulary shards"):
        klops.forward_reverse_kl(zl, yl[..., :-1] if rank == 1 else yl, vocab_group=group)
    with pytest.raises(ValueError, match="dckd_loss: vocab_group"):
        student = (torch.randn(*labels.shape, 4), torch.randn(SIZES[world][rank], 4))
        klops.dckd_loss(student, yl, labels, torch.tensor([True, False, True]), vocab_group=group)
    with pytest.raises(ValueError, match="vocab_start needs vocab_group"):
        klops.forward_reverse_kl(zl, yl, vocab_start=0)
    # vocab_start: rank 0 holds the top of the vocabulary
    top = SIZES[world][0]
    mine = slice(top, V) if rank == 0 else slice(0, top)
    if world == 2:
        zl_, zf = _leaves(z, mine)
        out = klops.akl_loss(zl_, y[..., mine], labels=labels, vocab_group=group, vocab_start=mine.start)
        _grads((out,), (klops.akl_loss(zf, y, labels=labels),), ((zl_, mine), zf), "akl_loss vocab_start")
    _close(klops.forward_reverse_kl(zl, yl, vocab_group=group)[0], klops.forward_reverse_kl(z, y)[0], "after errors")


def _check_dtensor(rank: int, world: int) -> None:
    """Logits DTensors placed Shard(-1) on a 1-D mesh (split as torch.chunk splits), without vocab_group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    chunk = -(-V // world)
    own = slice(min(V, rank * chunk), min(V, (rank + 1) * chunk))
    z, y, labels = _inputs(world)

    def sharded(x):
        return DTensor.from_local(x, mesh, [Shard(2)], run_check=False, shape=z.shape, stride=z.stride())

    zl, zf = _leaves(z, own)
    out = klops.divergence_and_label_logprobs(sharded(zl), sharded(y[..., own]), labels, "jsd")
    assert all(type(x) is torch.Tensor for x in out)
    _grads(out, klops.divergence_and_label_logprobs(zf, y, labels, "jsd"), ((zl, own), zf), "DTensor labels")
    zl, zf = _leaves(z, own)
    out = klops.akl_loss(sharded(zl), sharded(y[..., own]), labels=labels)
    _grads((out,), (klops.akl_loss(zf, y, labels=labels),), ((zl, own), zf), "DTensor akl_loss")
    zl, zf = _leaves(z, own)
    out = klops.fused_kl(sharded(zl), _topk(y, 5), labels=labels)
    _grads((out,), (klops.fused_kl(zf, _topk(y, 5), labels=labels),), ((zl, own), zf), "DTensor TopK")


def test_traffic_errors_and_dtensors(tmp_path):
    _spawn(tmp_path, 2, _check_traffic, _check_errors, _check_dtensor)
