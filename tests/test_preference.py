"""dpo_loss, sequence_logprobs and tdpo_loss against float64 references written from docs/losses.md §4, values and
gradients, on every backend usable here."""

import pytest
import torch

import klops
from klops.reference import dpo_loss_reference, logprobs_reference, tdpo_loss_reference

from .conftest import DEVICE, GRAD_TOL, LOSS_TOL, assert_close, randn

TOL = LOSS_TOL[torch.float32]
GTOL = GRAD_TOL[torch.float32]


def leaf(x):
    return x.detach().clone().requires_grad_()


@pytest.mark.parametrize("divergence", klops.preference.DPO_DIVERGENCES)
@pytest.mark.parametrize("loss_type", klops.preference.DPO_LOSS_TYPES)
def test_dpo_matches_reference(loss_type, divergence, gen):
    inputs = [randn(12, gen=gen, scale=3.0) - 20 for _ in range(4)]
    kw = dict(beta=0.2, loss_type=loss_type, divergence=divergence, alpha=0.3)
    if loss_type == "sigmoid":
        kw["label_smoothing"] = 0.1
    got = [leaf(x) for x in inputs]
    want = [leaf(x.double()) for x in inputs]
    loss, metrics = klops.dpo_loss(*got, **kw)
    ref = dpo_loss_reference(*want, **kw)
    loss.backward(), ref.backward()
    assert_close(loss, ref, TOL, "loss")
    for name, g, w in zip(("policy_chosen", "policy_rejected"), got, want):
        assert_close(g.grad, w.grad, GTOL, f"grad {name}")
    chosen = 0.2 * (inputs[0] - inputs[2])
    rejected = 0.2 * (inputs[1] - inputs[3])
    assert_close(metrics["rewards/margins"], (chosen - rejected).mean(), TOL, "margins")
    assert_close(metrics["rewards/accuracies"], (chosen > rejected).double().mean(), (1e-7, 0), "accuracy")


def test_dpo_alpha_exponent_is_clamped(gen):
    """A huge log-ratio with the alpha score stays finite (the exponent is clamped, as TRL does)."""
    big = torch.full((3,), 500.0, device=DEVICE)
    zero = torch.zeros(3, device=DEVICE)
    loss, _ = klops.dpo_loss(leaf(big), zero, zero, zero, divergence="alpha", alpha=2.0)
    assert torch.isfinite(loss)


