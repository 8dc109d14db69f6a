"""Vocabulary-parallel ops (klops/vocab_parallel.py, issue 33) against the single-process op on the gathered tensors.

Each test spawns a gloo group of 2 or 3 CPU processes (3 with V = 37 makes uneven shards) and runs many checks in it:
the processes build the same full tensors from one seed, each takes its slice of the vocabulary, and every value and
gradient must equal the single-process op's on the full tensors (its slice of the gradient).
"""

import importlib.util
import math

import pytest
import torch
import torch.distributed as dist

import klops
from klops.kernels.kinds import DIVERGENCE_KINDS, KINDS

from ._distributed import close as _close
from ._distributed import shard_slice as _slice
from ._distributed import spawn as _spawn
from ._distributed import traffic_of

V, D = 37, 8
SIZES = {2: [20, 17], 3: [15, 10, 12]}  # plain shards, uneven; DTensors split as torch.chunk does
COEF = {kind.name: {kind.coefficient: kind.example} for kind in KINDS if kind.coefficient}


def _inputs(world: int, dtype=torch.float32, B: int = 3, L: int = 5):
    """Full student / teacher logits [B, L, V] and labels [B, L], the same on every rank: -inf entries at the same
    places in both (a padded vocabulary), a row whose slice of rank 1 is all -inf, ignored rows, a fully masked
    sequence, labels on every shard."""
    gen = torch.Generator().manual_seed(world)
    z = torch.randn(B, L, V, generator=gen) * 3
    y = torch.randn(B, L, V, generator=gen) * 3
    only_inf = _slice(1, SIZES[world])
    z[0, 0, only_inf] = y[0, 0, only_inf] = -math.inf
    z[0, 1, ::5] = y[0, 1, ::5] = -math.inf
    labels = torch.randint(0, V, (B, L), generator=gen)
    labels[0, 1] = 1  # a finite entry (::5 holds 0, 5, ...)
    labels[1, 2] = -100
    labels[2] = -100  # a fully masked sequence
    return z.to(dtype), y.to(dtype), labels


# ----------------------------------------------------------------------------------------------------
# values and gradients


