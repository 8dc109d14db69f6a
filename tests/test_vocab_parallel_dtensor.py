"""Fused-linear vocabulary-parallel ops with DTensor heads (tensor parallelism, issue 33): a head placed Shard(0) on
a 1-D mesh, hidden states a DTensor on that mesh (Replicate, or Shard(1) under sequence parallelism), no
vocab_group. Values and gradients (the hidden DTensor's, the head shards') equal the single-process op on the whole
head; a head DTensor with plain hidden states (FSDP2's layout), a mismatched vocab_group or a bias placed otherwise
raise a ValueError. V = 37 splits as torch.chunk does: [19, 18] over 2 ranks, [13, 13, 11] over 3.
"""

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

import klops

from ._distributed import close as _close
from ._distributed import spawn as _spawn

V, D, DT, B, L = 37, 8, 6, 3, 5  # vocabulary, student and teacher hidden sizes, batch, sequence


def _model(world: int) -> dict:
    """Full hidden states, heads and labels, the same on every rank (an ignored label, a fully masked sequence)."""
    gen = torch.Generator().manual_seed(world)
    model = dict(
        hidden=torch.randn(B, L, D, generator=gen), weight=torch.randn(V, D, generator=gen),
        bias=torch.randn(V, generator=gen), t_hidden=torch.randn(B, L, DT, generator=gen),
        t_weight=torch.randn(V, DT, generator=gen), t_bias=torch.randn(V, generator=gen),
        t_logits=torch.randn(B, L, V, generator=gen), labels=torch.randint(0, V, (B, L), generator=gen),
    )  # fmt: skip
    model["labels"][1, 2] = -100
    model["labels"][2] = -100
    return model


def _pair(mesh, full: torch.Tensor, placement, grad: bool = True):
    """(a DTensor of ``full`` with ``placement`` on the mesh, the full tensor), both leaves."""
    sharded = distribute_tensor(full.clone(), mesh, [placement])
    return sharded.requires_grad_(grad), full.clone().requires_grad_(grad)


def _check(outputs, expected, leaves, what: str) -> None:
    """Outputs (plain tensors) equal the single-process ones; after a weighted backward, each DTensor leaf's gradient
    (gathered) equals its full counterpart's."""
    outputs = (outputs,) if torch.is_tensor(outputs) else tuple(outputs)
    expected = (expected,) if torch.is_tensor(expected) else tuple(expected)
    floats = []
    for i, (x, e) in enumerate(zip(outputs, expected)):
        if e is None:
            continue
        assert not isinstance(x, torch.distributed.tensor.DTensor), (what, i)
        if e.dtype == torch.bool:
            assert torch.equal(x, e), (what, i)
        else:
            _close(x, e, f"{what} output {i}")
            floats += [(x, e)] if e.requires_grad else []
    for k, (x, e) in enumerate(floats):
        scale = torch.linspace(0.5, 1.5, e.numel()).reshape(e.shape) * (k + 1)
        (x * scale).sum().backward(retain_graph=True)
        (e * scale).sum().backward(retain_graph=True)
    for name, (sharded, full) in leaves.items():
        assert isinstance(sharded.grad, torch.distributed.tensor.DTensor), (what, name)
        assert sharded.grad.placements == sharded.placements, (what, name, sharded.grad.placements)
        _close(sharded.grad.full_tensor(), full.grad, f"{what} grad {name}")


