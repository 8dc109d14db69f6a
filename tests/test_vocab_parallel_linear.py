"""Vocabulary-parallel fused-linear ops (klops/vocab_parallel_linear.py, issue 33) against the single-process op on
the whole head.

Each test spawns a gloo group of 2 or 3 CPU processes (V = 37 in uneven shards) and runs every check in it: the
processes build the same full hidden states and heads from one seed, each takes its slice of the vocabulary (rows of
the head and bias, entries of teacher logits), and every value and gradient (hidden states, its weight and bias
shards) must equal the single-process op's on the whole head. The linear ops take fp32, bf16 and fp16 (no float64).
"""

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

V, D, DT = 37, 8, 6  # vocabulary, student and teacher hidden sizes
SIZES = {2: [20, 17], 3: [15, 10, 12]}
COEF = {kind.name: {kind.coefficient: kind.example} for kind in KINDS if kind.coefficient}


def _model(world: int, B: int = 3, L: int = 5) -> dict:
    """Full student and teacher hidden states and heads and labels, the same on every rank: an ignored label, a fully
    masked sequence, labels on every shard; ``padded``: biases -inf on all of rank 1's slice (a shard holding only
    -inf logits) and labels moved off it."""
    gen = torch.Generator().manual_seed(world)
    model = dict(
        hidden=torch.randn(B, L, D, generator=gen), weight=torch.randn(V, D, generator=gen),
        bias=torch.randn(V, generator=gen), t_hidden=torch.randn(B, L, DT, generator=gen),
        t_weight=torch.randn(V, DT, generator=gen), t_bias=torch.randn(V, generator=gen),
        labels=torch.randint(0, V, (B, L), generator=gen),
    )  # fmt: skip
    model["labels"][1, 2] = -100
    model["labels"][2] = -100  # a fully masked sequence
    padded = _slice(1, SIZES[world])
    model["pad_bias"], model["pad_t_bias"] = model["bias"].clone(), model["t_bias"].clone()
    model["pad_bias"][padded] = model["pad_t_bias"][padded] = -math.inf
    held = (model["labels"] >= padded.start) & (model["labels"] < padded.stop)
    model["pad_labels"] = torch.where(held, 0, model["labels"])
    return model


