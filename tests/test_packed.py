"""Packed batches (klops/_packed.py): every sequence-level op on sequences laid end to end in one row, described by
position_ids or cu_seqlens, gives the values and gradients of the same sequences padded one per row."""

import pytest
import torch

import klops
from klops._packed import packing

from .conftest import DEVICE, randn

LENGTHS = (5, 2, 7)
V, D = 37, 12
TIGHT = dict(rtol=1e-5, atol=1e-6)


def layouts(gen, last: int):
    """(padded [S, L_max, last], packed [1, T, last]) leaves with the same values, and the packed descriptions."""
    padded = randn(len(LENGTHS), max(LENGTHS), last, gen=gen)
    packed = torch.cat([padded[i, :n] for i, n in enumerate(LENGTHS)])[None]
    padded, packed = padded.clone().requires_grad_(), packed.clone().requires_grad_()
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS])[None].to(DEVICE)
    cu_seqlens = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], device=DEVICE, dtype=torch.int32)
    return padded, packed, {"position_ids": position_ids, "cu_seqlens": cu_seqlens}


def token_values(gen, fill=-100, dtype=None):
    """(padded [S, L_max] with `fill` after each sequence, packed [1, T]) of random labels (or floats)."""
    if dtype is None:
        padded = torch.randint(0, V, (len(LENGTHS), max(LENGTHS)), generator=gen).to(DEVICE)
    else:
        padded = randn(len(LENGTHS), max(LENGTHS), gen=gen, dtype=dtype)
    for i, n in enumerate(LENGTHS):
        padded[i, n:] = fill
    return padded, torch.cat([padded[i, :n] for i, n in enumerate(LENGTHS)])[None]


def padded_grad_as_packed(grad):
    return torch.cat([grad[i, :n] for i, n in enumerate(LENGTHS)])[None]


@pytest.mark.parametrize("description", ["position_ids", "cu_seqlens"])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("from_hidden", [False, True])
def test_sequence_logprobs(description, average, from_hidden, gen):
    padded, packed, packs = layouts(gen, D if from_hidden else V)
    labels_padded, labels_packed = token_values(gen)
    labels_packed[0, 3] = labels_padded[0, 3] = -100  # an ignored token inside a sequence
    head = dict(weight=randn(V, D, gen=gen)) if from_hidden else {}
    want = klops.sequence_logprobs(padded, labels_padded, average=average, **head)
    got = klops.sequence_logprobs(packed, labels_packed, average=average, **head, **{description: packs[description]})
    assert got.shape == (len(LENGTHS),)
    torch.testing.assert_close(got, want, **TIGHT)
    g = torch.tensor([0.3, -1.2, 0.7], device=DEVICE)
    (want * g).sum().backward(), (got * g).sum().backward()
    torch.testing.assert_close(packed.grad, padded_grad_as_packed(padded.grad), **TIGHT)


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "gspo", "cispo"])
def test_grpo_loss(loss_type, gen):
    (logp_pad, logp_pack), (old_pad, old_pack), (ref_pad, ref_pack) = (
        token_values(gen, fill=0.0, dtype=torch.float32) for _ in range(3)
    )
    mask_pad, mask_pack = token_values(gen, fill=0, dtype=torch.float32)
    mask_pad, mask_pack = (mask_pad > -1.0).float(), (mask_pack > -1.0).float()  # some prompt tokens masked
    for i, n in enumerate(LENGTHS):
        mask_pad[i, n:] = 0
    logp_pad, logp_pack = ((-x.abs()).detach().requires_grad_() for x in (logp_pad, logp_pack))
    advantages = torch.tensor([1.0, -0.5, 0.25], device=DEVICE)
    kw = dict(loss_type=loss_type, beta=0.05, epsilon_high=0.28)
    want, want_metrics = klops.grpo_loss(logp_pad, advantages, mask_pad, old_logp=-old_pad.abs(),
                                         ref_logp=-ref_pad.abs(), **kw)  # fmt: skip
    _, packs = layouts(gen, 1)[1:]
    got, metrics = klops.grpo_loss(logp_pack, advantages, mask_pack, old_logp=-old_pack.abs(), ref_logp=-ref_pack.abs(),
                                   cu_seqlens=packs["cu_seqlens"], **kw)  # fmt: skip
    torch.testing.assert_close(got, want, **TIGHT)
    assert metrics.keys() == want_metrics.keys()
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name], value, **TIGHT)
    want.backward(), got.backward()
    torch.testing.assert_close(logp_pack.grad, padded_grad_as_packed(logp_pad.grad), **TIGHT)


