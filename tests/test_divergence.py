"""klops.fused_kl against the float64 reference (docs/losses.md §1, §7), on every backend usable here."""

import math

import pytest
import torch

import klops
from klops.reference import divergence_reference, fused_kl_reference, logprobs_reference

from .conftest import COEF, DEVICE, GRAD_TOL, LABEL_DTYPES, LOSS_TOL, assert_close, backends_of, empty_rows, randn

KINDS = klops.divergence.DIVERGENCE_KINDS
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def run_both(student, teacher, kind, backend, grad_out=None, **kw):
    """(loss, student grad) from klops and from the float64 reference on the same inputs."""
    z = student.detach().clone().requires_grad_()
    loss = klops.fused_kl(z, teacher, kind, backend=backend, **kw)
    z_ref = student.detach().clone().requires_grad_()
    ref = fused_kl_reference(z_ref, teacher, kind, **kw)
    g = torch.ones_like(ref) if grad_out is None else grad_out
    loss.backward(g.to(loss.dtype))
    ref.backward(g.to(ref.dtype))
    return loss, z.grad, ref, z_ref.grad


def check(student, teacher, kind, backend, dtype=torch.float32, grad_out=None, **kw):
    loss, grad, ref, ref_grad = run_both(student, teacher, kind, backend, grad_out, **kw)
    assert loss.dtype == torch.float32
    assert grad.dtype == student.dtype and grad.shape == student.shape
    assert_close(loss, ref, LOSS_TOL[dtype], f"{kind} loss")
    assert_close(grad, ref_grad, GRAD_TOL[dtype], f"{kind} grad")
    return loss, grad