def _leaves(full: torch.Tensor, own: slice | None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's slice of the head / bias (or the whole of a replicated tensor), the full one), both leaves."""
    full = full.to(dtype)
    return (full if own is None else full[own]).clone().requires_grad_(), full.clone().requires_grad_()


def _backward(outputs) -> None:
    """Backward of a sum of the float outputs, each weighted differently (so that each gradient is checked)."""
    floats = [x for x in outputs if x is not None and x.dtype != torch.bool]
    scale = [torch.linspace(0.5, 1.5, x.numel()).reshape(x.shape) * (i + 1) for i, x in enumerate(floats)]
    sum((x * s).sum() for x, s in zip(floats, scale)).backward()


def _compare(outputs, expected, what: str) -> None:
    for i, (x, e) in enumerate(zip(outputs, expected)):
        if e is None:
            assert x is None, (what, i)
        elif e.dtype == torch.bool:
            assert torch.equal(x, e), (what, i, x, e)
        else:
            _close(x, e, f"{what} output {i}")


# ----------------------------------------------------------------------------------------------------
# values and gradients


def _check_logprobs(rank: int, world: int) -> None:
    group, own, model = dist.group.WORLD, _slice(rank, SIZES[world]), _model(world)
    cases = [
        dict(),
        dict(temperature=0.7, return_entropy=True),
        dict(softcap=3.0, logit_scale=0.5, return_entropy=True, temperature=1.3),
        dict(return_row_stats=True, temperature=0.7),
        dict(return_row_stats=True, return_entropy=True, softcap=2.0, backend="torch"),
        dict(return_entropy=True, padded=True),
        dict(return_entropy=True, temperature=0.7, dtype=torch.bfloat16),
    ]
    for options in cases:
        padded, dtype = options.pop("padded", False), options.pop("dtype", torch.float32)
        labels = model["pad_labels" if padded else "labels"]
        for with_bias in (True,) if padded else (False, True):
            (h, hf), (w, wf) = _leaves(model["hidden"], None, dtype), _leaves(model["weight"], own, dtype)
            b, bf = _leaves(model["pad_bias" if padded else "bias"], own, dtype) if with_bias else (None, None)
            out = klops.fused_linear_logprobs(h, w, labels, bias=b, vocab_group=group, **options)
            expected = klops.fused_linear_logprobs(hf, wf, labels, bias=bf, **options)
            out, expected = (out, expected) if isinstance(out, tuple) else ((out,), (expected,))
            what = f"fused_linear_logprobs {options} {dtype} bias={with_bias} padded={padded}"
            _compare(out, expected, what)
            _backward(out), _backward(expected)
            _close(h.grad, hf.grad, what + " grad_hidden"), _close(w.grad, wf.grad[own], what + " grad_weight")
            if with_bias:
                _close(b.grad, bf.grad[own], what + " grad_bias")


def _kl_cases():
    """(kind, options, teacher) for fused_linear_kl: every kind with a teacher head, with and without mask, weights,
    temperature, soft caps, logit scales; teachers as logits, log-probs and probabilities; -inf padded heads."""
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3] = False
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(1))
    for kind in DIVERGENCE_KINDS:
        coef = COEF.get(kind, {})
        yield kind, dict(reduction="none", mask=mask, **coef), "head"
        yield kind, dict(reduction="mean", weights=weights, temperature=0.7, softcap=3.0, logit_scale=0.5,
                         teacher_softcap=None, teacher_logit_scale=2.0, **coef), "head"  # fmt: skip
    for kind in ("forward", "reverse", "jsd"):
        yield kind, dict(reduction="sum", temperature=1.3, softcap=2.0, **COEF.get(kind, {})), "logits"
        yield kind, dict(reduction="mean", num_items=7, **COEF.get(kind, {})), "logprobs"
        yield kind, dict(reduction="none", mask=mask, **COEF.get(kind, {})), "probs"
        yield kind, dict(reduction="mean", **COEF.get(kind, {})), "padded"
        yield kind, dict(reduction="none", dtype=torch.bfloat16, **COEF.get(kind, {})), "head"
        yield kind, dict(reduction="sum", temperature=0.7, backend="torch", **COEF.get(kind, {})), "head"
    for kind in ("forward", "jsd", "tv", "alpha"):  # TopK teachers, k = 5 and k = V (no tail)
        yield kind, dict(reduction="none", temperature=0.7, softcap=3.0, **COEF.get(kind, {})), "topk bin"
        yield kind, dict(reduction="mean", weights=weights, **COEF.get(kind, {})), "topk renormalize"
    yield "reverse", dict(reduction="sum", mask=mask), "topk bin"
    yield "forward", dict(reduction="none", logit_scale=0.5), "topk all"


def _check_kl(rank: int, world: int) -> None:
    group, own, model = dist.group.WORLD, _slice(rank, SIZES[world]), _model(world)
    t_logits = model["t_hidden"] @ model["t_weight"].T + model["t_bias"]
    log_p = torch.log_softmax(t_logits, -1)
    teachers = {"logits": t_logits, "logprobs": log_p, "probs": log_p.exp()}
    top = log_p.topk(5, -1)
    teachers["topk bin"] = klops.TopK(top.indices, top.values)
    teachers["topk renormalize"] = klops.TopK(top.indices, top.values, tail="renormalize")
    order = torch.randperm(V, generator=torch.Generator().manual_seed(5))  # k = V, in any order
    teachers["topk all"] = klops.TopK(order.expand(*log_p.shape[:-1], V), log_p[..., order])
    for kind, options, teacher in _kl_cases():
        padded, dtype = teacher == "padded", options.pop("dtype", torch.float32)
        labels = model["pad_labels" if padded else "labels"]
        for with_bias in (True,) if padded else (False, True):
            (h, hf), (w, wf) = _leaves(model["hidden"], None, dtype), _leaves(model["weight"], own, dtype)
            b, bf = _leaves(model["pad_bias" if padded else "bias"], own, dtype) if with_bias else (None, None)
            if teacher in ("head", "padded"):
                t_bias = model["pad_t_bias" if padded else "t_bias"] if with_bias else None
                t_hidden, t_weight = model["t_hidden"].to(dtype), model["t_weight"].to(dtype)
                t_bias = None if t_bias is None else t_bias.to(dtype)
                mine = (t_hidden, t_weight[own], None if t_bias is None else t_bias[own])
                full = (t_hidden, t_weight, t_bias)
                local = dict(teacher_hidden=mine[0], teacher_weight=mine[1], teacher_bias=mine[2])
                whole = dict(teacher_hidden=full[0], teacher_weight=full[1], teacher_bias=full[2])
            elif teacher.startswith("topk"):
                local = whole = dict(teacher_hidden=teachers[teacher])
            else:
                local = dict(teacher_logits=teachers[teacher][..., own].contiguous(), target_is=teacher)
                whole = dict(teacher_logits=teachers[teacher], target_is=teacher)
            on = dict(kind=kind, labels=labels, student_bias=b, **options)
            loss = klops.fused_linear_kl(h, w, **local, vocab_group=group, **on)
            expected = klops.fused_linear_kl(hf, wf, **whole, **{**on, "student_bias": bf})
            what = f"fused_linear_kl {kind} {teacher} {options.get('reduction')} {dtype} bias={with_bias}"
            _close(loss, expected, what)
            _backward((loss,)), _backward((expected,))
            _close(h.grad, hf.grad, what + " grad_hidden"), _close(w.grad, wf.grad[own], what + " grad_weight")
            if with_bias:
                _close(b.grad, bf.grad[own], what + " grad_bias")

    # no rows at all
    h, w = torch.zeros(0, D, requires_grad=True), model["weight"][own].clone().requires_grad_()
    outputs = (
        *klops.fused_linear_logprobs(h, w, torch.zeros(0, dtype=torch.long), return_entropy=True, vocab_group=group),
        klops.fused_linear_kl(h, w, torch.zeros(0, DT), model["t_weight"][own], kind="jsd", vocab_group=group),
    )
    sum(x.sum() for x in outputs).backward()
    assert outputs[-1].item() == 0.0 and h.grad.shape == h.shape and w.grad.abs().sum() == 0