def _check_values_and_gradients(rank: int, world: int) -> None:
    mesh, model = DeviceMesh("cpu", list(range(world))), _model(world)
    labels = model["labels"]
    for hidden_placement in (Replicate(), Shard(1)):
        tag = f"hidden {hidden_placement}"
        hidden, weight, bias = (_pair(mesh, model["hidden"], hidden_placement), _pair(mesh, model["weight"], Shard(0)),
                                _pair(mesh, model["bias"], Shard(0)))  # fmt: skip
        options = dict(reduction="mean", label_smoothing=0.1, z_loss=1e-2, return_lse=True)
        group = dist.group.WORLD if isinstance(hidden_placement, Shard) else None  # vocab_group matching the mesh
        out = klops.fused_linear_cross_entropy(hidden[0], weight[0], labels, bias=bias[0], vocab_group=group,
                                               **options)  # fmt: skip
        ref = klops.fused_linear_cross_entropy(hidden[1], weight[1], labels, bias=bias[1], **options)
        _check(out, ref, dict(hidden=hidden, weight=weight, bias=bias), f"cross_entropy, {tag}")

        hidden, weight = _pair(mesh, model["hidden"], hidden_placement), _pair(mesh, model["weight"], Shard(0))
        out = klops.fused_linear_cross_entropy(hidden[0], weight[0], labels, reduction="none")
        ref = klops.fused_linear_cross_entropy(hidden[1], weight[1], labels, reduction="none")
        _check(out, ref, dict(hidden=hidden, weight=weight), f"cross_entropy without bias, {tag}")

        hidden, weight, bias = (_pair(mesh, model["hidden"], hidden_placement), _pair(mesh, model["weight"], Shard(0)),
                                _pair(mesh, model["bias"], Shard(0)))  # fmt: skip
        options = dict(temperature=0.7, softcap=5.0, return_entropy=True, return_row_stats=True)
        out = klops.fused_linear_logprobs(hidden[0], weight[0], labels, bias=bias[0], **options)
        ref = klops.fused_linear_logprobs(hidden[1], weight[1], labels, bias=bias[1], **options)
        _check(out, ref, dict(hidden=hidden, weight=weight, bias=bias), f"logprobs, {tag}")

        top = torch.log_softmax(model["t_logits"], -1).topk(5, -1)
        cases = (("forward", "head"), ("reverse", "head"), ("jsd", "head"), ("forward", "logits"), ("tv", "topk"))
        for kind, teacher in cases:
            hidden, weight = _pair(mesh, model["hidden"], hidden_placement), _pair(mesh, model["weight"], Shard(0))
            bias = _pair(mesh, model["bias"], Shard(0))
            if teacher == "head":
                t_hidden, t_weight, t_bias = (_pair(mesh, model["t_hidden"], Replicate(), False),
                                              _pair(mesh, model["t_weight"], Shard(0), False),
                                              _pair(mesh, model["t_bias"], Shard(0), False))  # fmt: skip
                args = [(h, w) for h, w in zip(t_hidden, t_weight)]
                extra = [dict(teacher_bias=b) for b in t_bias]
            elif teacher == "topk":  # global ids, plain tensors
                args, extra = [(klops.TopK(top.indices, top.values), None)] * 2, [{}, {}]
            else:
                t_logits = _pair(mesh, model["t_logits"], Shard(-1), False)
                args = [(None, None), (None, None)]
                extra = [dict(teacher_logits=x) for x in t_logits]
            options = dict(kind=kind, temperature=1.5, labels=labels, reduction="sum")
            out = klops.fused_linear_kl(hidden[0], weight[0], *args[0], student_bias=bias[0], **extra[0], **options)
            ref = klops.fused_linear_kl(hidden[1], weight[1], *args[1], student_bias=bias[1], **extra[1], **options)
            _check(out, ref, dict(hidden=hidden, weight=weight, bias=bias), f"kl {kind}, {teacher} teacher, {tag}")


def _check_rl(rank: int, world: int) -> None:
    """fused_linear_grpo_loss and tdpo_loss's hidden-state form with DTensor heads (the policy's hidden states
    sequence-parallel, the reference's replicated): loss, metrics and gradients as on the whole heads."""
    mesh, model = DeviceMesh("cpu", list(range(world))), _model(world)
    labels = model["labels"]
    ids, mask, advantages = labels.clamp(min=0), (labels != -100).float(), torch.linspace(-1, 1, B)
    ref_h = distribute_tensor(model["hidden"] * 0.5, mesh, [Replicate()]), model["hidden"] * 0.5
    ref_w = _pair(mesh, model["weight"].flip(0), Shard(0), False)
    for options in (dict(beta=0.1, softcap=3.0), dict(beta=0.1, kl_estimator="full", entropy_coef=0.01)):
        hidden, weight = _pair(mesh, model["hidden"], Shard(1)), _pair(mesh, model["weight"], Shard(0))
        bias = _pair(mesh, model["bias"], Shard(0))
        out, ref_out = (klops.fused_linear_grpo_loss(hidden[i], weight[i], ids, advantages, mask, bias=bias[i],
                                                     ref_hidden=ref_h[i], ref_weight=ref_w[i], **options)
                        for i in (0, 1))  # fmt: skip
        names = sorted(ref_out[1])
        _check((out[0], *(out[1][n] for n in names)), (ref_out[0], *(ref_out[1][n] for n in names)),
               dict(hidden=hidden, weight=weight, bias=bias), f"fused_linear_grpo_loss {options}")  # fmt: skip
    for placement in (Replicate(), Shard(1)):  # sequence_logprobs from hidden states and the DTensor head
        hidden, weight = _pair(mesh, model["hidden"], placement), _pair(mesh, model["weight"], Shard(0))
        out, ref_out = (klops.sequence_logprobs(hidden[i], labels, mask, weight=weight[i], average=True)
                        for i in (0, 1))  # fmt: skip
        _check(out, ref_out, dict(hidden=hidden, weight=weight), f"sequence_logprobs {placement}")
    pairs = dict(chosen_index=torch.tensor([0, 2]), rejected_index=torch.tensor([1, 0]))
    for options in (dict(variant=1, mask=None), dict(variant=2, mask=mask, temperature=0.7, softcap=3.0)):
        hidden, weight = _pair(mesh, model["hidden"], Shard(1)), _pair(mesh, model["weight"], Shard(0))
        bias = _pair(mesh, model["bias"], Shard(0))
        out, ref_out = (klops.tdpo_loss((hidden[i], weight[i], bias[i]), (ref_h[i], ref_w[i]), labels, **pairs,
                                        **options) for i in (0, 1))  # fmt: skip
        names = sorted(ref_out[1])
        _check((out[0], *(out[1][n] for n in names)), (ref_out[0], *(ref_out[1][n] for n in names)),
               dict(hidden=hidden, weight=weight, bias=bias), f"tdpo {options}")  # fmt: skip