# Each shape has a reason: V odd and prime; V a power of two; V one past 4096 (a multiple of every block size);
# 3-D rows.
@pytest.mark.parametrize("shape", [(13, 67), (5, 256), (3, 4097), (2, 3, 331)])
@pytest.mark.parametrize("kind", KINDS)
def test_matches_reference(kind, shape, backend, gen):
    check(randn(*shape, gen=gen, scale=2.0), randn(*shape, gen=gen, scale=2.0), kind, backend, **COEF.get(kind, {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_low_precision(kind, dtype, backend, gen):
    student = randn(17, 301, gen=gen, dtype=dtype, scale=3.0)
    check(student, randn(17, 301, gen=gen, dtype=dtype, scale=3.0), kind, backend, dtype, **COEF.get(kind, {}))


def test_mixed_dtypes(backend, gen):
    """bf16 student with an fp32 teacher: the gradient is bf16, the loss fp32."""
    student = randn(9, 500, gen=gen, dtype=torch.bfloat16)
    check(student, randn(9, 500, gen=gen), "forward", backend, torch.bfloat16)


@pytest.mark.parametrize("temperature", [0.3, 3.0])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "alpha"])
def test_temperature(kind, temperature, backend, gen):
    student, teacher = randn(11, 129, gen=gen, scale=2), randn(11, 129, gen=gen, scale=2)
    check(student, teacher, kind, backend, temperature=temperature, **COEF.get(kind, {}))


@pytest.mark.parametrize("kind", KINDS)
def test_large_logits(kind, backend, gen):
    """Logits of magnitude 1e4: lse must be taken in a stable way; fp32 rounds z/T at ~1e-3. The gradient
    (a_v - q_v gbar) / T cancels terms as large as the loss (reverse KL: a_v ~ gbar = D ~ 1e4 at the argmax), so
    its error is a few fp32 ulps of max |D| / T, however small the exact gradient: that is its atol floor."""
    student, teacher = randn(6, 97, gen=gen, scale=1e4), randn(6, 97, gen=gen, scale=1e4)
    loss, grad, ref, ref_grad = run_both(student, teacher, kind, backend, reduction="none", **COEF.get(kind, {}))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()
    assert_close(loss, ref, (1e-4, 1e-6), f"{kind} loss")
    assert_close(grad, ref_grad, (1e-4, 1e-5), f"{kind} grad", floor=1e-6 * float(ref.abs().max()))


@pytest.mark.parametrize("kind", KINDS)
def test_neg_inf_logits(kind, backend, gen):
    """-inf columns (padded vocabulary) in both; -inf teacher-only entries where D stays finite."""
    student, teacher = randn(8, 150, gen=gen), randn(8, 150, gen=gen)
    student[:, 140:] = -math.inf
    teacher[:, 140:] = -math.inf
    if kind != "reverse":  # KL(q||p) is infinite where p = 0 < q
        teacher[::2, 3:40:3] = -math.inf
    loss, grad = check(student, teacher, kind, backend, reduction="none", **COEF.get(kind, {}))
    assert torch.isfinite(loss).all()
    assert (grad[:, 140:] == 0).all()


@pytest.mark.parametrize("target_is", ["logits", "logprobs"])
@pytest.mark.parametrize("kind", KINDS)
def test_underflowed_entries_against_neg_inf(kind, target_is, backend, gen):
    """A finite logit so low that its probability is 0 (a mask of -1e30, as finfo(dtype).min masks are) facing -inf in
    the other model: the entry adds nothing (the reference's 0 log 0 = 0), as where both are -inf; no NaN. Teacher
    floored where the student is -inf (every row), and the other way round (even rows). The entries lie in every
    online lane (V = 1500 crosses 1024-wide blocks), some lanes holding nothing else, so that a lane's rescaling
    underflows too."""
    student, teacher = randn(6, 1500, gen=gen, scale=2), randn(6, 1500, gen=gen, scale=2)
    student[:, 7::5] = -math.inf
    teacher[:, 7::5] = -1e30
    student[::2, 1400:] = -1e30
    teacher[::2, 1400:] = -math.inf
    if target_is == "logprobs":
        teacher = torch.log_softmax(teacher, dim=-1)  # -1e30 stays finite, -inf stays -inf
    loss, grad = check(student, teacher, kind, backend, reduction="none", target_is=target_is, **COEF.get(kind, {}))
    assert torch.isfinite(loss).all() and torch.isfinite(grad).all()


@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked(kind, backend, gen):
    """All rows masked: loss 0, gradient 0, no NaN even with garbage (NaN, inf) in the masked rows."""
    student, teacher = randn(4, 6, 70, gen=gen), randn(4, 6, 70, gen=gen)
    student[0, 0, 0] = math.nan
    teacher[1, 2, :] = math.inf
    labels = torch.full((4, 6), -100, device=DEVICE)
    for kw in (dict(labels=labels), dict(mask=torch.zeros(4, 6, device=DEVICE))):
        z = student.clone().requires_grad_()
        loss = klops.fused_kl(z, teacher, kind, backend=backend, **kw, **COEF.get(kind, {}))
        loss.backward()
        assert loss.item() == 0.0
        assert (z.grad == 0).all()


def test_partially_masked(backend, gen):
    """Masked rows hold garbage; valid rows still match the reference; mean counts valid rows only."""
    student, teacher = randn(2, 9, 80, gen=gen), randn(2, 9, 80, gen=gen)
    labels = torch.randint(0, 80, (2, 9), generator=gen).to(DEVICE)
    labels[0, 2:5] = -100
    mask = torch.ones(2, 9, dtype=torch.bool, device=DEVICE)
    mask[1, -2:] = False
    check(student, teacher, "reverse", backend, labels=labels, mask=mask)
    student[0, 3] = math.nan
    loss = klops.fused_kl(student, teacher, "reverse", labels=labels, mask=mask, backend=backend)
    assert torch.isfinite(loss)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_empty_batch(reduction, backend):
    """N = 0: an empty or zero loss, an empty gradient, no error."""
    z = torch.zeros(0, 33, device=DEVICE, requires_grad=True)
    loss = klops.fused_kl(z, torch.zeros(0, 33, device=DEVICE), "jsd", reduction=reduction, backend=backend)
    loss.sum().backward()
    assert loss.shape == ((0,) if reduction == "none" else ())
    assert loss.sum().item() == 0.0 and z.grad.shape == (0, 33)


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_empty_rows_in_every_layout(reduction, backend, gen):
    """N = 0 in each leading layout (labels[:, 1:] of length-1 sequences among them), with labels, mask,
    weights and num_items: 0 or an empty loss and an empty gradient of the input's shape."""
    for layout, student in empty_rows(45, gen).items():
        rows = student.shape[:-1]
        z = student.detach().clone().requires_grad_()
        kw = dict(labels=torch.zeros(rows, dtype=torch.long, device=DEVICE), mask=torch.ones(rows, device=DEVICE),
                  weights=torch.ones(rows, device=DEVICE), reduction=reduction)  # fmt: skip
        if reduction != "none":
            kw["num_items"] = 4
        loss = klops.fused_kl(z, torch.zeros_like(student), "jsd", backend=backend, **kw)
        loss.sum().backward()
        assert loss.shape == (rows if reduction == "none" else ()), layout
        assert loss.sum().item() == 0.0 and z.grad.shape == student.shape, layout


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_label_dtypes(dtype, backend, gen):
    """Labels of every integer dtype mask the same rows on every backend."""
    student, teacher = randn(2, 6, 40, gen=gen), randn(2, 6, 40, gen=gen)
    labels = torch.randint(0, 40, (2, 6), generator=gen).to(DEVICE)
    ignore_index = 255 if dtype == torch.uint8 else -100
    labels[0, :3] = ignore_index
    loss, grad = check(student, teacher, "forward", backend, labels=labels, ignore_index=ignore_index)
    loss_cast = klops.fused_kl(student, teacher, labels=labels.to(dtype), ignore_index=ignore_index, backend=backend)
    assert_close(loss_cast, loss, (0, 0), f"{dtype} labels")


@pytest.mark.parametrize("reduction", ["none", "sum", "mean", "batchmean"])
def test_reductions_and_grad_output(reduction, backend, gen):
    """Each reduction with a grad_output other than 1 (per row for 'none')."""
    student, teacher = randn(3, 7, 90, gen=gen), randn(3, 7, 90, gen=gen)
    labels = torch.randint(0, 90, (3, 7), generator=gen).to(DEVICE)
    labels[1, :3] = -100
    shape = (3, 7) if reduction == "none" else ()
    grad_out = randn(*shape, gen=gen, dtype=torch.float64)
    check(student, teacher, "skew_reverse", backend, grad_out=grad_out, labels=labels, reduction=reduction)


def test_weights(backend, gen):
    """Per-row weights: loss and both gradients (student logits and the weights) match the reference."""
    student, teacher = randn(12, 64, gen=gen), randn(12, 64, gen=gen)
    w = randn(12, gen=gen).abs().requires_grad_()
    w_ref = w.detach().double().requires_grad_()
    check(student, teacher, "forward", backend, weights=w.detach())
    loss = klops.fused_kl(student, teacher, "forward", weights=w, backend=backend)
    ref = fused_kl_reference(student, teacher, "forward", weights=w_ref)
    loss.backward(), ref.backward()
    assert_close(w.grad, w_ref.grad, (1e-5, 1e-6), "weights grad")


def test_num_items_matches_one_big_batch(backend, gen):
    """Two micro-batches normalized by the global valid count give the gradient of one big batch."""
    student, teacher = randn(2, 10, 50, gen=gen), randn(2, 10, 50, gen=gen)
    labels = torch.randint(0, 50, (2, 10), generator=gen).to(DEVICE)
    labels[0, :4] = -100
    z_big = student.clone().requires_grad_()
    klops.fused_kl(z_big, teacher, "forward", labels=labels, backend=backend).backward()
    z = student.clone().requires_grad_()
    num_items = (labels != -100).sum()
    for i in range(2):
        klops.fused_kl(z[i], teacher[i], "forward", labels=labels[i], num_items=num_items, backend=backend).backward()
    assert_close(z.grad, z_big.grad, GRAD_TOL[torch.float32], "accumulated grad")
    loss_int = klops.fused_kl(student[0], teacher[0], labels=labels[0], num_items=int(num_items), backend=backend)
    loss_sum = klops.fused_kl(student[0], teacher[0], labels=labels[0], reduction="sum", backend=backend)
    assert_close(loss_int, loss_sum / int(num_items), (1e-6, 1e-7), "int num_items")


def test_non_contiguous(backend, gen):
    """Sliced logits (logits[:, :-1]) and permuted leading dims are read in place, and match."""
    base_s, base_t = randn(3, 8, 120, gen=gen), randn(8, 3, 120, gen=gen)
    student = base_s[:, :-1]
    teacher = base_t.transpose(0, 1)[:, 1:]
    assert not student.is_contiguous() and not teacher.is_contiguous()
    check(student, teacher, "jsd", backend, beta=0.3)


@pytest.mark.parametrize("target_is", ["logprobs", "probs"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "tv"])
def test_teacher_as_logprobs_or_probs(kind, target_is, backend, gen):
    student = randn(10, 77, gen=gen)
    log_p = torch.log_softmax(randn(10, 77, gen=gen) * 2, dim=-1)
    teacher = log_p if target_is == "logprobs" else log_p.exp()
    loss, grad = check(student, teacher, kind, backend, target_is=target_is, temperature=2.0)
    as_logits = klops.fused_kl(student, log_p * 2.0, kind, temperature=2.0, backend=backend)
    assert_close(loss, as_logits, (1e-5, 1e-6), "same teacher given as logits")


def test_jsd_beta_endpoints_are_kl(backend, gen):
    """beta = 0 gives KL(p||q), beta = 1 gives KL(q||p) (Liger / TRL convention), not 0."""
    student, teacher = randn(6, 40, gen=gen), randn(6, 40, gen=gen)
    fwd = klops.fused_kl(student, teacher, "forward", backend=backend)
    rev = klops.fused_kl(student, teacher, "reverse", backend=backend)
    assert_close(klops.fused_kl(student, teacher, "jsd", beta=0.0, backend=backend), fwd, (1e-6, 1e-7), "beta=0")
    assert_close(klops.fused_kl(student, teacher, "jsd", beta=1.0, backend=backend), rev, (1e-6, 1e-7), "beta=1")
    assert fwd.item() > 0.05 and rev.item() > 0.05


def test_teacher_gets_no_gradient(backend, gen):
    student = randn(5, 30, gen=gen).requires_grad_()
    teacher = randn(5, 30, gen=gen).requires_grad_()
    klops.fused_kl(student, teacher, "reverse", backend=backend).backward()
    assert student.grad is not None and teacher.grad is None


def test_module_wrapper(backend, gen):
    student, teacher = randn(4, 5, 60, gen=gen), randn(4, 5, 60, gen=gen)
    module = klops.nn.FusedKL("skew_forward", alpha=0.1, temperature=2.0, reduction="sum", backend=backend)
    expected = klops.fused_kl(
        student, teacher, "skew_forward", alpha=0.1, temperature=2.0, reduction="sum", backend=backend
    )
    assert_close(module(student, teacher), expected, (0, 0), "module")
    assert "skew_forward" in repr(module)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradcheck(kind, gen):
    """The float64 reference is itself differentiable and smooth where it should be."""
    student = torch.randn(3, 11, generator=gen, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(3, 11, generator=gen, dtype=torch.float64)
    kw = COEF.get(kind, {})
    torch.autograd.gradcheck(lambda z: divergence_reference(z, teacher, kind, temperature=1.5, **kw), (student,))


def test_reference_known_values():
    """Hand-computed values pin the reference itself to docs/losses.md."""
    p = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    z, y = q.log(), p.log()
    kl_pq = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    kl_qp = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert math.isclose(divergence_reference(z, y, "forward").item(), kl_pq, rel_tol=1e-12)
    assert math.isclose(divergence_reference(z, y, "reverse").item(), kl_qp, rel_tol=1e-12)
    assert math.isclose(divergence_reference(z, y, "tv").item(), 0.25, rel_tol=1e-12)
    s = 0.5**0.5 * 0.25**0.5 + 0.5**0.5 * 0.75**0.5
    assert math.isclose(divergence_reference(z, y, "alpha", alpha=0.5).item(), (1 - s) / 0.25, rel_tol=1e-12)


@pytest.mark.parametrize("kind", ["forward", "skew_reverse"])
def test_torch_backend_chunks(kind, gen, monkeypatch):
    """The torch backend over chunks of 3 rows (a ragged last chunk, two batch entries) equals one chunk."""
    student, teacher = randn(2, 10, 70, gen=gen), randn(2, 10, 70, gen=gen)
    whole = check(student, teacher, kind, "torch", reduction="none", **COEF.get(kind, {}))
    monkeypatch.setattr(klops._chunked, "TORCH_CHUNK_ELEMENTS", 3 * 70)
    assert len(list(klops._chunked.row_chunks(2, 10, 70))) == 8
    chunked = check(student, teacher, kind, "torch", reduction="none", **COEF.get(kind, {}))
    assert_close(chunked[0], whole[0], (1e-6, 1e-7), "chunked loss")
    assert_close(chunked[1], whole[1], (1e-6, 1e-7), "chunked grad")


@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_running_max_moves_across_blocks(kind, backend, gen):
    """Logits that rise (student) and fall (teacher) along V, so every block of the sweep moves the
    running maxima the online sweeps keep: the one-sweep KL must re-base its accumulator each time."""
    V = 2 * 4096 + 77
    ramp = torch.linspace(0.0, 12.0, V, dtype=torch.float64).to(DEVICE)
    student = (ramp + randn(3, V, gen=gen)).float()
    teacher = (ramp.flip(0) * 0.5 + randn(3, V, gen=gen)).float()
    check(student, teacher, kind, backend, temperature=0.7, **COEF.get(kind, {}))


@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_vocab_256k(kind, backend, gen):
    """V = 262144 (docs/losses.md §7's largest vocabulary), bf16, with a padded tail."""
    student = randn(2, 262144, gen=gen, dtype=torch.bfloat16, scale=3.0)
    teacher = randn(2, 262144, gen=gen, dtype=torch.bfloat16, scale=3.0)
    student[:, -100:] = -math.inf
    teacher[:, -100:] = -math.inf
    check(student, teacher, kind, backend, torch.bfloat16, **COEF.get(kind, {}))


@pytest.mark.parametrize("kind", ["forward", "jsd", "tv"])
def test_divergence_and_label_logprobs(kind, backend, gen):
    """D, log q(label) and log p(label) from one sweep; the backward writes both gradients at once."""
    student, teacher = randn(3, 5, 97, gen=gen, scale=2.0), randn(3, 5, 97, gen=gen, scale=2.0)
    labels = torch.randint(0, 97, (3, 5), generator=gen).to(DEVICE)
    labels[0, 1] = -100
    mask = torch.ones(3, 5, device=DEVICE)
    mask[2, 4] = 0
    z = student[:, :4].detach().clone().requires_grad_()  # sliced rows
    kw = dict(temperature=1.4, **COEF.get(kind, {}))
    rows, logp, teacher_logp = klops.divergence.divergence_and_label_logprobs(
        z, teacher[:, :4], labels[:, :4], kind, mask=mask[:, :4], backend=backend, **kw
    )
    g_rows, g_logp = randn(3, 4, gen=gen), randn(3, 4, gen=gen)
    ((rows * g_rows).sum() + (logp * g_logp).sum()).backward()
    z_ref = student[:, :4].detach().clone().requires_grad_()
    keep = (labels[:, :4] != -100) & (mask[:, :4] != 0)
    ref_rows = fused_kl_reference(z_ref, teacher[:, :4], kind, mask=keep, reduction="none", **kw)
    ref_logp, _ = logprobs_reference(z_ref, torch.where(keep, labels[:, :4], -100), temperature=1.4)
    ref_teacher, _ = logprobs_reference(teacher[:, :4], torch.where(keep, labels[:, :4], -100), temperature=1.4)
    ((ref_rows * g_rows).sum() + (ref_logp * g_logp).sum()).backward()
    assert_close(rows, ref_rows, LOSS_TOL[torch.float32], "rows")
    assert_close(logp, ref_logp, LOSS_TOL[torch.float32], "logp")
    assert_close(teacher_logp, ref_teacher, LOSS_TOL[torch.float32], "teacher logp")
    assert_close(z.grad, z_ref.grad, GRAD_TOL[torch.float32], "grad")
    assert (z.grad[0, 1] == 0).all()


# ----------------------------------------------------------------------------------------------------
# a teacher given as log-probs or probs is normalized (docs/losses.md §1): checked from the forward's statistics

# The plausible mistakes, each a finite or NaN loss without the check: (given, target_is, message).
WRONG_ENCODINGS = [
    ("probs", "logprobs", "largest entry is above 0"),
    ("logits", "probs", "smallest entry is negative"),
    ("logprobs", "probs", "smallest entry is negative"),
]


def _encoded(teacher_logits: torch.Tensor, given: str) -> torch.Tensor:
    if given == "logits":
        return teacher_logits
    lp = torch.log_softmax(teacher_logits.float(), dim=-1)
    return (lp if given == "logprobs" else lp.exp()).to(teacher_logits.dtype)


@pytest.mark.parametrize("given, target_is, message", WRONG_ENCODINGS)
def test_wrong_teacher_encoding_raises(given, target_is, message, backend, gen):
    """Probabilities read as log-probs, logits or log-probs read as probabilities: ValueError naming the argument."""
    student, teacher_logits = randn(2, 3, 211, gen=gen), randn(2, 3, 211, gen=gen, scale=2.0)
    with pytest.raises(ValueError, match=f"teacher_logits must hold .*target_is='{target_is}'.*{message}"):
        klops.fused_kl(student, _encoded(teacher_logits, given), "jsd", target_is=target_is, backend=backend)


def test_unnormalized_teacher_raises(backend, gen):
    """Entries of the right sign whose mass is not 1 (a truncated top-p teacher, not renormalized): the mass check."""
    student, teacher = randn(4, 300, gen=gen), torch.softmax(randn(4, 300, gen=gen), -1)
    teacher[1] = torch.where(teacher[1] >= teacher[1].topk(30).values[-1], teacher[1], 0.0)  # mass ~0.3
    for target_is, given in (("probs", teacher), ("logprobs", teacher.log())):
        with pytest.raises(ValueError, match=r"teacher_logits .*a row's probabilities sum to, got 0\.[0-8]"):
            klops.fused_kl(student, given, target_is=target_is, backend=backend)
    # NaN in a valid row is caught too (by the mass check where the NaN escapes the row's max)
    teacher[2, 5] = math.nan
    with pytest.raises(ValueError, match="teacher_logits must hold probabilities"):
        klops.fused_kl(student, teacher, target_is="probs", backend=backend)


@pytest.mark.parametrize("target_is", ["logprobs", "probs"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_honest_rounded_teachers_pass(dtype, target_is, backend, gen):
    """log_softmax / softmax of random logits rounded to the teacher's dtype (computed in fp32 and cast, or in the
    dtype itself) passes at Llama-3's V = 128256: flat, moderate and peaked rows, with logits offset by 30; and the
    three mistakes miss the tolerance by a wide margin there."""
    V = 128256
    logits = randn(3, V, gen=gen) * torch.tensor([[0.5], [3.0], [100.0]], device=DEVICE) + 30.0
    student = randn(3, V, gen=gen)
    fp32 = torch.log_softmax(logits, -1)
    native = torch.log_softmax(logits.to(dtype), -1)
    for lp in (fp32.to(dtype), native):
        teacher = lp if target_is == "logprobs" else lp.float().exp().to(dtype)
        assert torch.isfinite(klops.fused_kl(student, teacher, target_is=target_is, backend=backend))
    tol = klops._inputs.teacher_tolerance(dtype, V)
    assert tol <= 0.11
    assert float(fp32.exp().exp().sum(-1).log().min()) > 100 * tol  # probabilities read as log-probs


def test_padded_masked_and_empty_rows_are_not_checked(backend, gen):
    """Padded vocabulary (-inf log-probs, 0 probs) is legal; rows masked or with ignore_index may hold anything;
    a fully masked batch and N = 0 pass."""
    student = randn(4, 5, 90, gen=gen)
    lp = torch.log_softmax(randn(4, 5, 90, gen=gen).masked_fill(torch.arange(90, device=DEVICE) >= 80, -math.inf), -1)
    labels = torch.randint(0, 90, (4, 5), generator=gen).to(DEVICE)
    labels[0, 1] = -100
    mask = torch.ones(4, 5, device=DEVICE)
    mask[3] = 0
    for target_is, teacher in (("logprobs", lp.clone()), ("probs", lp.exp())):
        teacher[0, 1] = 7.0  # ignored by its label
        teacher[3] = -3.0  # masked
        loss = klops.fused_kl(student, teacher, target_is=target_is, labels=labels, mask=mask, backend=backend)
        assert torch.isfinite(loss)
        assert klops.fused_kl(student, teacher, target_is=target_is, mask=torch.zeros(4, 5), backend=backend) == 0
        empty = torch.zeros(0, 90, device=DEVICE)
        assert klops.fused_kl(empty, empty - 1.0, target_is=target_is, backend=backend) == 0


@pytest.mark.parametrize("target_is", ["logprobs", "probs"])
def test_teacher_check_statistics_come_from_the_forward(target_is, backend, gen):
    """The check reads no second pass over the teacher: every backend's forward leaves in max_t / logsum_t the row's
    largest log-prob (or negated probability) and the log of its mass, 0 on invalid rows."""
    from klops.divergence import divergence_op

    student, teacher_logits = randn(2, 3, 1500, gen=gen), randn(2, 3, 1500, gen=gen, scale=2.0)
    teacher = _encoded(teacher_logits, target_is) * 1.5  # not normalized: the statistics show it
    valid = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    valid[1, 2] = False
    _, _, _, top, log_mass, _, _ = divergence_op(student, teacher, valid, None, "jsd", target_is, 1.0, 0.5, backend)
    t = teacher.double()
    p = t.exp() if target_is == "logprobs" else t
    want_top = t.amax(-1) if target_is == "logprobs" else (-t).amax(-1)
    assert_close(top, torch.where(valid, want_top, 0.0), (1e-6, 1e-7), "top")
    assert_close(log_mass, torch.where(valid, p.sum(-1).log(), 0.0), (1e-5, 1e-6), "log mass")


@pytest.mark.parametrize("given, target_is, message", WRONG_ENCODINGS[:2])
def test_teacher_check_under_compile(given, target_is, message, backend, gen):
    """Under torch.compile the check is not skipped and does not break the graph: a device-side assertion
    (RuntimeError on the CPU); an honest teacher compiles to the eager loss."""
    torch._dynamo.reset()
    student, teacher_logits = randn(2, 4, 60, gen=gen), randn(2, 4, 60, gen=gen)

    def loss(z, t):
        return klops.fused_kl(z, t, "reverse", target_is=target_is, backend=backend)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    honest = _encoded(teacher_logits, target_is)
    assert_close(compiled(student, honest), loss(student, honest), (1e-6, 1e-7), "compiled loss")
    with pytest.raises(RuntimeError, match=f"teacher_logits must hold .*{message}"):
        compiled(student, _encoded(teacher_logits, given))


def test_teacher_check_of_gpu_tensors_never_syncs():
    """Off the CPU the check is a device-side assertion: on meta tensors, whose values cannot be read, it runs without
    reading them; set_host_checks(True) reads them (and fails here, on meta)."""
    stats = [torch.zeros(2, 3, device="meta") for _ in range(2)]
    valid = torch.ones(2, 3, dtype=torch.bool, device="meta")
    klops._inputs.check_teacher_rows("teacher_logits", "probs", torch.bfloat16, 100, valid, *stats)
    klops.set_host_checks(True)
    try:
        with pytest.raises(RuntimeError, match="meta"):
            klops._inputs.check_teacher_rows("teacher_logits", "probs", torch.bfloat16, 100, valid, *stats)
    finally:
        klops.set_host_checks(False)


@pytest.mark.skipif("cpu" not in backends_of("divergence"), reason="the C++ CPU kernels' scalar form")
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
@pytest.mark.parametrize("dtype, grad_output", [(torch.float32, 1.0), (torch.float32, 0.37), (torch.bfloat16, 1.0)])
def test_scalar_loss_on_the_cpu_kernels_takes_the_gradient_in_the_forward(kind, dtype, grad_output, gen):
    """fp32 logits, a scalar loss: one op forms D and the gradient in one pass over each row (klops::divergence_total;
    forward KL in 2 sweeps, reverse KL with q kept in the gradient), no backward sweep; under loss.backward() the
    gradient is handed over as it is (no [N, V] pass), else scaled. bf16 logits keep the backward sweep (a scaled
    bf16 gradient would be rounded twice). Values and gradients equal the two-sweep path's up to rounding, -inf
    entries in either model (where both are -inf: D stays finite) included."""
    student, teacher = randn(3, 5, 70, gen=gen, dtype=dtype, scale=3.0), randn(3, 5, 70, gen=gen, dtype=dtype)
    student[0, :, :9], teacher[0, :, :9] = -math.inf, -math.inf
    student[2, 1, 30:] = -math.inf
    weights = randn(3, 5, gen=gen).abs()
    kw = dict(kind=kind, mask=torch.ones(3, 5, device=DEVICE), weights=weights, num_items=11, temperature=1.5,
              backend="cpu", **(dict(beta=0.3) if kind == "jsd" else {}))  # fmt: skip
    kw["mask"][1] = 0
    z = student.detach().clone().requires_grad_()
    with torch.profiler.profile(record_shapes=True) as profile:
        loss = klops.fused_kl(z, teacher, **kw)
        (loss * grad_output).backward()
    names = {e.name for e in profile.events()}
    fp32 = dtype == torch.float32
    assert ("klops::divergence_total" in names, "klops::divergence_backward" in names) == (fp32, not fp32), names
    scaled = [e.name for e in profile.events() if e.name == "aten::mul" and [1, 15, 70] in e.input_shapes]
    assert bool(scaled) == (fp32 and grad_output != 1.0), scaled
    z_ref = student.detach().clone().requires_grad_()
    rows = klops.fused_kl(z_ref, teacher, **{**kw, "reduction": "none", "num_items": None})  # the two-sweep path
    (rows.sum() / 11 * grad_output).backward()
    assert_close(loss, rows.sum() / 11, LOSS_TOL[dtype], "loss")
    assert_close(z.grad, z_ref.grad, GRAD_TOL[dtype], "grad")
