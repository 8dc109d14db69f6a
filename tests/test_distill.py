"""klops/distill.py against float64 references (docs/losses.md §6): akl_weights and akl_loss (AKL, Wu et al. 2024;
the authors' sort-based ratios, and the weighted forward + reverse KL through autograd), forward_reverse_kl, dckd_loss
and kdrl_loss."""

import math

import pytest
import torch

import klops
from klops.reference import (
    akl_weights_reference,
    dckd_loss_reference,
    fused_kl_reference,
    grpo_loss_reference,
    logprobs_reference,
)

from .conftest import DEVICE, GRAD_TOL, LOSS_TOL, assert_close, backends_of, randn
from .test_preference import GTOL, TOL, batch, leaf

AKL_BACKENDS = backends_of("kl_pair")  # the weights have Triton and torch kernels


def authors_ratio(student_logits, teacher_logits, mu, temperature):
    """The authors' get_ratio in float64 (a sort; the boundary entry in the tail), for rows without ties."""
    p = torch.softmax(teacher_logits.double() / temperature, dim=-1)
    q = torch.softmax(student_logits.double() / temperature, dim=-1)
    p_sorted, order = p.sort(dim=-1, descending=True)
    errors = (p_sorted - q.gather(-1, order)).abs()
    tail = p_sorted.cumsum(-1) > mu
    tail[..., 0] = False
    s1, s2 = (errors * ~tail).sum(-1), (errors * tail).sum(-1)
    return s1 / (s1 + s2)


def teacher_rows(V, gen, dtype=torch.float32):
    """Teacher logits with the rows AKL treats specially: spread, flat, one token past mu, equal to the student."""
    teacher = randn(6, V, gen=gen, scale=3.0, dtype=torch.float32)
    teacher[1] = randn(V, gen=gen, scale=0.01)
    teacher[2, 5] = 40.0
    teacher[4, 3:9] = -math.inf
    return teacher.to(dtype)


@pytest.mark.parametrize("backend", AKL_BACKENDS)
@pytest.mark.parametrize("V", [7, 300, 1500])  # 1500: three blocks of 512 and a partial one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature, mu", [(1.0, 0.5), (0.7, 0.3)])
def test_weights_match_the_sorted_reference(backend, V, dtype, temperature, mu, gen):
    teacher = teacher_rows(V, gen, dtype)
    student = randn(6, V, gen=gen, scale=2.0, dtype=dtype)
    student[3] = teacher[3]
    got = klops.akl_weights(student, teacher, mu=mu, temperature=temperature, backend=backend)
    expected = akl_weights_reference(student, teacher, mu=mu, temperature=temperature)
    assert_close(got, expected, (1e-5, 1e-6), "w")
    assert float(got[3]) == 0.5, "p = q: both gaps are 0"
    if dtype == torch.float32:  # no ties: the authors' sort gives the same split
        rows = [0, 1, 2, 4, 5]
        assert_close(got[rows], authors_ratio(student[rows], teacher[rows], mu, temperature), (1e-5, 1e-6), "authors")


@pytest.mark.parametrize("backend", AKL_BACKENDS)
def test_boundary_entry_belongs_to_the_tail(backend):
    """Teacher p = (0.3, 0.15, 0.1, ...): the running sums 0.3, 0.45, 0.55 put the first two entries in the head
    at mu = 0.5 and the one that crosses it in the tail; a uniform student makes the gaps plain numbers."""
    V = 10
    p = torch.tensor([0.3, 0.15, 0.1] + [0.45 / 7] * 7, dtype=torch.float64)
    teacher = torch.log(p)[torch.tensor([4, 0, 7, 1, 2, 3, 5, 6, 8, 9])].float().to(DEVICE)[None]  # shuffled
    sorted_p = p.sort(descending=True).values
    head = (sorted_p[:2] - 1 / V).abs().sum()
    expected = head / (sorted_p - 1 / V).abs().sum()
    got = klops.akl_weights(torch.zeros(1, V, device=DEVICE), teacher, mu=0.5, backend=backend)
    assert_close(got, expected[None], (1e-6, 0), "w")