def _check_traffic(rank: int, world: int) -> None:
    """The layout comes from the placements: klops issues only the 16-byte-per-token all-gather of the row statistics
    (no all-gather of shard sizes). The hidden states' collectives are DTensor's, as ColwiseParallel's: the all-gather
    of sequence-parallel ones in forward, and in backward the reduction of the per-rank partial grad_hidden to their
    placement (a reduce-scatter for Shard(1)), so klops issues no all-reduce of its own."""
    mesh, model = DeviceMesh("cpu", list(range(world))), _model(world)
    for placement in (Replicate(), Shard(1)):
        hidden = distribute_tensor(model["hidden"], mesh, [placement]).requires_grad_()
        weight = distribute_tensor(model["weight"], mesh, [Shard(0)]).requires_grad_()
        with klops.vocab_parallel.record_traffic() as calls:
            klops.fused_linear_cross_entropy(hidden, weight, model["labels"]).backward()
        assert calls == [("all_gather", B * L * 16)], (placement, calls)
        assert hidden.grad.placements == (placement,), hidden.grad.placements


def _check_errors(rank: int, world: int) -> None:
    mesh, model = DeviceMesh("cpu", list(range(world))), _model(world)
    labels = model["labels"]
    hidden = distribute_tensor(model["hidden"], mesh, [Replicate()])
    weight = distribute_tensor(model["weight"], mesh, [Shard(0)])
    with pytest.raises(ValueError, match=r"hidden is not.*weight.to_local\(\) with vocab_group"):
        klops.fused_linear_cross_entropy(model["hidden"], weight, labels)
    with pytest.raises(ValueError, match=r"student_hidden is not"):
        klops.fused_linear_kl(model["hidden"], weight, None, None, teacher_logits=model["t_logits"])
    with pytest.raises(ValueError, match=r"bias: a DTensor must be placed Shard\(0\)"):
        klops.fused_linear_logprobs(hidden, weight, labels, bias=distribute_tensor(model["bias"], mesh, [Replicate()]))
    with pytest.raises(ValueError, match=r"bias must be a DTensor sharded as weight is"):
        klops.fused_linear_cross_entropy(hidden, weight, labels, bias=model["bias"][: weight.to_local().shape[0]])
    with pytest.raises(ValueError, match=r"weight: a DTensor must be placed Shard\(0\)"):
        klops.fused_linear_cross_entropy(hidden, distribute_tensor(model["weight"], mesh, [Shard(1)]), labels)
    t_hidden = distribute_tensor(model["t_hidden"], mesh, [Replicate()])
    with pytest.raises(ValueError, match=r"teacher_weight must be a DTensor sharded as student_weight is"):
        klops.fused_linear_kl(hidden, weight, t_hidden, model["t_weight"][:10])
    reversed_mesh = DeviceMesh("cpu", list(reversed(range(world))))
    with pytest.raises(ValueError, match=r"hidden is a DTensor on .* give both on one mesh"):
        klops.fused_linear_logprobs(distribute_tensor(model["hidden"], reversed_mesh, [Replicate()]), weight, labels)
    other = dist.new_group([0])  # every rank takes part in new_group; rank 0 alone is in it
    with pytest.raises(ValueError, match=r"vocab_group .* does not match the mesh of weight"):
        klops.fused_linear_logprobs(hidden, weight, labels, vocab_group=other)


@pytest.mark.parametrize("world", [2, 3])
def test_dtensor_heads(tmp_path, world):
    _spawn(tmp_path, world, _check_values_and_gradients, _check_rl, _check_traffic, _check_errors)