@pytest.mark.parametrize("world", [2, 3])
def test_values_and_gradients(tmp_path, world):
    """Uneven shards (20 + 17, 15 + 10 + 12); the errors and the traffic in the same group."""
    _spawn(tmp_path, world, _check_logprobs, _check_kl, _check_errors, _check_traffic)


# ----------------------------------------------------------------------------------------------------
# traffic: O(N), independent of V


def _traffic(rank: int, world: int, rows: int, vocab: int) -> dict:
    """The collectives (name, bytes sent by this rank) of each op on [1, rows] tokens over vocab entries per rank."""
    group, gen = dist.group.WORLD, torch.Generator().manual_seed(rank)
    hidden, weight = torch.randn(1, rows, D, generator=gen).requires_grad_(), torch.randn(vocab, D, generator=gen)
    weight.requires_grad_()
    t_hidden, t_weight = torch.randn(1, rows, DT, generator=gen), torch.randn(vocab, DT, generator=gen)
    t_logits = torch.randn(1, rows, vocab, generator=gen)
    labels = torch.randint(0, vocab * world, (1, rows), generator=gen)
    top = torch.log_softmax(torch.randn(1, rows, vocab * world, generator=gen), -1).topk(4, -1)
    topk = klops.TopK(top.indices, top.values)
    calls = {
        "logprobs + entropy": lambda: sum(
            klops.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, vocab_group=group)
        ).sum(),
        "logprobs row stats": lambda: klops.fused_linear_logprobs(
            hidden, weight, labels, return_row_stats=True, vocab_group=group
        )[0].sum(),
        "kl forward head": lambda: klops.fused_linear_kl(hidden, weight, t_hidden, t_weight, vocab_group=group),
        "kl reverse logits": lambda: klops.fused_linear_kl(
            hidden, weight, teacher_logits=t_logits, kind="reverse", vocab_group=group
        ),
        "kl jsd head": lambda: klops.fused_linear_kl(hidden, weight, t_hidden, t_weight, kind="jsd", vocab_group=group),
        "kl topk": lambda: klops.fused_linear_kl(hidden, weight, topk, vocab_group=group),
    }
    return traffic_of(calls)