@pytest.mark.parametrize("backend", AKL_BACKENDS)
def test_ties_at_the_boundary_are_averaged(backend):
    """p = (0.2, 0.1, 0.1, 0.1, 0.1, rest): at mu = 0.45 the boundary falls inside the four tied entries, of
    which floor((0.45 - 0.2) / 0.1) = 2 fit under mu: half of the tie group's gap counts in the head, whatever
    order a sort would give them."""
    p = torch.tensor([0.2] + [0.1] * 4 + [0.4 / 7] * 7, dtype=torch.float64)
    q = torch.tensor([0.05] + [0.01, 0.3, 0.1, 0.04] + [0.5 / 7] * 7, dtype=torch.float64)
    gap = (p - q).abs()
    expected = (gap[0] + 0.5 * gap[1:5].sum()) / gap.sum()
    got = klops.akl_weights(torch.log(q).float().to(DEVICE)[None], torch.log(p).float().to(DEVICE)[None], mu=0.45,
                            backend=backend)  # fmt: skip
    assert_close(got, expected[None], (1e-6, 0), "w")


@pytest.mark.parametrize("backend", AKL_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loss_matches_weighted_forward_and_reverse(backend, dtype, gen):
    """AKL from sliced [B, L, V] logits (``logits[:, :-1]``) with ignored labels, against the float64 loss with the
    reference weights held constant."""
    V = 700
    student_full, teacher_full = randn(2, 6, V, gen=gen, scale=2.0, dtype=dtype), randn(2, 6, V, gen=gen, scale=2.0)
    student, teacher = student_full[:, :-1], teacher_full[:, :-1].to(dtype)
    labels = torch.randint(0, V, (2, 5), generator=gen).to(DEVICE)
    labels[0, :2] = -100
    leaf = student.detach().clone().requires_grad_()
    loss = klops.akl_loss(leaf, teacher, temperature=1.3, labels=labels, backend=backend)
    loss.backward()
    ref_leaf = student.detach().double().requires_grad_()
    w = akl_weights_reference(student, teacher, temperature=1.3)
    expected = fused_kl_reference(ref_leaf, teacher, "forward", temperature=1.3, labels=labels, weights=w)
    expected = expected + fused_kl_reference(ref_leaf, teacher, "reverse", temperature=1.3, labels=labels,
                                             weights=1 - w)  # fmt: skip
    expected.backward()
    assert_close(loss, expected.detach(), LOSS_TOL[dtype], "loss")
    assert_close(leaf.grad, ref_leaf.grad, GRAD_TOL[dtype], "grad")
    assert float(leaf.grad[0, :2].abs().sum()) == 0.0


@pytest.mark.parametrize("backend", AKL_BACKENDS)
@pytest.mark.parametrize("V", [7, 1500])  # 1500: the forward's 512-wide blocks and a partial one
@pytest.mark.parametrize("reduction, num_items", [("none", None), ("sum", 4)])
def test_loss_rows_padded_vocabulary(backend, V, reduction, num_items, gen):
    """The fused op per row, w KL(p || q) + (1 - w) KL(q || p), with the rows AKL treats specially (a flat
    teacher, one token past mu, p = q) and a padded vocabulary (-inf in both models' logits), against float64."""
    teacher = teacher_rows(V, gen)
    student = randn(6, V, gen=gen, scale=2.0)
    student[3] = teacher[3]
    student[4, 3:9] = -math.inf
    leaf = student.clone().requires_grad_()
    loss = klops.akl_loss(leaf, teacher, temperature=0.8, reduction=reduction, num_items=num_items, backend=backend)
    upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (loss * upstream).sum().backward()
    ref_leaf = student.double().requires_grad_()
    w = akl_weights_reference(student, teacher, temperature=0.8)
    options = dict(temperature=0.8, reduction=reduction, num_items=num_items)
    expected = fused_kl_reference(ref_leaf, teacher, "forward", weights=w, **options) + fused_kl_reference(
        ref_leaf, teacher, "reverse", weights=1 - w, **options
    )
    (expected * upstream).sum().backward()
    assert_close(loss, expected.detach(), LOSS_TOL[torch.float32], "loss")
    assert_close(leaf.grad, ref_leaf.grad, GRAD_TOL[torch.float32], "grad")
    assert float(leaf.grad[4, 3:9].abs().sum()) == 0.0 and float(leaf.grad[3].abs().max()) < 1e-6


@pytest.mark.parametrize("backend", AKL_BACKENDS)
@pytest.mark.parametrize("V", [7, 1500, 5000])  # 5000: the forward's 1024-wide blocks and the backward's 2048
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_forward_reverse_kl(backend, V, dtype, gen):
    """Both KLs per token from one op, against float64, on sliced [B, L, V] logits with ignored labels, a padded
    vocabulary (-inf in both models) and p = q tokens; each output gets its own upstream gradient, so a mix-up of
    the two gradient terms fails."""
    student_full, teacher_full = randn(2, 5, V, gen=gen, scale=2.0), randn(2, 5, V, gen=gen, scale=2.0)
    student_full[1, :, -3:] = teacher_full[1, :, -3:] = -math.inf
    student_full[0, 1] = teacher_full[0, 1]
    student, teacher = student_full[:, :-1].to(dtype), teacher_full[:, :-1].to(dtype)
    labels = torch.randint(0, V - 3, (2, 4), generator=gen).to(DEVICE)
    labels[0, 0] = -100
    leaf = student.detach().clone().requires_grad_()
    kl_forward, kl_reverse = klops.forward_reverse_kl(leaf, teacher, temperature=0.9, labels=labels, backend=backend)
    g_f, g_r = (torch.rand(2, 4, generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    ((kl_forward * g_f).sum() + (kl_reverse * g_r).sum()).backward()
    ref_leaf = student.detach().double().requires_grad_()
    options = dict(temperature=0.9, labels=labels, reduction="none")
    expected_f = fused_kl_reference(ref_leaf, teacher, "forward", **options)
    expected_r = fused_kl_reference(ref_leaf, teacher, "reverse", **options)
    ((expected_f * g_f).sum() + (expected_r * g_r).sum()).backward()
    assert_close(kl_forward, expected_f.detach(), LOSS_TOL[dtype], "KL(p||q)")
    assert_close(kl_reverse, expected_r.detach(), LOSS_TOL[dtype], "KL(q||p)")
    assert_close(leaf.grad, ref_leaf.grad, GRAD_TOL[dtype], "grad")
    assert float(kl_forward[0, 0]) == 0.0 and float(leaf.grad[0, 0].abs().sum()) == 0.0
    assert float(leaf.grad[1, :, -3:].abs().sum()) == 0.0


@pytest.mark.parametrize("backend", AKL_BACKENDS)
@pytest.mark.parametrize("dtype, temperature, scale", [(torch.float16, 0.25, 2.0), (torch.float32, 20.0, 1e4)])
def test_akl_loss_vocabulary_views_and_extremes(backend, dtype, temperature, scale, gen):
    """AKL on row views narrower than their rows (``logits[..., :V]``: row stride V + 5), in fp16 and with logits
    as large as 1e4 under a temperature far from 1, against float64 (weights, per-row loss, gradient)."""
    V = 1100
    student_full, teacher_full = (randn(3, 4, V + 5, gen=gen, scale=scale, dtype=dtype) for _ in range(2))
    student, teacher = student_full[..., :V], teacher_full[..., :V]
    got_w = klops.akl_weights(student, teacher, temperature=temperature, backend=backend)
    w = akl_weights_reference(student, teacher, temperature=temperature)
    assert_close(got_w, w, (1e-5, 1e-6), "w")
    leaf = student_full.detach().clone().requires_grad_()
    loss = klops.akl_loss(leaf[..., :V], teacher, temperature=temperature, reduction="none", backend=backend)
    upstream = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    (loss * upstream).sum().backward()
    ref_leaf = student.detach().double().requires_grad_()
    options = dict(temperature=temperature, reduction="none")
    expected = fused_kl_reference(ref_leaf, teacher, "forward", weights=w, **options) + fused_kl_reference(
        ref_leaf, teacher, "reverse", weights=1 - w, **options
    )
    (expected * upstream).sum().backward()
    assert_close(loss, expected.detach(), LOSS_TOL[dtype], "loss")
    assert_close(leaf.grad[..., :V], ref_leaf.grad, GRAD_TOL[dtype], "grad")
    assert float(leaf.grad[..., V:].abs().sum()) == 0.0


@pytest.mark.parametrize("backend", AKL_BACKENDS)
def test_underflowed_entries_against_neg_inf(backend, gen):
    """Entries floored at -1e30 in one model (probability 0) and -inf in the other add nothing to either KL, as in the
    reference; no NaN in the KLs, the AKL loss or the gradient (V = 1500 crosses the 1024-wide blocks)."""
    student, teacher = randn(6, 1500, gen=gen, scale=2), randn(6, 1500, gen=gen, scale=2)
    student[:, 7::5], teacher[:, 7::5] = -math.inf, -1e30
    student[::2, 1400:], teacher[::2, 1400:] = -1e30, -math.inf
    leaf, ref_leaf = student.clone().requires_grad_(), student.double().requires_grad_()
    kl_forward, kl_reverse = klops.forward_reverse_kl(leaf, teacher, backend=backend)
    (kl_forward.sum() + 0.5 * kl_reverse.sum()).backward()
    expected_f = fused_kl_reference(ref_leaf, teacher, "forward", reduction="none")
    expected_r = fused_kl_reference(ref_leaf, teacher, "reverse", reduction="none")
    (expected_f.sum() + 0.5 * expected_r.sum()).backward()
    assert_close(kl_forward, expected_f.detach(), LOSS_TOL[torch.float32], "KL(p||q)")
    assert_close(kl_reverse, expected_r.detach(), LOSS_TOL[torch.float32], "KL(q||p)")
    assert_close(leaf.grad, ref_leaf.grad, GRAD_TOL[torch.float32], "grad")
    akl_leaf = student.clone().requires_grad_()
    loss = klops.akl_loss(akl_leaf, teacher, backend=backend)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(akl_leaf.grad).all()


@pytest.mark.parametrize("backend", AKL_BACKENDS)
def test_all_masked_and_empty(backend, gen):
    student = randn(3, 40, gen=gen).requires_grad_()
    loss = klops.akl_loss(student, randn(3, 40, gen=gen), mask=torch.zeros(3, device=DEVICE), backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and float(student.grad.abs().sum()) == 0.0
    empty = randn(0, 40, gen=gen).requires_grad_()
    klops.akl_loss(empty, randn(0, 40, gen=gen), backend=backend).backward()
    assert empty.grad.shape == (0, 40)


@pytest.mark.parametrize("backend", AKL_BACKENDS)
def test_opcheck(backend, gen):
    from klops.distill import kl_pair_op

    valid = torch.tensor([[True, False, True]], device=DEVICE)
    torch.library.opcheck(kl_pair_op, (randn(1, 3, 50, gen=gen), randn(1, 3, 50, gen=gen), valid, 1.0, 0.5, True,
                                       backend))  # fmt: skip
    for akl_weights in (True, False):
        student = randn(1, 3, 50, gen=gen).requires_grad_()
        torch.library.opcheck(kl_pair_op, (student, randn(1, 3, 50, gen=gen), valid, 0.7, 0.5, akl_weights, backend))


@pytest.mark.parametrize("backend", AKL_BACKENDS)
def test_compile_fullgraph(backend, gen):
    torch._dynamo.reset()
    student, teacher = randn(2, 5, 60, gen=gen), randn(2, 5, 60, gen=gen)
    grads = []
    for fn in (klops.akl_loss, torch.compile(klops.akl_loss, backend="aot_eager", fullgraph=True)):
        leaf = student.clone().requires_grad_()
        fn(leaf, teacher, backend=backend).backward()
        grads.append(leaf.grad)
    assert_close(grads[1], grads[0], (1e-6, 1e-7), "compiled grad")


def test_bad_input(gen):
    student = randn(3, 40, gen=gen)
    with pytest.raises(ValueError, match="mu must lie in"):
        klops.akl_weights(student, student, mu=1.5)
    with pytest.raises(ValueError, match="mu must lie in"):
        klops.akl_weights(student, student, mu=1.0)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        klops.akl_loss(student, randn(3, 41, gen=gen))
    with pytest.raises(ValueError, match="akl_weights has no CUDA kernels"):
        klops.akl_weights(student, student, backend="cuda")


@pytest.mark.parametrize("temperature", [1.0, 2.0])  # 1.0 with a dense teacher: NLL and KL in one sweep
@pytest.mark.parametrize("teacher_form", ["dense", "topk"])
def test_dckd_matches_reference(teacher_form, temperature, backend, gen):
    student, teacher, labels, _, *_ = batch(gen)
    chosen = torch.tensor([True, False, True, False], device=DEVICE)
    if teacher_form == "topk":
        top = torch.log_softmax(teacher, dim=-1).topk(8, dim=-1)
        teacher = klops.TopK(top.indices, top.values, tail="bin")
    weights = dict(w_sft=0.7, w_distil=1.5, w_chosen=1.0, w_rejected=0.4)
    got = leaf(student)
    loss, metrics = klops.dckd_loss(got, teacher, labels, chosen, temperature=temperature, backend=backend, **weights)
    want = leaf(student.double())
    ref = dckd_loss_reference(want, teacher, labels, chosen, temperature=temperature, **weights)
    loss.backward(), ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(got.grad, want.grad, GTOL, "grad")
    assert set(metrics) == {"nll", "kl/chosen", "kl/rejected"}


@pytest.mark.parametrize("teacher_form", ["hidden", "topk"])
def test_dckd_from_hidden(teacher_form, backend, gen):
    """A hidden-state student at T = 1: NLL and KL from one fused-linear op, the teacher as hidden states and
    head or as a TopK."""
    (hidden, weight), (t_hidden, t_weight), labels, _, *_ = batch(gen, D=10)
    chosen = torch.tensor([True, True, False, False], device=DEVICE)
    teacher = t_hidden.double() @ t_weight.double().T
    given = (t_hidden, t_weight)
    if teacher_form == "topk":
        top = torch.log_softmax(teacher, dim=-1).topk(6, dim=-1)
        given = teacher = klops.TopK(top.indices, top.values.float())
    h, w = leaf(hidden), leaf(weight)
    loss, _ = klops.dckd_loss((h, w), given, labels, chosen, kind="jsd", beta=0.3, backend=backend)
    h_ref, w_ref = leaf(hidden.double()), leaf(weight.double())
    ref = dckd_loss_reference(h_ref @ w_ref.T, teacher, labels, chosen, kind="jsd", beta=0.3)
    loss.backward(), ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(h.grad, h_ref.grad, GTOL, "grad hidden")
    assert_close(w.grad, w_ref.grad, GTOL, "grad weight")


@pytest.mark.parametrize("kl_estimator", ["k1", "k3"])
def test_kdrl_matches_reference(kl_estimator, backend, gen):
    """GRPO on the student's rollouts plus the KL to the teacher at the sampled token: the float64 GRPO
    reference with the teacher's log-probs in the reference's place."""
    logits, teacher, ids, mask, *_ = batch(gen)
    ids = ids.clamp(min=0)
    advantages = randn(4, gen=gen)
    got = leaf(logits)
    loss, _ = klops.kdrl_loss(got, ids, advantages, mask, teacher, kl_coef=0.3, kl_estimator=kl_estimator,
                              loss_type="grpo", backend=backend)  # fmt: skip
    want = leaf(logits.double())
    logp, _ = logprobs_reference(want, ids)
    teacher_logp, _ = logprobs_reference(teacher, ids)
    ref = grpo_loss_reference(logp, advantages, mask, ref_logp=teacher_logp, beta=0.3, kl_estimator=kl_estimator,
                              loss_type="grpo")  # fmt: skip
    loss.backward(), ref.backward()
    assert_close(loss, ref, TOL, "loss")
    assert_close(got.grad, want.grad, GTOL, "grad")
    with pytest.raises(ValueError, match="sets beta"):
        klops.kdrl_loss(got, ids, advantages, mask, teacher, kl_coef=0.3, beta=0.1)


def test_kl_pair_and_fused_kl_agree_on_underflowed_entries(gen):
    """p underflowed to 0 in fp32 (a -1e30 logit) facing log q = -inf, and the mirror entry: the torch backends of
    forward_reverse_kl (kl_pair_torch) and fused_kl (_terms.kl_entries) both count it as 0 log 0 = 0, the float64
    reference's value, and give the same KLs and gradients."""
    student, teacher = randn(3, 40, gen=gen), randn(3, 40, gen=gen)
    student[:, 5], teacher[:, 5] = -math.inf, -1e30  # the KL(p||q) entry p (log p - log q) = 0 (-1e30 + inf)
    student[:, 9], teacher[:, 9] = -1e30, -math.inf  # the KL(q||p) entry, mirrored
    pair_leaf = student.clone().requires_grad_()
    kls = klops.forward_reverse_kl(pair_leaf, teacher, backend="torch")
    (kls[0].sum() + 0.5 * kls[1].sum()).backward()
    dense_grad = torch.zeros_like(student)
    for kind, got, weight in (("forward", kls[0], 1.0), ("reverse", kls[1], 0.5)):
        leaf = student.clone().requires_grad_()
        dense = klops.fused_kl(leaf, teacher, kind, reduction="none", backend="torch")
        (weight * dense.sum()).backward()
        dense_grad += leaf.grad
        expected = fused_kl_reference(student, teacher, kind, reduction="none")
        assert torch.isfinite(expected).all()
        assert_close(got, expected, LOSS_TOL[torch.float32], f"kl_pair {kind}")
        assert torch.equal(got, dense), kind
    assert torch.isfinite(pair_leaf.grad).all() and pair_leaf.grad[:, [5, 9]].eq(0).all()
    assert_close(pair_leaf.grad, dense_grad, (1e-6, 1e-7), "kl_pair grad vs fused_kl grads")