def _check_ops(rank: int, world: int) -> None:
    group = dist.group.WORLD
    own = _slice(rank, SIZES[world])
    # the local ops on the C++ CPU kernels ("auto" on the CPU) and on the chunked torch backend
    for dtype, backend in ((torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.float32, "torch")):
        z, y, labels = _inputs(world, dtype)
        for temperature in (1.0, 0.7):
            # logprobs + entropy
            zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
            on = dict(temperature=temperature, backend=backend)
            logp, entropy = klops.logprobs(zl, labels, return_entropy=True, vocab_group=group, **on)
            logp_f, entropy_f = klops.logprobs(zf, labels, return_entropy=True, **on)
            what = f"logprobs {dtype} {backend} T={temperature}"
            _close(logp, logp_f, what), _close(entropy, entropy_f, what + " entropy")
            (logp * 0.5 - entropy * 0.3).sum().backward()
            (logp_f * 0.5 - entropy_f * 0.3).sum().backward()
            _close(zl.grad, zf.grad[..., own], what + " grad")
            logp = klops.logprobs(zl, labels, vocab_group=group, **on)  # without the entropy
            _close(logp, logp_f, what + " alone")
            _check_row_stats(z, labels, own, on)

            # fused_kl, every kind, with a mask, weights and each reduction
            mask = torch.ones(labels.shape, dtype=torch.bool)
            mask[0, 3] = False
            weights = torch.rand(labels.shape, generator=torch.Generator().manual_seed(1))
            for kind in DIVERGENCE_KINDS:
                for reduction in ("none", "mean"):
                    zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
                    options = dict(labels=labels, mask=mask, reduction=reduction, **on,
                                   weights=weights if reduction == "mean" else None, **COEF.get(kind, {}))  # fmt: skip
                    loss = klops.fused_kl(zl, y[..., own], kind, vocab_group=group, **options)
                    expected = klops.fused_kl(zf, y, kind, **options)
                    what = f"fused_kl {kind} {reduction} {dtype} {backend} T={temperature}"
                    _close(loss, expected, what)
                    (loss * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
                    (expected * torch.linspace(0.5, 1.5, loss.numel()).reshape(loss.shape)).sum().backward()
                    _close(zl.grad, zf.grad[..., own], what + " grad")

        # teachers given as log-probs and probabilities (normalized over the whole vocabulary)
        log_p = torch.log_softmax(y.float(), -1)
        for target_is, teacher in (("logprobs", log_p), ("probs", log_p.exp())):
            for kind in ("forward", "reverse", "jsd"):
                zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
                options = dict(
                    labels=labels, target_is=target_is, reduction="sum", backend=backend, **COEF.get(kind, {})
                )
                loss = klops.fused_kl(zl, teacher[..., own], kind, vocab_group=group, **options)
                expected = klops.fused_kl(zf, teacher, kind, **options)
                _close(loss, expected, f"fused_kl {kind} {target_is} {dtype}")
                loss.backward(), expected.backward()
                _close(zl.grad, zf.grad[..., own], f"fused_kl {kind} {target_is} {dtype} grad")

    # fused_linear_cross_entropy: a head shard and its bias, replicated hidden states
    _, _, labels = _inputs(world)
    gen = torch.Generator().manual_seed(2)
    hidden, weight = torch.randn(*labels.shape, D, generator=gen), torch.randn(V, D, generator=gen)
    bias = torch.randn(V, generator=gen)
    cases = [dict(reduction="mean"), dict(reduction="sum", label_smoothing=0.1, z_loss=1e-2),
             dict(reduction="none", label_smoothing=0.2, softcap=3.0, logit_scale=0.5),
             dict(reduction="mean", return_lse=True, z_loss=1e-3), dict(reduction="sum", num_items=7),
             dict(reduction="none", label_smoothing=0.1, backend="torch")]  # fmt: skip
    for options in cases:
        for with_bias in (False, True):
            h, w, b = hidden.clone().requires_grad_(), weight[own].clone().requires_grad_(), bias[own].clone()
            hf, wf, bf = hidden.clone().requires_grad_(), weight.clone().requires_grad_(), bias.clone()
            b, bf = (b.requires_grad_(), bf.requires_grad_()) if with_bias else (None, None)
            out = klops.fused_linear_cross_entropy(h, w, labels, bias=b, vocab_group=group, **options)
            expected = klops.fused_linear_cross_entropy(hf, wf, labels, bias=bf, **options)
            what = f"fused_linear_cross_entropy {options} bias={with_bias}"
            out, expected = (out, expected) if options.get("return_lse") else ((out,), (expected,))
            for x, e in zip(out, expected):
                _close(x, e, what)
            sum(x.sum() * (i + 1) for i, x in enumerate(out)).backward()
            sum(x.sum() * (i + 1) for i, x in enumerate(expected)).backward()
            _close(h.grad, hf.grad, what + " grad_hidden"), _close(w.grad, wf.grad[own], what + " grad_weight")
            if with_bias:
                _close(b.grad, bf.grad[own], what + " grad_bias")

    # no rows at all
    empty = torch.zeros(0, SIZES[world][rank], requires_grad=True)
    no_labels = torch.zeros(0, dtype=torch.long)
    outputs = (*klops.logprobs(empty, no_labels, return_entropy=True, vocab_group=group),
               klops.fused_kl(empty, empty.detach(), "jsd", vocab_group=group))  # fmt: skip
    sum(x.sum() for x in outputs).backward()
    assert outputs[-1].item() == 0.0 and empty.grad.shape == empty.shape


# ----------------------------------------------------------------------------------------------------
# DTensor inputs: the group and the offsets from the mesh and the placement


def _check_dtensor(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    chunk = -(-V // world)  # Shard splits as torch.chunk: ceil(V / W) per rank, the last ranks fewer
    own = slice(min(V, rank * chunk), min(V, (rank + 1) * chunk))
    z, y, labels = _inputs(world)
    zl, zf = z[..., own].clone().requires_grad_(), z.clone().requires_grad_()
    zd = DTensor.from_local(zl, mesh, [Shard(2)], run_check=False, shape=z.shape, stride=z.stride())
    labels_d = distribute_tensor(labels, mesh, [Replicate()])
    for group in (None, dist.group.WORLD):
        logp, entropy = klops.logprobs(zd, labels_d, return_entropy=True, vocab_group=group)
        logp_f, entropy_f = klops.logprobs(zf, labels, return_entropy=True)
        assert type(logp) is torch.Tensor and type(entropy) is torch.Tensor  # plain, replicated
        _close(logp, logp_f, "DTensor logprobs"), _close(entropy, entropy_f, "DTensor entropy")
    (logp - entropy).sum().backward(), (logp_f - entropy_f).sum().backward()
    _close(zl.grad, zf.grad[..., own], "DTensor logprobs grad")
    zl.grad, zf.grad = None, None
    for kind in ("forward", "jsd"):
        loss = klops.fused_kl(zd, distribute_tensor(y, mesh, [Shard(-1)]), kind, labels=labels)
        expected = klops.fused_kl(zf, y, kind, labels=labels)
        _close(loss, expected, f"DTensor fused_kl {kind}")
        loss.backward(), expected.backward()
        _close(zl.grad, zf.grad[..., own], f"DTensor fused_kl {kind} grad")
        zl.grad, zf.grad = None, None
    with pytest.raises(ValueError, match="sinkhorn_distill_loss is not vocabulary-parallel"):
        klops.sinkhorn_distill_loss(zd, distribute_tensor(y, mesh, [Shard(-1)]))
    if importlib.util.find_spec("trl") is None:  # TRL needs Python 3.11
        return
    from klops.integrations import trl  # the TRL drop-in's logits functions take the sharded logits as they are

    index = labels.clamp(min=0)
    logp, entropy = trl.selective_log_softmax_and_entropy(zd, index, temperature=0.7, row_mask=labels != -100)
    logp_f, entropy_f = trl.selective_log_softmax_and_entropy(zf, index, temperature=0.7, row_mask=labels != -100)
    _close(logp, logp_f, "TRL selective_log_softmax_and_entropy"), _close(entropy, entropy_f, "TRL entropy")
    (logp - entropy).sum().backward(), (logp_f - entropy_f).sum().backward()
    _close(zl.grad, zf.grad[..., own], "TRL selective_log_softmax_and_entropy grad")
    _close(trl.entropy_from_logits(zd), trl.entropy_from_logits(zf), "TRL entropy_from_logits")
    _close(trl.selective_log_softmax(zd, index), trl.selective_log_softmax(zf, index), "TRL selective_log_softmax")


def _check_row_stats(z, labels, own, on) -> None:
    """return_row_stats: log sum q^2, the mean logit and is_top1, with labels that are the argmax, and a tie across
    shards whose first entry is not the label."""
    labels = labels.clone()
    labels[1] = torch.where(labels[1] == -100, -100, z[1].argmax(-1))
    z = z.clone()
    z[1, 0, V - 1] = z[1, 0, labels[1, 0]]  # the same logit on the last shard: the label is still first
    z[1, 1, 0] = z[1, 1, labels[1, 1]]  # the same logit on the first shard: the label is not
    for return_entropy in (False, True):
        outputs = klops.logprobs(z[..., own], labels, return_row_stats=True, return_entropy=return_entropy,
                                 vocab_group=dist.group.WORLD, **on)  # fmt: skip
        expected = klops.logprobs(z, labels, return_row_stats=True, return_entropy=return_entropy, **on)
        assert expected.is_top1[1].any() and not expected.is_top1[1, 1]
        for name, x, e in zip(expected._fields, outputs, expected):
            if e is None:
                assert x is None, name
            elif e.dtype == torch.bool:
                assert torch.equal(x, e), (name, x, e)
            else:
                _close(x, e, f"row stats {name} {z.dtype} {on}")


@pytest.mark.parametrize("world", [2, 3])
def test_values_and_gradients(tmp_path, world):
    """Plain shards and DTensors (split as torch.chunk splits: 19 + 18, 13 + 13 + 11)."""
    _spawn(tmp_path, world, _check_ops, _check_dtensor)


# ----------------------------------------------------------------------------------------------------
# traffic: O(N), independent of V


def _traffic(rank: int, world: int, rows: int, vocab: int) -> dict:
    """The collectives (name, bytes sent by this rank) of each op on [1, rows] tokens over vocab entries per rank."""
    group, gen = dist.group.WORLD, torch.Generator().manual_seed(rank)
    z, y = torch.randn(1, rows, vocab, generator=gen).requires_grad_(), torch.randn(1, rows, vocab, generator=gen)
    labels = torch.randint(0, vocab * world, (1, rows), generator=gen)
    hidden, weight = torch.randn(1, rows, D).requires_grad_(), torch.randn(vocab, D).requires_grad_()
    calls = {
        "logprobs + entropy": lambda: sum(klops.logprobs(z, labels, return_entropy=True, vocab_group=group)).sum(),
        "logprobs row stats": lambda: klops.logprobs(z, labels, return_row_stats=True, vocab_group=group)[0].sum(),
        "fused_kl forward": lambda: klops.fused_kl(z, y, "forward", vocab_group=group),
        "fused_kl reverse": lambda: klops.fused_kl(z, y, "reverse", vocab_group=group),
        "fused_kl jsd": lambda: klops.fused_kl(z, y, "jsd", vocab_group=group),
        "fused_linear_cross_entropy": lambda: klops.fused_linear_cross_entropy(
            hidden, weight, labels, label_smoothing=0.1, vocab_group=group
        ),
    }
    return traffic_of(calls)


def _check_traffic(rank: int, world: int) -> None:
    small, wide, long = _traffic(rank, world, 16, 8), _traffic(rank, world, 16, 64), _traffic(rank, world, 32, 8)
    assert small == wide, "the traffic depends on V"
    per_token = {  # bytes sent per token by each rank: forward row statistics, backward
        "logprobs + entropy": (16, 0),
        "logprobs row stats": (36, 0),
        "fused_kl forward": (20, 0),
        "fused_kl reverse": (20, 0),
        "fused_kl jsd": (16 + 8, 0),
        "fused_linear_cross_entropy": (16, 4 * D),  # grad_hidden [N, D] fp32, all-reduced
    }
    for name, (forward, backward) in small.items():
        long_forward, long_backward = long[name]
        sizes = forward[0]  # the shard sizes and vocab_start: one int64 each, whatever N and V
        assert sizes == long_forward[0] and sizes[0] == "all_gather" and sizes[1] in (16, 24), (name, sizes)
        for rows, calls in ((16, forward[1:]), (32, long_forward[1:])):
            assert sum(b for _, b in calls) == rows * per_token[name][0], (name, rows, calls)
        for rows, calls in ((16, backward), (32, long_backward)):
            assert sum(b for _, b in calls) == rows * per_token[name][1], (name, rows, calls)
        assert len(forward) <= 3 and len(backward) <= 1, (name, forward, backward)  # rounds per call


# ----------------------------------------------------------------------------------------------------
# errors: raised on every rank alike, before any row statistics are communicated


def _check_errors(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    group, own = dist.group.WORLD, _slice(rank, SIZES[world])
    z, y, labels = _inputs(world)
    zl, yl = z[..., own], y[..., own]
    outside = labels.clone()
    outside[0, 0] = V  # beyond every shard
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.logprobs(zl, outside, vocab_group=group)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.fused_kl(zl, yl, labels=outside, vocab_group=group)
    weight = torch.randn(V, D)[own]
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.fused_linear_cross_entropy(torch.randn(*labels.shape, D), weight, outside, vocab_group=group)
    teacher = yl[..., :-1] if rank == 1 else yl  # only rank 1's teacher shard is short: every rank raises
    with pytest.raises(ValueError, match="mismatched vocabulary shards"):
        klops.fused_kl(zl, teacher, vocab_group=group)
    with pytest.raises(ValueError, match="sinkhorn_distill_loss is not vocabulary-parallel"):
        klops.sinkhorn_distill_loss(zl, yl, vocab_group=group)
    with pytest.raises(ValueError, match="vocab_start needs vocab_group"):
        klops.logprobs(zl, labels, vocab_start=0)
    # vocab_start: another layout, rank 0 holding the top of the vocabulary; shards that do not tile it raise
    top = SIZES[world][0]
    mine = slice(top, V) if rank == 0 else slice(0, top)
    zl_, zf = z[..., mine].clone().requires_grad_(), z.clone().requires_grad_()
    loss = klops.fused_kl(zl_, y[..., mine], "jsd", labels=labels, vocab_group=group, vocab_start=mine.start)
    expected = klops.fused_kl(zf, y, "jsd", labels=labels)
    loss.backward(), expected.backward()
    _close(loss, expected, "vocab_start"), _close(zl_.grad, zf.grad[..., mine], "vocab_start grad")
    _close(klops.logprobs(zl_, labels, vocab_group=group, vocab_start=mine.start), klops.logprobs(z, labels), "start")
    with pytest.raises(ValueError, match="must tile the vocabulary"):
        klops.logprobs(z[..., :top], labels, vocab_group=group, vocab_start=0)  # both hold the bottom
    with pytest.raises(ValueError, match="every rank gives vocab_start, or none"):
        klops.logprobs(zl, labels, vocab_group=group, vocab_start=0 if rank == 0 else None)
    mesh = init_device_mesh("cpu", (world,))
    zd = DTensor.from_local(zl, mesh, [Shard(2)], run_check=False)
    other = dist.new_group([0])  # rank 1 is not in it
    with pytest.raises(ValueError, match="does not match the mesh"):
        klops.logprobs(zd, labels, vocab_group=other)
    # after all that, the group still works: no rank is left inside a collective
    _close(klops.logprobs(zl, labels, vocab_group=group), klops.logprobs(z, labels), "after the errors")


# ----------------------------------------------------------------------------------------------------
# data parallel: num_items


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(V, D, generator=torch.Generator().manual_seed(3)))

    def forward(self, hidden, labels, num_items):
        return klops.fused_linear_cross_entropy(hidden, self.weight, labels, num_items=num_items)


def _check_num_items(rank: int, world: int) -> None:
    gen = torch.Generator().manual_seed(4)
    hidden, labels = torch.randn(4, 6, D, generator=gen), torch.randint(0, V, (4, 6), generator=gen)
    labels[0, :5] = -100  # rank 0 has fewer valid tokens than rank 1
    mine = slice(rank * 2, rank * 2 + 2)
    count = klops.distributed.num_items(labels[mine])
    assert count.item() == (labels != -100).sum().item()
    assert klops.distributed.num_items(labels[mine] != -100).item() == count.item()  # a mask counts alike
    model = torch.nn.parallel.DistributedDataParallel(_Head())
    (model(hidden[mine], labels[mine], count) * world).backward()  # DDP averages: times W
    single = _Head()
    klops.fused_linear_cross_entropy(hidden, single.weight, labels).backward()
    _close(model.module.weight.grad, single.weight.grad, "DDP with num_items")


def test_traffic_errors_and_num_items(tmp_path):
    """The traffic of each op is O(N); the errors; DDP with num_items (one group for the three)."""
    _spawn(tmp_path, 2, _check_traffic, _check_errors, _check_num_items)


# ----------------------------------------------------------------------------------------------------
# the compiled path: DTensor inputs carry the layout, so nothing reaches the host and the functional collectives trace.
# aot_eager, as tests/test_compile.py: dynamo and AOT autograd see the whole graph, forward and backward; Inductor
# compiles the same graph (checked by hand: equal values and gradients) but takes 45 s of the 2 cores here.


def _check_compiled(rank: int, world: int) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard

    mesh = init_device_mesh("cpu", (world,))
    chunk = -(-V // world)
    own = slice(min(V, rank * chunk), min(V, (rank + 1) * chunk))
    z, y, labels = _inputs(world)

    def loss(zl, yl, labels):
        zd, yd = (DTensor.from_local(x, mesh, [Shard(2)], run_check=False, shape=z.shape, stride=z.stride())
                  for x in (zl, yl))  # fmt: skip
        logp, entropy = klops.logprobs(zd, labels, return_entropy=True, temperature=0.7)
        kl = klops.fused_kl(zd, yd, "forward", labels=labels) + klops.fused_kl(zd, yd, "jsd", labels=labels)
        return (logp - 0.1 * entropy).sum() + kl

    zl = z[..., own].clone().requires_grad_()
    expected = loss(zl, y[..., own], labels)
    expected.backward()
    expected_grad, zl.grad = zl.grad, None
    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")(zl, y[..., own], labels)
    compiled.backward()
    _close(compiled, expected, "compiled"), _close(zl.grad, expected_grad, "compiled grad")


def test_compiled_fullgraph(tmp_path):
    _spawn(tmp_path, 2, _check_compiled)