def _check_traffic(rank: int, world: int) -> None:
    small, wide, long = _traffic(rank, world, 16, 8), _traffic(rank, world, 16, 64), _traffic(rank, world, 32, 8)
    assert small == wide, "the traffic depends on V"
    per_token = {  # bytes sent per token by each rank: forward row statistics, backward (grad_hidden fp32 [N, D])
        "logprobs + entropy": (16, 4 * D),
        "logprobs row stats": (36, 4 * D),
        "kl forward head": (20, 4 * D),
        "kl reverse logits": (20, 4 * D),
        "kl jsd head": (16 + 8, 4 * D),
        "kl topk": (4 * (2 + 4), 4 * D),  # k = 4
    }
    for name, (forward, backward) in small.items():
        long_forward, long_backward = long[name]
        sizes = forward[0]  # the shard sizes (and vocab_start): one int64 each, whatever N and V
        assert sizes == long_forward[0] and sizes[0] == "all_gather" and sizes[1] <= 40, (name, sizes)
        for rows, calls in ((16, forward[1:]), (32, long_forward[1:])):
            assert sum(b for _, b in calls) == rows * per_token[name][0], (name, rows, calls)
        for rows, calls in ((16, backward), (32, long_backward)):
            assert sum(b for _, b in calls) == rows * per_token[name][1], (name, rows, calls)
        assert len(forward) <= 3 and len(backward) == 1, (name, forward, backward)  # rounds per call


# ----------------------------------------------------------------------------------------------------
# errors: raised on every rank alike, before any row statistics are communicated


def _check_errors(rank: int, world: int) -> None:
    group, own, model = dist.group.WORLD, _slice(rank, SIZES[world]), _model(world)
    hidden, weight, labels = model["hidden"], model["weight"][own], model["labels"]
    t_hidden, t_weight = model["t_hidden"], model["t_weight"][own]
    outside = labels.clone()
    outside[0, 0] = V  # beyond every shard
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.fused_linear_logprobs(hidden, weight, outside, vocab_group=group)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 37\)"):
        klops.fused_linear_kl(hidden, weight, t_hidden, t_weight, labels=outside, vocab_group=group)
    short = t_weight[:-1] if rank == 1 else t_weight  # only rank 1's teacher shard is short: every rank raises
    with pytest.raises(ValueError, match="mismatched vocabulary shards: student_weight has .* teacher_weight has"):
        klops.fused_linear_kl(hidden, weight, t_hidden, short, vocab_group=group)
    t_logits = torch.randn(*labels.shape, weight.shape[0] - (rank == 0))
    with pytest.raises(ValueError, match="mismatched vocabulary shards: student_weight has .* teacher_logits has"):
        klops.fused_linear_kl(hidden, weight, teacher_logits=t_logits, vocab_group=group)
    topk = klops.TopK(outside.clamp(min=0)[..., None], torch.zeros(*labels.shape, 1))
    with pytest.raises(ValueError, match=r"TopK indices must lie in \[0, 37\)"):
        klops.fused_linear_kl(hidden, weight, topk, vocab_group=group)
    with pytest.raises(ValueError, match="a TopK teacher .* takes no teacher_weight"):
        klops.fused_linear_kl(hidden, weight, topk, t_weight, vocab_group=group)
    with pytest.raises(ValueError, match="target_is='logprobs' is for teacher_logits"):
        klops.fused_linear_kl(hidden, weight, t_hidden, t_weight, target_is="logprobs", vocab_group=group)
    # vocab_start: another layout, rank 0 holding the top of the vocabulary
    top = SIZES[world][0]
    mine = slice(top, V) if rank == 0 else slice(0, top) if rank == 1 else slice(0, 0)
    if world == 2:
        h, hf = _leaves(hidden, None)
        w, wf = _leaves(model["weight"], mine)
        logp = klops.fused_linear_logprobs(h, w, labels, vocab_group=group, vocab_start=mine.start)
        expected = klops.fused_linear_logprobs(hf, wf, labels)
        _close(logp, expected, "vocab_start")
        logp.sum().backward(), expected.sum().backward()
        _close(h.grad, hf.grad, "vocab_start grad_hidden"), _close(w.grad, wf.grad[mine], "vocab_start grad_weight")
        h.grad, hf.grad, w.grad, wf.grad = None, None, None, None
        loss = klops.fused_linear_kl(h, w, t_hidden, model["t_weight"][mine], kind="jsd", vocab_group=group,
                                     vocab_start=mine.start)  # fmt: skip
        expected = klops.fused_linear_kl(hf, wf, t_hidden, model["t_weight"], kind="jsd")
        _close(loss, expected, "vocab_start kl")
        loss.backward(), expected.backward()
        _close(h.grad, hf.grad, "vocab_start kl grad_hidden"), _close(w.grad, wf.grad[mine], "vocab_start kl grad")
    # after all that, the group still works: no rank is left inside a collective
    expected = klops.fused_linear_logprobs(hidden, model["weight"], labels)
    _close(klops.fused_linear_logprobs(hidden, weight, labels, vocab_group=group), expected, "after the errors")
