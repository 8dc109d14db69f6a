"""klops.fused_linear_logprobs / fused_linear_kl against the float64 reference on logits = h @ W.T + b."""

import functools

import pytest
import torch

import klops
from klops.linear import linear_cross_entropy_op, linear_logprobs_op
from klops.linear_divergence import linear_divergence_op
from klops.reference import fused_kl_reference, logprobs_reference, logprobs_row_stats_reference

from .conftest import BACKENDS, COEF, DEVICE, GRAD_TOL, LOSS_TOL, assert_close, randn

KINDS = klops.divergence.DIVERGENCE_KINDS
# Matmuls in fp32 round at a relative eps * sqrt(D); bf16 logits are rounded to bf16 before the sweep, as
# a trainer's lm_head output is.
LINEAR_LOSS_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (2e-2, 2e-2)}
LINEAR_GRAD_TOL = {torch.float32: (1e-4, 5e-5), torch.bfloat16: (5e-2, 2e-2)}


def ref_logits(hidden, weight, bias=None, softcap=None, logit_scale=1.0):
    z = hidden.double() @ weight.double().t()
    if bias is not None:
        z = z + bias.double()
    z = logit_scale * z
    return z if softcap is None else softcap * torch.tanh(z / softcap)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_() for t in tensors], [
        t.detach().double().requires_grad_() for t in tensors
    ]


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 3 rows, so that every test crosses chunk boundaries (and a ragged last chunk)."""
    monkeypatch.setattr(klops._chunked, "LINEAR_CHUNK_ELEMENTS", {"cpu": 3 * 61, "cuda": 3 * 61})
    monkeypatch.setattr(klops._chunked, "LINEAR_MIN_ROWS", {"cpu": 1, "cuda": 1})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap, with_bias", [(None, False), (None, True), (5.0, True)])
def test_logprobs_matches_reference(softcap, with_bias, dtype, backend, gen, small_chunks):
    hidden = randn(2, 5, 24, gen=gen, dtype=dtype)
    weight = randn(61, 24, gen=gen, dtype=dtype, scale=0.5)
    bias = randn(61, gen=gen, dtype=dtype) if with_bias else None
    labels = torch.randint(0, 61, (2, 5), generator=gen).to(DEVICE)
    labels[1, 2] = -100
    tensors = [hidden, weight] + ([bias] if with_bias else [])
    ours, refs = leaves(*tensors)
    logp, entropy = klops.fused_linear_logprobs(
        ours[0], ours[1], labels, bias=ours[2] if with_bias else None, temperature=0.7, softcap=softcap,
        return_entropy=True, backend=backend,
    )  # fmt: skip
    z = ref_logits(refs[0], refs[1], refs[2] if with_bias else None, softcap)
    ref_logp, ref_entropy = logprobs_reference(z, labels, temperature=0.7)
    g_logp, g_entropy = randn(2, 5, gen=gen, dtype=torch.float64), randn(2, 5, gen=gen, dtype=torch.float64)
    torch.autograd.backward([logp, entropy], [g_logp.float(), g_entropy.float()])
    torch.autograd.backward([ref_logp, ref_entropy], [g_logp, g_entropy])
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_close(logp, ref_logp, LINEAR_LOSS_TOL[dtype], "logprob")
    assert_close(entropy, ref_entropy, LINEAR_LOSS_TOL[dtype], "entropy")
    for name, ours_t, ref_t in zip(("hidden", "weight", "bias"), ours, refs):
        assert ours_t.grad.dtype == dtype
        assert_close(ours_t.grad, ref_t.grad, LINEAR_GRAD_TOL[dtype], f"{name} grad")
    assert (ours[0].grad[1, 2] == 0).all()  # an ignored row has no gradient


def kl_case(gen, teacher_form, Dt=16, dtype=torch.float32):
    student = randn(3, 4, 24, gen=gen, dtype=dtype), randn(61, 24, gen=gen, dtype=dtype, scale=0.5)
    if teacher_form == "hidden":
        teacher = dict(teacher_hidden=randn(3, 4, Dt, gen=gen, dtype=dtype),
                       teacher_weight=randn(61, Dt, gen=gen, dtype=dtype, scale=0.5))  # fmt: skip
        teacher_z = ref_logits(teacher["teacher_hidden"], teacher["teacher_weight"])
    else:
        teacher = dict(teacher_logits=randn(3, 4, 61, gen=gen, scale=2.0))
        teacher_z = teacher["teacher_logits"]
    return student, teacher, teacher_z


@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("kind", KINDS)
def test_kl_matches_reference(kind, teacher_form, backend, gen, small_chunks):
    (hidden, weight), teacher, teacher_z = kl_case(gen, teacher_form)
    labels = torch.randint(0, 61, (3, 4), generator=gen).to(DEVICE)
    labels[0, :2] = -100
    (h, w), (h_ref, w_ref) = leaves(hidden, weight)
    kw = dict(kind=kind, temperature=1.5, labels=labels, **COEF.get(kind, {}))
    loss = klops.fused_linear_kl(h, w, **teacher, backend=backend, **kw)
    ref = fused_kl_reference(ref_logits(h_ref, w_ref), teacher_z, **kw)
    loss.backward(), ref.backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], f"{kind} loss")
    assert_close(h.grad, h_ref.grad, GRAD_TOL[torch.float32], f"{kind} hidden grad")
    assert_close(w.grad, w_ref.grad, GRAD_TOL[torch.float32], f"{kind} weight grad")
    if teacher_form == "hidden":
        assert teacher["teacher_hidden"].grad is None and teacher["teacher_weight"].grad is None


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean"])
def test_kl_options(reduction, backend, gen, small_chunks):
    """Softcap on both models, biases, mask, weights (with their gradient), bf16, per-row grad_output."""
    (hidden, weight), teacher, _ = kl_case(gen, "hidden", dtype=torch.bfloat16)
    bias, t_bias = randn(61, gen=gen, dtype=torch.bfloat16), randn(61, gen=gen, dtype=torch.bfloat16)
    mask = torch.ones(3, 4, device=DEVICE)
    mask[2, 1:] = 0
    row_weights = randn(3, 4, gen=gen).abs()
    (h, w, b, rw), (h_ref, w_ref, b_ref, rw_ref) = leaves(hidden, weight, bias, row_weights)
    kw = dict(kind="jsd", beta=0.4, mask=mask, reduction=reduction)
    loss = klops.fused_linear_kl(h, w, **teacher, student_bias=b, teacher_bias=t_bias, softcap=4.0, weights=rw,
                                 backend=backend, **kw)  # fmt: skip
    teacher_z = ref_logits(teacher["teacher_hidden"], teacher["teacher_weight"], t_bias, softcap=4.0)
    ref = fused_kl_reference(ref_logits(h_ref, w_ref, b_ref, softcap=4.0), teacher_z, weights=rw_ref, **kw)
    grad_out = randn(*ref.shape, gen=gen, dtype=torch.float64)
    loss.backward(grad_out.float()), ref.backward(grad_out)
    assert_close(loss, ref, LINEAR_LOSS_TOL[torch.bfloat16], "loss")
    for name, ours_t, ref_t in (
        ("hidden", h, h_ref),
        ("weight", w, w_ref),
        ("bias", b, b_ref),
        ("weights", rw, rw_ref),
    ):
        assert_close(ours_t.grad, ref_t.grad, LINEAR_GRAD_TOL[torch.bfloat16], f"{name} grad")


def test_one_chunk_equals_many(gen, monkeypatch):
    (hidden, weight), teacher, _ = kl_case(gen, "hidden")
    results = []
    for elements in (1 << 24, 2 * 61):
        monkeypatch.setattr(klops._chunked, "LINEAR_CHUNK_ELEMENTS", {"cpu": elements, "cuda": elements})
        monkeypatch.setattr(klops._chunked, "LINEAR_MIN_ROWS", {"cpu": 1, "cuda": 1})
        (h, w), _ = leaves(hidden, weight)
        klops.fused_linear_kl(h, w, **teacher, kind="reverse", backend="torch").backward()
        results.append((h.grad, w.grad))
    # equal up to fp32 rounding: BLAS blocks a 2-row and a 12-row matmul differently on some CPUs
    assert_close(results[1][0], results[0][0], (1e-5, 1e-6), "hidden grad")
    assert_close(results[1][1], results[0][1], (1e-5, 1e-6), "weight grad")


def test_empty_and_sliced(backend, gen):
    """N = 0 (hidden[:, :-1] of length-1 sequences) and the usual shifted slice hidden[:, :-1]."""
    weight = randn(61, 24, gen=gen)
    h = randn(2, 1, 24, gen=gen)[:, :-1].requires_grad_()
    logp = klops.fused_linear_logprobs(h, weight, torch.zeros(2, 0, dtype=torch.long, device=DEVICE), backend=backend)
    logp.sum().backward()
    assert logp.shape == (2, 0) and h.grad.shape == (2, 0, 24)
    base = randn(2, 6, 24, gen=gen)
    labels = torch.randint(0, 61, (2, 6), generator=gen).to(DEVICE)
    sliced = klops.fused_linear_logprobs(base[:, :-1], weight, labels[:, 1:], backend=backend)
    copied = klops.fused_linear_logprobs(base[:, :-1].contiguous(), weight, labels[:, 1:], backend=backend)
    # equal up to the matmul's rounding: BLAS may order the sums differently for a strided operand
    assert_close(sliced, copied, (1e-6, 0), "sliced")
    # a sliced teacher's logits too, and the sliced student's gradient lands in the slice's shape
    teacher = randn(2, 6, 61, gen=gen)
    h = base.clone().requires_grad_()
    kl = klops.fused_linear_kl(h[:, :-1], weight, teacher_logits=teacher[:, 1:], kind="reverse", backend=backend)
    kl.backward()
    h_ref = base.double().requires_grad_()
    ref = fused_kl_reference(ref_logits(h_ref[:, :-1], weight), teacher[:, 1:], "reverse")
    ref.backward()
    assert_close(kl, ref, LOSS_TOL[torch.float32], "sliced kl")
    assert_close(h.grad, h_ref.grad, GRAD_TOL[torch.float32], "sliced hidden grad")


def test_opcheck(backend, gen):
    hidden, weight, bias = randn(1, 5, 8, gen=gen), randn(13, 8, gen=gen), randn(13, gen=gen)
    labels = torch.tensor([[0, 3, -100, 12, 7]], device=DEVICE)
    for b in (None, bias):
        torch.library.opcheck(
            linear_logprobs_op, (hidden.requires_grad_(), weight, b, labels, 0.8, 3.0, True, b is None, -100, backend)
        )
        torch.library.opcheck(linear_cross_entropy_op, (hidden, weight, b, labels, None, 0.1, -100, backend))
    valid = torch.tensor([[True, False, True, True, True]], device=DEVICE)
    teacher = randn(1, 5, 13, gen=gen)
    for row_labels in (None, labels.clamp(min=0)):
        args = (hidden, weight, bias, None, None, None, teacher, valid, row_labels, "jsd", "logits", 1.2, 0.3, None,
                None, backend)  # fmt: skip
        torch.library.opcheck(linear_divergence_op, args)
    t_hidden, t_weight = randn(1, 5, 6, gen=gen), randn(13, 6, gen=gen)  # the teacher's own soft cap
    args = (hidden, weight, bias, t_hidden, t_weight, None, None, valid, None, "forward", "logits", 1.0, 0.0, 3.0, 2.0,
            backend)  # fmt: skip
    torch.library.opcheck(linear_divergence_op, args)


def test_compile_fullgraph(backend, gen):
    torch._dynamo.reset()
    (hidden, weight), teacher, _ = kl_case(gen, "hidden")
    labels = torch.randint(0, 61, (3, 4), generator=gen).to(DEVICE)

    def loss_fn(h, w):
        kl = klops.fused_linear_kl(h, w, **teacher, kind="forward", softcap=6.0, backend=backend)
        ce = klops.fused_linear_cross_entropy(h, w, labels, label_smoothing=0.1, backend=backend)
        logp, entropy = klops.fused_linear_logprobs(h, w, labels, return_entropy=True, backend=backend)
        return kl + ce + (logp - entropy).mean()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend="aot_eager", fullgraph=True)):
        (h, w), _ = leaves(hidden, weight)
        fn(h, w).backward()
        grads.append(w.grad)
    # equal up to the order of fp32 sums (the Triton backward's atomic adds have none on a GPU)
    assert_close(grads[1], grads[0], (1e-5, 1e-6), "compiled grad")


H, W = torch.randn(2, 3, 8), torch.randn(13, 8)
BAD = [
    (dict(student_weight=torch.randn(13, 9)), ValueError, r"student_weight must have shape \[V, D\] with D = .* = 8"),
    (
        dict(teacher_weight=torch.randn(14, 4)),
        ValueError,
        "vocabulary mismatch: student_weight has V=13, teacher_weight",
    ),
    (
        dict(teacher_hidden=None, teacher_weight=None, teacher_logits=torch.randn(2, 3, 12)),
        ValueError,
        "vocabulary mismatch.*teacher_logits",
    ),
    (dict(teacher_logits=torch.randn(2, 3, 13)), ValueError, "not both"),
    (dict(teacher_hidden=None, teacher_weight=None), ValueError, "the teacher is missing"),
    (dict(teacher_hidden=torch.randn(2, 4, 4)), ValueError, "teacher_hidden must have the rows of student_hidden"),
    (dict(student_bias=torch.randn(12)), ValueError, r"student_bias must have shape \(13,\)"),
    (dict(student_weight=torch.randn(13, 8, dtype=torch.bfloat16)), TypeError, "must have one dtype"),
    (dict(softcap=0.0), ValueError, "softcap must lie in"),
    (dict(kind="tv", beta=0.5), ValueError, "kind='tv' takes no coefficient"),
    (dict(target_is="probs"), ValueError, "target_is='probs' is for teacher_logits"),
]


@pytest.mark.parametrize("overrides, error, message", BAD)
def test_kl_rejects(overrides, error, message):
    kw = dict(
        student_hidden=H, student_weight=W, teacher_hidden=torch.randn(2, 3, 4), teacher_weight=torch.randn(13, 4)
    )
    with pytest.raises(error, match=message):
        klops.fused_linear_kl(**(kw | overrides))


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("label_smoothing, z_loss, softcap", [(0.0, 0.0, None), (0.1, 0.0, None), (0.0, 1e-3, 5.0),
                                                              (0.2, 1e-2, 5.0)])  # fmt: skip
def test_cross_entropy_matches_torch(label_smoothing, z_loss, softcap, reduction, backend, gen, small_chunks):
    """Against torch.nn.functional.cross_entropy (+ z_loss lse^2) on the float64 logits."""
    hidden, weight, bias = randn(2, 5, 24, gen=gen), randn(61, 24, gen=gen, scale=0.5), randn(61, gen=gen)
    labels = torch.randint(0, 61, (2, 5), generator=gen).to(DEVICE)
    labels[0, 1:3] = -100
    (h, w, b), (h_ref, w_ref, b_ref) = leaves(hidden, weight, bias)
    kw = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap, reduction=reduction)
    loss, lse = klops.fused_linear_cross_entropy(h, w, labels, bias=b, return_lse=True, backend=backend, **kw)
    z = ref_logits(h_ref, w_ref, b_ref, softcap)
    valid = labels != -100
    rows = torch.nn.functional.cross_entropy(z.reshape(-1, 61), labels.reshape(-1), label_smoothing=label_smoothing,
                                             reduction="none").reshape(2, 5)  # fmt: skip
    ref_lse = torch.where(valid, torch.logsumexp(z, -1), 0.0)
    rows = rows + z_loss * ref_lse.square()
    ref = {"none": rows, "sum": rows.sum(), "mean": rows.sum() / valid.sum()}[reduction]
    grad_out = randn(*ref.shape, gen=gen, dtype=torch.float64)
    g_lse = randn(2, 5, gen=gen, dtype=torch.float64)
    torch.autograd.backward([loss, lse], [grad_out.float(), g_lse.float()])
    torch.autograd.backward([ref, ref_lse], [grad_out, g_lse])
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    assert_close(lse, ref_lse, LOSS_TOL[torch.float32], "lse")
    for name, ours_t, ref_t in (("hidden", h, h_ref), ("weight", w, w_ref), ("bias", b, b_ref)):
        assert_close(ours_t.grad, ref_t.grad, GRAD_TOL[torch.float32], f"{name} grad")


@pytest.mark.parametrize("op", ["logprobs", "cross_entropy", "kl"])
def test_logit_scale_and_teacher_softcap(op, backend, gen, small_chunks):
    """logits = softcap(s (h W^T + b)), with the teacher's own scale and soft cap; s = 0.37 is not a power of two.
    The student's loss and gradients (hidden, weight, bias) against float64, and against s = 1 to see it act."""
    hidden, weight, bias = randn(2, 5, 24, gen=gen), randn(61, 24, gen=gen, scale=0.5), randn(61, gen=gen)
    labels = torch.randint(0, 61, (2, 5), generator=gen).to(DEVICE)
    labels[1, 3] = -100
    t_hidden, t_weight, t_bias = randn(2, 5, 16, gen=gen), randn(61, 16, gen=gen, scale=0.5), randn(61, gen=gen)
    (h, w, b), (h_ref, w_ref, b_ref) = leaves(hidden, weight, bias)
    z = ref_logits(h_ref, w_ref, b_ref, softcap=4.0, logit_scale=0.37)
    signs = torch.linspace(-1, 1, 10, device=DEVICE).reshape(2, 5)  # a per-token upstream gradient

    def loss_of(scale, **extra):
        if op == "logprobs":
            logp = klops.fused_linear_logprobs(h, w, labels, bias=b, temperature=0.7, softcap=4.0,
                                               logit_scale=scale, backend=backend, **extra)  # fmt: skip
            return (logp * signs).sum()
        if op == "cross_entropy":
            return klops.fused_linear_cross_entropy(h, w, labels, bias=b, softcap=4.0, logit_scale=scale,
                                                    backend=backend, **extra)  # fmt: skip
        teacher = dict(teacher_bias=t_bias, teacher_softcap=None, teacher_logit_scale=1.9) | extra
        return klops.fused_linear_kl(h, w, t_hidden, t_weight, student_bias=b, kind="jsd", beta=0.3, temperature=0.7,
                                     softcap=4.0, logit_scale=scale, labels=labels, backend=backend,
                                     **teacher)  # fmt: skip

    if op == "logprobs":
        ref = (logprobs_reference(z, labels, temperature=0.7)[0] * signs.double()).sum()
    elif op == "cross_entropy":
        rows = torch.nn.functional.cross_entropy(z.reshape(-1, 61), labels.reshape(-1), reduction="sum")
        ref = rows / (labels != -100).sum()
    else:
        teacher_z = 1.9 * ref_logits(t_hidden, t_weight, t_bias)
        ref = fused_kl_reference(z, teacher_z, kind="jsd", beta=0.3, temperature=0.7, labels=labels)
    loss = loss_of(0.37)
    loss.backward(), ref.backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    for name, ours_t, ref_t in (("hidden", h, h_ref), ("weight", w, w_ref), ("bias", b, b_ref)):
        assert_close(ours_t.grad, ref_t.grad, GRAD_TOL[torch.float32], f"{name} grad")
    with torch.no_grad():
        assert not torch.allclose(loss_of(1.0), loss, rtol=1e-3)  # the scale acts
        if op == "kl":  # the teacher's own soft cap and scale act
            assert not torch.allclose(loss_of(0.37, teacher_logit_scale="same"), loss, rtol=1e-3)
    if op == "kl":
        with pytest.raises(ValueError, match="teacher_softcap and teacher_logit_scale apply to a teacher given as"):
            klops.fused_linear_kl(h, w, teacher_logits=randn(2, 5, 61, gen=gen), teacher_softcap=3.0)
    with pytest.raises(ValueError, match="logit_scale must lie in"):
        loss_of(float("inf"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprobs_row_stats(dtype, backend, gen, small_chunks):
    """return_row_stats from hidden states: log sum q^2, mean z / T and the first argmax against float64 on
    z = softcap(s (h W^T + b)); half the labels are the argmax, so that is_top1 takes both values."""
    hidden, weight, bias = randn(3, 7, 24, gen=gen, dtype=dtype), randn(61, 24, gen=gen, dtype=dtype), None
    bias = randn(61, gen=gen, dtype=dtype)
    z = ref_logits(hidden, weight, bias, softcap=6.0, logit_scale=0.5)
    labels = torch.randint(0, 61, (3, 7), generator=gen).to(DEVICE)
    labels[:, ::2] = z.argmax(-1)[:, ::2]
    labels[2, 3] = -100
    kw = dict(bias=bias, temperature=0.8, softcap=6.0, logit_scale=0.5, backend=backend)
    out = klops.fused_linear_logprobs(hidden, weight, labels, return_row_stats=True, **kw)
    log_sum_sq, mean, top1 = logprobs_row_stats_reference(z, labels, temperature=0.8)
    assert out.entropy is None and out.is_top1.dtype == torch.bool
    assert_close(out.log_sum_sq_probs, log_sum_sq, LINEAR_LOSS_TOL[dtype], "log_sum_sq_probs")
    assert_close(out.mean_logits, mean, LINEAR_LOSS_TOL[dtype], "mean_logits")
    assert torch.equal(out.is_top1, top1) and 0 < top1.sum() < 20
    assert torch.equal(out.logprob, klops.fused_linear_logprobs(hidden, weight, labels, **kw))


def test_cross_entropy_num_items_and_checks(gen):
    hidden, weight = randn(4, 24, gen=gen), randn(61, 24, gen=gen)
    labels = torch.tensor([3, -100, 7, 60], device=DEVICE)
    total = klops.fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", backend="torch")
    assert_close(klops.fused_linear_cross_entropy(hidden, weight, labels, num_items=10, backend="torch"), total / 10,
                 (1e-6, 0), "num_items")  # fmt: skip
    with pytest.raises(ValueError, match="label_smoothing must lie in"):
        klops.fused_linear_cross_entropy(hidden, weight, labels, label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction must be one of"):
        klops.fused_linear_cross_entropy(hidden, weight, labels, reduction="batchmean")
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 61\)"):
        klops.fused_linear_cross_entropy(hidden, weight, torch.tensor([0, 1, 2, 61]))


@pytest.mark.skipif(DEVICE.type != "cpu", reason="measures the CPU torch backend's resident memory")
def test_cpu_memory_stays_far_below_one_logits_tensor(gen):
    """fused_linear_kl (teacher as hidden + weight), forward + backward on the torch backend at N=8192,
    V=32000: peak extra memory beyond the inputs and the gradients under 1/5 of one [N, V] fp32 tensor
    (1000 MiB): a few [C, V] chunk temporaries (C = 256 rows on the CPU, whatever N; about 125 MiB here) and the
    saved fp32 gradients; a path that formed the logits would need several [N, V] tensors."""
    from klops.bench import PeakMemory

    N, V = 8192, 32000
    h = randn(N, 64, gen=gen).requires_grad_()
    w = randn(V, 64, gen=gen, scale=0.1).requires_grad_()
    th, tw = randn(N, 32, gen=gen), randn(V, 32, gen=gen, scale=0.1)
    klops.fused_linear_kl(h[:512], w, th[:512], tw, kind="forward", backend="torch").backward()  # warm-up
    h.grad = w.grad = None
    with PeakMemory(DEVICE) as peak:
        klops.fused_linear_kl(h, w, th, tw, kind="forward", backend="torch").backward()
    extra = peak.peak - h.grad.nbytes - w.grad.nbytes
    assert extra < N * V * 4 / 5, f"peak extra memory {extra / 2**20:.0f} MiB"


def test_modules(gen):
    (hidden, weight), teacher, _ = kl_case(gen, "hidden")
    labels = torch.randint(0, 61, (3, 4), generator=gen).to(DEVICE)
    kl = klops.nn.FusedLinearKL(kind="skew_forward", alpha=0.1, backend="torch")
    expected = klops.fused_linear_kl(hidden, weight, **teacher, kind="skew_forward", alpha=0.1, backend="torch")
    assert_close(kl(hidden, weight, teacher["teacher_hidden"], teacher["teacher_weight"]), expected, (0, 0), "kl")
    ce = klops.nn.FusedLinearCrossEntropy(label_smoothing=0.1, backend="torch")
    assert_close(ce(hidden, weight, labels), klops.fused_linear_cross_entropy(
        hidden, weight, labels, label_smoothing=0.1, backend="torch"), (0, 0), "ce")  # fmt: skip
    lp = klops.nn.FusedLinearLogProbs(temperature=0.7, backend="torch")
    assert_close(lp(hidden, weight, labels), klops.fused_linear_logprobs(
        hidden, weight, labels, temperature=0.7, backend="torch"), (0, 0), "logprobs")  # fmt: skip
    assert "label_smoothing=0.1" in repr(ce)


def test_mixed_student_teacher_dtypes(backend, gen, small_chunks):
    """A bf16 student with an fp32 teacher (hidden + weight): bf16 gradients, fp32 loss."""
    (hidden, weight), _, _ = kl_case(gen, "hidden", dtype=torch.bfloat16)
    t_hidden, t_weight = randn(3, 4, 16, gen=gen), randn(61, 16, gen=gen, scale=0.5)
    (h, w), (h_ref, w_ref) = leaves(hidden, weight)
    loss = klops.fused_linear_kl(h, w, t_hidden, t_weight, kind="reverse", backend=backend)
    ref = fused_kl_reference(ref_logits(h_ref, w_ref), ref_logits(t_hidden, t_weight), "reverse")
    loss.backward(), ref.backward()
    assert loss.dtype == torch.float32 and h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    assert_close(loss, ref, LINEAR_LOSS_TOL[torch.bfloat16], "loss")
    assert_close(w.grad, w_ref.grad, LINEAR_GRAD_TOL[torch.bfloat16], "weight grad")


@pytest.mark.parametrize("target_is", ["logprobs", "probs"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd", "tv"])
def test_padded_vocabulary_and_teacher_encodings(kind, target_is, backend, gen):
    """A padded vocabulary (-inf student bias, zero teacher mass on the padding), a teacher given as log-probs /
    probs, 2-D hidden [N, D] with N across several row blocks and odd D, V and N; the padding rows of the head
    get no gradient."""
    hidden, weight = randn(37, 19, gen=gen), randn(77, 19, gen=gen, scale=0.5)
    bias = randn(77, gen=gen)
    bias[-5:] = float("-inf")
    teacher_logp = torch.log_softmax(randn(37, 77, gen=gen, scale=2.0) + bias, dim=-1)
    teacher = teacher_logp if target_is == "logprobs" else teacher_logp.exp()
    (h, w), (h_ref, w_ref) = leaves(hidden, weight)
    kw = dict(kind=kind, temperature=1.3, target_is=target_is)
    loss = klops.fused_linear_kl(h, w, teacher_logits=teacher, student_bias=bias, backend=backend, **kw)
    ref = fused_kl_reference(ref_logits(h_ref, w_ref, bias), teacher, **kw)
    loss.backward(), ref.backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], f"{kind} loss")
    assert_close(h.grad, h_ref.grad, GRAD_TOL[torch.float32], f"{kind} hidden grad")
    assert_close(w.grad, w_ref.grad, GRAD_TOL[torch.float32], f"{kind} weight grad")
    assert (w.grad[-5:] == 0).all()


@pytest.mark.parametrize("floored", ["teacher", "student"])
@pytest.mark.parametrize("teacher_form", ["hidden", "logits"])
@pytest.mark.parametrize("kind", ["forward", "reverse", "jsd"])
def test_underflowed_entries_against_neg_inf(kind, teacher_form, floored, backend, gen, small_chunks):
    """Vocabulary entries masked by a -1e30 bias in one model (probability 0) and -inf in the other add nothing, as
    in the reference; no NaN. The masked entries come first and fill a whole 16-wide tile, so that the running row
    maxima start on them and their rescaling underflows at the next tile."""
    hidden, weight = randn(37, 19, gen=gen), randn(77, 19, gen=gen, scale=0.5)
    bias, t_bias = randn(77, gen=gen), randn(77, gen=gen)
    bias[:20], t_bias[:20] = (float("-inf"), -1e30) if floored == "teacher" else (-1e30, float("-inf"))
    t_hidden, t_weight = randn(37, 11, gen=gen), randn(77, 11, gen=gen, scale=0.5)
    teacher_z = ref_logits(t_hidden, t_weight, t_bias)
    if teacher_form == "hidden":
        teacher = dict(teacher_hidden=t_hidden, teacher_weight=t_weight, teacher_bias=t_bias)
    else:
        teacher = dict(teacher_logits=teacher_z.float())
    (h, w), (h_ref, w_ref) = leaves(hidden, weight)
    kw = dict(kind=kind, temperature=0.8, **COEF.get(kind, {}))
    loss = klops.fused_linear_kl(h, w, **teacher, student_bias=bias, backend=backend, **kw)
    ref = fused_kl_reference(ref_logits(h_ref, w_ref, bias), teacher_z, **kw)
    loss.backward(), ref.backward()
    assert torch.isfinite(loss) and torch.isfinite(h.grad).all() and torch.isfinite(w.grad).all()
    assert_close(loss, ref, LOSS_TOL[torch.float32], f"{kind} loss")
    assert_close(h.grad, h_ref.grad, GRAD_TOL[torch.float32], f"{kind} hidden grad")
    assert_close(w.grad, w_ref.grad, GRAD_TOL[torch.float32], f"{kind} weight grad")


def test_fully_masked_batch(backend, gen):
    """Every row ignored: zero losses (sums), zero gradients, no NaN, on every fused-linear op."""
    hidden, weight = randn(2, 20, 24, gen=gen).requires_grad_(), randn(61, 24, gen=gen).requires_grad_()
    labels = torch.full((2, 20), -100, device=DEVICE)
    teacher = dict(teacher_hidden=randn(2, 20, 16, gen=gen), teacher_weight=randn(61, 16, gen=gen))
    losses = [
        klops.fused_linear_kl(hidden, weight, **teacher, kind=kind, labels=labels, reduction="sum", backend=backend)
        for kind in ("forward", "jsd")
    ]
    losses.append(klops.fused_linear_cross_entropy(hidden, weight, labels, reduction="sum", label_smoothing=0.1,
                                                   backend=backend))  # fmt: skip
    logp, entropy = klops.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    losses += [logp.sum(), entropy.sum()]
    sum(losses).backward()
    for value in losses:
        assert value.item() == 0
    assert (hidden.grad == 0).all() and (weight.grad == 0).all()


def test_many_row_blocks_and_vocabulary_ranges(backend, gen):
    """More row blocks than one group of the Triton backward's grouped order (and a ragged last group), several
    vocabulary ranges of a bf16 weight's gradient buffer, and a ragged last vocabulary tile."""
    hidden, weight = randn(300, 16, gen=gen, dtype=torch.bfloat16), randn(83, 16, gen=gen, dtype=torch.bfloat16)
    labels = torch.randint(0, 83, (300,), generator=gen).to(DEVICE)
    labels[::7] = -100
    (h, w), (h_ref, w_ref) = leaves(hidden, weight)
    logp, entropy = klops.fused_linear_logprobs(h, w, labels, return_entropy=True, backend=backend)
    ref_logp, ref_entropy = logprobs_reference(ref_logits(h_ref, w_ref), labels)
    (logp - entropy).sum().backward(), (ref_logp - ref_entropy).sum().backward()
    assert_close(logp, ref_logp, LINEAR_LOSS_TOL[torch.bfloat16], "logprob")
    assert_close(entropy, ref_entropy, LINEAR_LOSS_TOL[torch.bfloat16], "entropy")
    assert_close(h.grad, h_ref.grad, LINEAR_GRAD_TOL[torch.bfloat16], "hidden grad")
    assert_close(w.grad, w_ref.grad, LINEAR_GRAD_TOL[torch.bfloat16], "weight grad")


@pytest.mark.parametrize("given, target_is", [("probs", "logprobs"), ("logits", "probs")])
def test_wrong_teacher_encoding_raises(given, target_is, backend, gen):
    """teacher_logits given as probabilities with target_is="logprobs", or as logits with "probs": ValueError naming
    the argument (fused_kl's check, from the forward's statistics)."""
    hidden, weight = randn(2, 5, 19, gen=gen), randn(77, 19, gen=gen, scale=0.5)
    teacher = randn(2, 5, 77, gen=gen, scale=2.0)
    teacher = teacher.softmax(-1) if given == "probs" else teacher
    with pytest.raises(ValueError, match=f"teacher_logits must hold .*target_is='{target_is}'"):
        klops.fused_linear_kl(hidden, weight, teacher_logits=teacher, target_is=target_is, kind="jsd", backend=backend)


@pytest.mark.parametrize("target_is", ["logprobs", "probs"])
@pytest.mark.parametrize("kind", ["forward", "jsd"])
def test_teacher_check_statistics(kind, target_is, backend, gen):
    """linear_divergence_op leaves in max_t / logsum_t the largest log-prob (or negated probability) and the log of
    the mass of teacher_logits, merged over the vocabulary splits of the Triton sweep; 0 on invalid rows."""
    hidden, weight = randn(1, 9, 19, gen=gen), randn(301, 19, gen=gen, scale=0.5)
    teacher = torch.log_softmax(randn(1, 9, 301, gen=gen, scale=2.0), -1) - 0.2  # mass exp(-0.2)
    teacher = teacher if target_is == "logprobs" else teacher.exp()
    valid = torch.ones(1, 9, dtype=torch.bool, device=DEVICE)
    valid[0, 4] = False
    coef = 0.5 if kind == "jsd" else 0.0
    outputs = linear_divergence_op(
        hidden, weight, None, None, None, None, teacher, valid, None, kind, target_is, 1.0, coef, None, None, backend
    )
    t = teacher.double()
    want_top = t.amax(-1) if target_is == "logprobs" else (-t).amax(-1)
    want_mass = (t.exp() if target_is == "logprobs" else t).sum(-1).log()
    assert_close(outputs[3], torch.where(valid, want_top, 0.0), (1e-6, 1e-7), "top")
    assert_close(outputs[4], torch.where(valid, want_mass, 0.0), (1e-5, 1e-6), "log mass")


# ----------------------------------------------------------------------------------------------------
# the gradient formed in the forward (a scalar loss on the chunked path: klops::*_total) against recomputation


def _counted(monkeypatch, module, name):
    """Wraps module.name to count its calls; returns the list its calls append to."""
    calls, op = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *args: calls.append(1) or op(*args))
    return calls


def _scalar_losses(gen):
    """(name, function of (hidden, weight, bias, reduction) -> loss, the klops module and name of its total op) of
    every fused-linear loss that takes the gradient in the forward, and the valid rows of its (2, 5) inputs."""
    labels = torch.randint(0, 61, (2, 5), generator=gen).to(DEVICE)
    labels[1, 1:3] = -100
    t_hidden, t_weight, t_logits = randn(2, 5, 16, gen=gen), randn(61, 16, gen=gen), randn(2, 5, 61, gen=gen)
    top = torch.log_softmax(randn(2, 5, 61, gen=gen, scale=2.0), -1).topk(6, dim=-1)
    row_weights = randn(2, 5, gen=gen).abs()
    kl = dict(labels=labels, weights=row_weights, softcap=5.0)
    losses = {
        "cross_entropy": (lambda h, w, b, r, **kw: klops.fused_linear_cross_entropy(
            h, w, labels, bias=b, reduction=r, label_smoothing=0.1, z_loss=1e-3, softcap=5.0, backend="torch", **kw),
            klops.linear, "linear_cross_entropy_total_op"),
        "kl_hidden": (lambda h, w, b, r, **kw: klops.fused_linear_kl(
            h, w, t_hidden, t_weight, student_bias=b, kind="jsd", beta=0.3, reduction=r, backend="torch", **kl, **kw),
            klops.linear_divergence, "linear_divergence_total_op"),
        "kl_logits": (lambda h, w, b, r: klops.fused_linear_kl(
            h, w, teacher_logits=t_logits, student_bias=b, kind="reverse", reduction=r, backend="torch", **kl),
            klops.linear_divergence, "linear_divergence_total_op"),
        "kl_topk": (lambda h, w, b, r, **kw: klops.fused_linear_kl(
            h, w, klops.TopK(top.indices, top.values), student_bias=b, kind="forward", reduction=r, **kl, **kw),
            klops.topk, "linear_topk_divergence_total_op"),
    }  # fmt: skip
    return losses, labels != -100


@pytest.mark.parametrize("blocks", ["one", "several"])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_hidden", "kl_logits", "kl_topk"])
def test_gradient_in_forward_equals_recomputation(loss, reduction, blocks, gen, monkeypatch):
    """A scalar loss's gradient formed in the forward and scaled by the upstream gradient (0.37 here) in the backward
    equals the one recomputed from reduction="none" (the per-row ops, one row block), also accumulated over two calls
    (gradient accumulation), the per-row weights' gradient included; with one row block, or several of 2 rows (a
    ragged last one) so that the fp32 sums run over blocks."""
    losses, valid = _scalar_losses(gen)
    fn, module, total_op = losses[loss]
    calls = _counted(monkeypatch, module, total_op)
    tensors = randn(2, 5, 24, gen=gen), randn(61, 24, gen=gen, scale=0.5), randn(61, gen=gen)
    (ours, recomputed), _ = zip(leaves(*tensors), leaves(*tensors))
    normalizer = valid.sum() if reduction == "mean" else 1
    for _ in range(2):
        rows = fn(*recomputed, "none")
        (0.37 * (rows.sum() / normalizer)).backward()
    assert not calls
    if blocks == "several":
        monkeypatch.setattr(klops._chunked, "LINEAR_MIN_ROWS", {"cpu": 2, "cuda": 2})
        monkeypatch.setattr(klops._chunked, "LINEAR_CHUNK_ELEMENTS", {"cpu": 1, "cuda": 1})
    for _ in range(2):
        (0.37 * fn(*ours, reduction)).backward()
    assert len(calls) == 2, "the scalar loss did not take the gradient in the forward"
    assert_close(fn(*ours, reduction), rows.sum() / normalizer, (1e-6, 1e-7), "loss")
    for name, a, b in zip(("hidden", "weight", "bias"), ours, recomputed):
        assert a.grad.dtype == b.grad.dtype
        assert_close(a.grad, b.grad, (1e-5, 1e-6), f"{name} grad")


def test_gradient_in_forward_backward_twice_and_without_grad(gen, monkeypatch):
    """The saved gradients are scaled out of place: a second backward (retain_graph) adds the same gradient again;
    double backward raises (as the recomputing backward does); without a gradient wanted (no_grad, or no input
    requiring it) the per-row op runs and gives the same value."""
    hidden, weight = randn(2, 5, 24, gen=gen).requires_grad_(), randn(61, 24, gen=gen).requires_grad_()
    labels = torch.randint(0, 61, (2, 5), generator=gen).to(DEVICE)
    calls = _counted(monkeypatch, klops.linear, "linear_cross_entropy_total_op")
    loss = klops.fused_linear_cross_entropy(hidden, weight, labels, backend="torch")
    loss.backward(retain_graph=True)
    first = hidden.grad.clone(), weight.grad.clone()
    (2.0 * loss).backward(retain_graph=True)
    assert_close(hidden.grad, 3.0 * first[0], (1e-6, 0), "hidden grad")
    assert_close(weight.grad, 3.0 * first[1], (1e-6, 0), "weight grad")
    with pytest.raises(RuntimeError):
        (grad,) = torch.autograd.grad(loss, hidden, create_graph=True)
        grad.sum().backward()
    assert len(calls) == 1
    with torch.no_grad():
        value = klops.fused_linear_cross_entropy(hidden, weight, labels, backend="torch")
    frozen = klops.fused_linear_cross_entropy(hidden.detach(), weight.detach(), labels, backend="torch")
    assert len(calls) == 1 and not frozen.requires_grad
    assert_close(value, loss, (1e-6, 0), "no_grad loss")
    assert_close(frozen, loss, (1e-6, 0), "frozen loss")


def test_unit_upstream_gradient_taken_as_is(gen):
    """loss.backward() on the CPU hands the forward's fp32 gradients to autograd without scaling them: through a
    non-leaf hidden, and with two losses over the same tensors (their gradients summed), they equal the
    recomputing path's (reduction="none", summed)."""
    base, weight = randn(2, 5, 24, gen=gen).requires_grad_(), randn(61, 24, gen=gen).requires_grad_()
    labels = torch.randint(0, 61, (2, 5), generator=gen).to(DEVICE)
    grads = []
    for reduction in ("sum", "none"):
        hidden = base * 1.5
        losses = [klops.fused_linear_cross_entropy(hidden, weight, labels, reduction=reduction, backend="torch")
                  for _ in range(2)]  # fmt: skip
        sum(loss.sum() for loss in losses).backward()
        grads.append((base.grad, weight.grad))
        base.grad = weight.grad = None
    for (name, a), b in zip((("hidden", grads[0][0]), ("weight", grads[0][1])), grads[1]):
        assert_close(a, b, (1e-5, 1e-6), f"{name} grad")


@pytest.mark.skipif(DEVICE.type != "cpu", reason="the unit-gradient hand-over is the CPU's (a GPU's would sync)")
@pytest.mark.parametrize("loss", ["cross_entropy", "kl_hidden", "kl_topk"])
@pytest.mark.parametrize("reduction", ["sum", "mean", "num_items"])
def test_scalar_loss_makes_no_pass_over_the_weight_gradient(loss, reduction, gen):
    """loss.backward() of a scalar loss, "mean" and num_items included (their scale goes into the rows' upstream
    gradient inside the op): between the forward's products and the .grad, nothing touches a [V, D] tensor again
    (no scaling pass, no zero fill of the first block's sum nor of an unused output's gradient)."""
    losses, valid = _scalar_losses(gen)
    fn = losses[loss][0]
    hidden, weight = randn(2, 5, 24, gen=gen).requires_grad_(), randn(61, 24, gen=gen).requires_grad_()
    if reduction == "num_items":
        fn, reduction = functools.partial(fn, num_items=int(valid.sum()) + 3), "mean"
    with torch.profiler.profile(record_shapes=True) as profile:
        fn(hidden, weight, None, reduction).backward()
    passes = [e.name for e in profile.events() if [61, 24] in e.input_shapes and e.name in _PASSES]
    assert not passes, f"passes over the [V, D] weight gradient: {passes}"
    assert weight.grad is not None and torch.isfinite(weight.grad).all()


@pytest.mark.skipif("cpu" not in BACKENDS, reason="the gradient over the chunk's logits is the C++ CPU kernels'")
@pytest.mark.parametrize("op, sweeps", [("cross_entropy", 1), ("logprobs", 2), ("kl_hidden", 2), ("kl_logits", 1)])
def test_chunked_path_holds_one_block_per_sweep(op, sweeps, gen, monkeypatch):
    """Whatever the number of chunks (6 here), a sweep allocates one [C, V] block, which every chunk's logits reuse
    and the C++ kernels write the chunk's gradient over: one in all for a scalar loss (gradient in the forward), one
    per sweep for log-probs (forward, recomputing backward), one more for a teacher formed from its head."""
    monkeypatch.setattr(klops._chunked, "LINEAR_CHUNK_ELEMENTS", {"cpu": 16 * 5000})
    monkeypatch.setattr(klops._chunked, "LINEAR_MIN_ROWS", {"cpu": 16})
    N, V, D = 96, 5000, 8  # a [16, V] block (320 kB) outweighs the [V, D] weight gradient (160 kB)
    hidden, weight = torch.randn(N, D, generator=gen).requires_grad_(), torch.randn(V, D, generator=gen)
    labels, teacher = torch.randint(0, V, (N,), generator=gen), dict(teacher_logits=torch.randn(N, V, generator=gen))
    if op == "kl_hidden":
        teacher = dict(teacher_hidden=torch.randn(N, D, generator=gen), teacher_weight=torch.randn(V, D, generator=gen))
    loss = {
        "cross_entropy": lambda: klops.fused_linear_cross_entropy(hidden, weight.requires_grad_(), labels),
        "logprobs": lambda: klops.fused_linear_logprobs(hidden, weight.requires_grad_(), labels).sum(),
        "kl_hidden": lambda: klops.fused_linear_kl(hidden, weight.requires_grad_(), **teacher),
        "kl_logits": lambda: klops.fused_linear_kl(hidden, weight.requires_grad_(), **teacher),
    }[op]
    with torch.profiler.profile(profile_memory=True) as profile:
        loss().backward()
    blocks = [e.name for e in profile.events() if e.self_cpu_memory_usage >= 16 * V * 4]
    assert len(blocks) == sweeps, blocks


# the ops that would make a pass over a [V, D] tensor: scaling, filling, copying, adding
_PASSES = {"aten::mul", "aten::mul_", "aten::div", "aten::div_", "aten::fill_", "aten::zero_", "aten::zeros",
           "aten::zeros_like", "aten::copy_", "aten::clone", "aten::add", "aten::add_", "aten::_to_copy"}  # fmt: skip


def test_opcheck_gradient_in_forward(gen):
    """opcheck of the *_total ops, with and without bias and per-row weights (their gradient included)."""
    hidden, weight, bias = randn(1, 5, 8, gen=gen).requires_grad_(), randn(13, 8, gen=gen), randn(13, gen=gen)
    labels = torch.tensor([[0, 3, -100, 12, 7]], device=DEVICE)
    valid, teacher = labels != -100, randn(1, 5, 13, gen=gen)
    row_weight = randn(1, 5, gen=gen).abs().requires_grad_()
    for b, w in ((None, None), (bias.requires_grad_(), row_weight)):
        args = (hidden, weight.requires_grad_(), b, labels, w, 3.0, 0.1, 1e-3, -100, "torch")
        torch.library.opcheck(klops.linear.linear_cross_entropy_total_op, args)
        args = (hidden, weight, b, None, None, None, teacher, valid, w, "jsd", "logits", 1.2, 0.3, None, None, "torch")
        torch.library.opcheck(klops.linear_divergence.linear_divergence_total_op, args)