def test_grpo_loss_from_logits_and_hidden(gen):
    """grpo_loss_from_logits / fused_linear_grpo_loss pass the description on: token-level ops need nothing."""
    padded, packed, packs = layouts(gen, D)
    ids_pad, ids_pack = token_values(gen, fill=0)
    mask_pad, mask_pack = (ids_pad >= 0).float(), (ids_pack >= 0).float()
    for i, n in enumerate(LENGTHS):
        mask_pad[i, n:] = 0
    weight, advantages = randn(V, D, gen=gen), torch.tensor([1.0, -0.5, 0.25], device=DEVICE)
    want, _ = klops.fused_linear_grpo_loss(padded, weight, ids_pad, advantages, mask_pad, loss_type="grpo")
    got, _ = klops.fused_linear_grpo_loss(packed, weight, ids_pack, advantages, mask_pack, loss_type="grpo",
                                          position_ids=packs["position_ids"])  # fmt: skip
    torch.testing.assert_close(got, want, **TIGHT)
    want.backward(), got.backward()
    torch.testing.assert_close(packed.grad, padded_grad_as_packed(padded.grad), **TIGHT)


@pytest.mark.parametrize("from_hidden", [False, True])
def test_tdpo_loss(from_hidden, gen):
    last = D if from_hidden else V
    (policy_pad, policy_pack, packs), (ref_pad, ref_pack, _) = layouts(gen, last), layouts(gen, last)
    labels_pad, labels_pack = token_values(gen)
    head = randn(V, D, gen=gen)

    def model(x, ref=False):
        return (x.detach() if ref else x, head) if from_hidden else (x.detach() if ref else x)

    pairs = dict(chosen_index=torch.tensor([0, 2], device=DEVICE), rejected_index=torch.tensor([1, 0], device=DEVICE))
    want, want_metrics = klops.tdpo_loss(model(policy_pad), model(ref_pad, True), labels_pad, None, **pairs)
    got, metrics = klops.tdpo_loss(model(policy_pack), model(ref_pack, True), labels_pack, None, **pairs,
                                   position_ids=packs["position_ids"])  # fmt: skip
    torch.testing.assert_close(got, want, **TIGHT)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name], value, **TIGHT)
    want.backward(), got.backward()
    torch.testing.assert_close(policy_pack.grad, padded_grad_as_packed(policy_pad.grad), **TIGHT)


def test_dckd_loss(gen):
    student_pad, student_pack, packs = layouts(gen, V)
    teacher_pad, teacher_pack, _ = layouts(gen, V)
    labels_pad, labels_pack = token_values(gen)
    chosen = torch.tensor([True, False, True], device=DEVICE)
    want, want_metrics = klops.dckd_loss(student_pad, teacher_pad.detach(), labels_pad, chosen, w_rejected=0.5)
    got, metrics = klops.dckd_loss(student_pack, teacher_pack.detach(), labels_pack, chosen, w_rejected=0.5,
                                   cu_seqlens=packs["cu_seqlens"])  # fmt: skip
    torch.testing.assert_close(got, want, **TIGHT)
    for name, value in want_metrics.items():
        torch.testing.assert_close(metrics[name], value, **TIGHT)
    want.backward(), got.backward()
    torch.testing.assert_close(student_pack.grad, padded_grad_as_packed(student_pad.grad), **TIGHT)


def test_descriptions_agree_and_bad_ones_raise(gen):
    _, packed, packs = layouts(gen, 1)
    tokens = packed[..., 0]
    a, b = packing(packs["position_ids"], None, tokens), packing(None, packs["cu_seqlens"], tokens)
    assert a.count == b.count == 3 and torch.equal(a.seq, b.seq) and a.lengths.tolist() == list(LENGTHS)
    assert packing(None, None, tokens) is None
    bad = [
        (dict(position_ids=packs["position_ids"], cu_seqlens=packs["cu_seqlens"]), "not both"),
        (dict(position_ids=packs["position_ids"] + 1), "position_ids must start at 0"),
        (dict(position_ids=torch.tensor([[0, 1, 3, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])), "count up by 1"),
        (dict(position_ids=packs["position_ids"][:, :-1]), "position_ids must have the tokens' shape"),
        (dict(cu_seqlens=torch.tensor([0, 5, 7, 13])), "end at the packed row's length T = 14"),
        (dict(cu_seqlens=torch.tensor([0, 5, 5, 14])), "must increase"),
        (dict(cu_seqlens=packs["cu_seqlens"].float()), "integer tensor"),
    ]
    for kwargs, message in bad:
        with pytest.raises((ValueError, TypeError), match=message):
            packing(kwargs.get("position_ids"), kwargs.get("cu_seqlens"), tokens)
    with pytest.raises(ValueError, match="one row"):
        packing(packs["position_ids"], None, tokens.reshape(2, 7))
    with pytest.raises(ValueError, match="chosen must be a bool tensor of shape \\(3,\\)"):
        klops.dckd_loss(randn(1, 14, V, gen=gen), randn(1, 14, V, gen=gen), torch.zeros(1, 14, dtype=torch.long),
                        torch.tensor([True]), cu_seqlens=packs["cu_seqlens"])  # fmt: skip