def test_dpo_bad_input(gen):
    x = randn(4, gen=gen)
    cases = [
        (lambda: klops.dpo_loss(x, x, x, x[:3]), ValueError, "ref_rejected_logp must have the shape"),
        (lambda: klops.dpo_loss(x, x, x, x, beta=0.0), ValueError, "beta"),
        (lambda: klops.dpo_loss(x, x, x, x, loss_type="kto"), ValueError, "loss_type must be one of"),
        (lambda: klops.dpo_loss(x, x, x, x, divergence="tv"), ValueError, "divergence must be one of"),
        (lambda: klops.dpo_loss(x, x, x, x, loss_type="ipo", label_smoothing=0.1), ValueError, "sigmoid"),
        (lambda: klops.dpo_loss(x, x, x, x, label_smoothing=0.5), ValueError, "label_smoothing"),
        (lambda: klops.dpo_loss(x[None], x[None], x[None], x[None]), ValueError, r"shape \[P\]"),
        (lambda: klops.dpo_loss(x.long(), x, x, x), TypeError, "float tensor"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def batch(gen, B=4, L=6, V=53, D=None):
    """Policy and reference logits (or hidden states and heads), labels with prompt tokens ignored, a mask
    that drops one whole sequence, and the chosen / rejected pairing (0, 1) and (2, 3)."""
    labels = torch.randint(0, V, (B, L), generator=gen).to(DEVICE)
    labels[:, :2] = -100
    mask = torch.ones(B, L, device=DEVICE)
    mask[3] = 0  # an all-masked rejected sequence
    chosen, rejected = torch.tensor([0, 2], device=DEVICE), torch.tensor([1, 3], device=DEVICE)
    if D is None:
        return randn(B, L, V, gen=gen, scale=2.0), randn(B, L, V, gen=gen, scale=2.0), labels, mask, chosen, rejected
    heads = [randn(V, D, gen=gen, scale=0.4) for _ in range(2)]
    return (randn(B, L, D, gen=gen), heads[0]), (randn(B, L, D, gen=gen), heads[1]), labels, mask, chosen, rejected


@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs(average, backend, gen):
    z, _, labels, mask, *_ = batch(gen)
    got = leaf(z)
    seq = klops.sequence_logprobs(got, labels, mask, average=average, temperature=0.8, backend=backend)
    want = leaf(z)
    logp, _ = logprobs_reference(want, labels, temperature=0.8)
    keep = ((labels != -100) & (mask != 0)).double()
    ref = (logp * keep).sum(-1) / (keep.sum(-1).clamp(min=1) if average else 1)
    (seq * torch.arange(1, 5, device=DEVICE)).sum().backward()
    (ref * torch.arange(1, 5, device=DEVICE)).sum().backward()
    assert seq[3] == 0
    assert_close(seq, ref, TOL, "sequence log-probs")
    assert_close(got.grad, want.grad, GTOL, "grad")


def test_sequence_logprobs_from_hidden(backend, gen):
    (hidden, weight), _, labels, mask, *_ = batch(gen, D=16)
    h, w = leaf(hidden), leaf(weight)
    seq = klops.sequence_logprobs(h, labels, mask, weight=w, backend=backend)
    h_ref, w_ref = leaf(hidden.double()), leaf(weight.double())
    logp, _ = logprobs_reference(h_ref @ w_ref.T, labels)
    ref = (logp * ((labels != -100) & (mask != 0))).sum(-1)
    seq.sum().backward(), ref.sum().backward()
    assert_close(seq, ref, TOL, "sequence log-probs")
    assert_close(h.grad, h_ref.grad, GTOL, "grad hidden")
    assert_close(w.grad, w_ref.grad, GTOL, "grad weight")


@pytest.mark.parametrize("variant", [1, 2])
def test_tdpo_matches_reference(variant, backend, gen):
    policy, ref_logits, labels, mask, chosen, rejected = batch(gen)
    kw = dict(beta=0.5, alpha=0.7, variant=variant, temperature=1.3)
    got = leaf(policy)
    loss, metrics = klops.tdpo_loss(got, ref_logits, labels, mask, chosen, rejected, backend=backend, **kw)
    want = leaf(policy.double())
    ref = tdpo_loss_reference(want, ref_logits, labels, mask, chosen, rejected, **kw)
    loss.backward(), ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(got.grad, want.grad, GTOL, "grad")
    assert metrics["kl/chosen"] > 0 and set(metrics) >= {"rewards/chosen", "rewards/accuracies"}


def test_tdpo_from_hidden(backend, gen):
    (hidden, weight), (ref_hidden, ref_weight), labels, mask, chosen, rejected = batch(gen, D=12)
    h, w = leaf(hidden), leaf(weight)
    loss, _ = klops.tdpo_loss((h, w), (ref_hidden, ref_weight), labels, mask, chosen, rejected, backend=backend)
    h_ref, w_ref = leaf(hidden.double()), leaf(weight.double())
    ref = tdpo_loss_reference(h_ref @ w_ref.T, ref_hidden.double() @ ref_weight.double().T, labels, mask, chosen,
                              rejected)  # fmt: skip
    loss.backward(), ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(h.grad, h_ref.grad, GTOL, "grad hidden")
    assert_close(w.grad, w_ref.grad, GTOL, "grad weight")


def test_tdpo_compile_fullgraph(gen):
    policy, ref_logits, labels, mask, chosen, rejected = batch(gen)

    def step(z):
        loss, metrics = klops.tdpo_loss(z, ref_logits, labels, mask, chosen, rejected, backend="torch")
        return loss, metrics["rewards/margins"]

    got = leaf(policy)
    loss, _ = torch.compile(step, fullgraph=True)(got)
    loss.backward()
    want = leaf(policy.double())
    ref = tdpo_loss_reference(want, ref_logits, labels, mask, chosen, rejected)
    ref.backward()
    assert_close(loss, ref, TOL, "compiled loss")
    assert_close(got.grad, want.grad, GTOL, "compiled grad")


def test_tdpo_bad_input(gen):
    policy, ref_logits, labels, mask, chosen, rejected = batch(gen)
    cases = [
        (lambda: klops.tdpo_loss(policy, ref_logits, labels, mask, chosen, rejected, variant=3), "variant"),
        (lambda: klops.tdpo_loss(policy, ref_logits, labels, mask, chosen, rejected[:1]), "pair up"),
        (lambda: klops.tdpo_loss(policy, ref_logits, labels, mask, chosen, rejected + 4), r"lie in \[0, 4\)"),
        (lambda: klops.tdpo_loss(policy, ref_logits, labels, mask, chosen, rejected, beta=-1.0), "beta"),
        (lambda: klops.tdpo_loss(policy, (policy, policy), labels, mask, chosen, rejected), "both as logits"),
    ]
    for call, message in cases:
        with pytest.raises((ValueError, TypeError), match=message):
            call()


def test_scaled_and_capped_heads_equal_their_logits(gen):
    """sequence_logprobs and tdpo_loss from (hidden, weight, bias) with softcap and logit_scale equal the same ops on
    the logits softcap(c (h W^T + b)) formed in full; without the scale they differ."""
    cap, scale = 3.0, 0.37
    hidden, ref_hidden = randn(4, 6, 16, gen=gen), randn(4, 6, 16, gen=gen)
    weight, bias = randn(29, 16, gen=gen), randn(29, gen=gen)
    labels = torch.randint(0, 29, (4, 6), generator=gen).to(DEVICE)
    labels[:, :2] = -100

    def logits(h):
        z = scale * torch.nn.functional.linear(h, weight, bias)
        return cap * torch.tanh(z / cap)

    head = dict(softcap=cap, logit_scale=scale)
    got = klops.sequence_logprobs(hidden, labels, weight=weight, bias=bias, **head)
    torch.testing.assert_close(got, klops.sequence_logprobs(logits(hidden), labels), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got, klops.sequence_logprobs(hidden, labels, weight=weight, bias=bias, softcap=cap))
    pairs = dict(chosen_index=torch.tensor([0, 2], device=DEVICE), rejected_index=torch.tensor([1, 3], device=DEVICE))
    h = hidden.clone().requires_grad_()
    loss, _ = klops.tdpo_loss((h, weight, bias), (ref_hidden, weight, bias), labels, None, **pairs, **head)
    h_ref = hidden.clone().requires_grad_()
    want, _ = klops.tdpo_loss(logits(h_ref), logits(ref_hidden), labels, None, **pairs)
    loss.backward(), want.backward()
    torch.testing.assert_close(loss, want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(h.grad, h_ref.grad, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="softcap and logit_scale apply to models given as"):
        klops.tdpo_loss(logits(hidden), logits(ref_hidden), labels, None, **pairs, logit_scale=2.0)
