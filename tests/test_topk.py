"""fused_kl / fused_linear_kl with a sparse klops.TopK teacher against the float64 reference, every backend."""

import math

import pytest
import torch

import klops
from klops.kernels.kinds import infinite_where_p_is_0
from klops.reference import fused_kl_reference, logprobs_reference
from klops.topk import topk_divergence_op

from .conftest import COEF, DEVICE, GRAD_TOL, LOSS_TOL, assert_close, empty_rows, randn

KINDS = klops.divergence.DIVERGENCE_KINDS
# Kinds that are infinite where the teacher is 0 (at their tested coefficient) are errors with tail="renormalize".
RENORMALIZE_KINDS = [kind for kind in KINDS if not infinite_where_p_is_0(kind, *COEF.get(kind, {}).values())]
TEMPERATURE_CASES = [("bin", "forward"), ("bin", "reverse"), ("renormalize", "jsd"), ("bin", "alpha")]
TAIL_KINDS = [("bin", kind) for kind in KINDS] + [("renormalize", kind) for kind in RENORMALIZE_KINDS]


def teacher_topk(rows, V, k, gen, tail="bin", dtype=torch.float32, scale=2.0):
    """The top-k of a random teacher's log-probs, shuffled within each row (order must not matter)."""
    log_p = torch.log_softmax(randn(*rows, V, gen=gen, scale=scale).double(), dim=-1)
    idx = log_p.topk(k, dim=-1).indices
    shuffle = torch.argsort(torch.rand(idx.shape, generator=gen), dim=-1).to(DEVICE)
    idx = idx.gather(-1, shuffle)
    return klops.TopK(idx, log_p.gather(-1, idx).to(dtype), tail)


def check(student, topk, kind, backend, dtype=torch.float32, grad_out=None, **kw):
    """klops against the float64 reference on the same inputs: loss and student gradient."""
    z = student.detach().clone().requires_grad_()
    loss = klops.fused_kl(z, topk, kind, backend=backend, **kw)
    z_ref = student.detach().clone().requires_grad_()
    ref = fused_kl_reference(z_ref, topk, kind, **kw)
    g = torch.ones_like(ref) if grad_out is None else grad_out
    loss.backward(g.to(loss.dtype))
    ref.backward(g.to(ref.dtype))
    assert loss.dtype == torch.float32 and z.grad.dtype == student.dtype
    assert_close(loss, ref, LOSS_TOL[dtype], f"{kind} loss")
    assert_close(z.grad, z_ref.grad, GRAD_TOL[dtype], f"{kind} grad")
    return loss, z.grad


# k = 1, 16 and V (no tail) at an odd V; at V one past 4096 (several blocks) k = 300 also spans more than
# one block of members (MAX_BLOCK_K = 256).
@pytest.mark.parametrize("shape,k", [((13, 67), 1), ((13, 67), 16), ((13, 67), 67), ((3, 4097), 1), ((3, 4097), 300)])
@pytest.mark.parametrize("tail,kind", TAIL_KINDS)
def test_matches_reference(tail, kind, shape, k, backend, gen):
    *rows, V = shape
    topk = teacher_topk(rows, V, k, gen, tail)
    check(randn(*shape, gen=gen, scale=2.0), topk, kind, backend, **COEF.get(kind, {}))


@pytest.mark.parametrize("tail", ["bin", "renormalize"])
@pytest.mark.parametrize("kind", ["forward", "jsd", "tv", "alpha"])
def test_k_equal_v_is_the_dense_op(kind, tail, backend, gen):
    """With every id in the top-k there is no tail: the dense op on the teacher's (renormalized) log-probs."""
    V = 37
    student, topk = randn(6, V, gen=gen, scale=2.0), teacher_topk((6,), V, V, gen, tail)
    dense = torch.empty_like(student).scatter_(-1, topk.indices, topk.logprobs)
    if tail == "renormalize":
        dense = torch.log_softmax(dense, dim=-1)
    kw = dict(reduction="none", temperature=1.7, **COEF.get(kind, {}))
    got = klops.fused_kl(student, topk, kind, backend=backend, **kw)
    assert_close(got, klops.fused_kl(student, dense, kind, target_is="logprobs", backend=backend, **kw), (1e-5, 1e-6))


@pytest.mark.parametrize("temperature", [0.3, 3.0])
@pytest.mark.parametrize("tail,kind", TEMPERATURE_CASES)
def test_temperature(tail, kind, temperature, backend, gen):
    topk = teacher_topk((11,), 129, 8, gen, tail)
    check(randn(11, 129, gen=gen, scale=2.0), topk, kind, backend, temperature=temperature, **COEF.get(kind, {}))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tail,kind", [("bin", "forward"), ("bin", "skew_reverse"), ("renormalize", "tv")])
def test_low_precision(tail, kind, dtype, backend, gen):
    topk = teacher_topk((17,), 301, 20, gen, tail, dtype=dtype)
    check(randn(17, 301, gen=gen, dtype=dtype, scale=3.0), topk, kind, backend, dtype, **COEF.get(kind, {}))


def test_sliced_student(backend, gen):
    """logits[:, :-1] with a TopK of [B, L-1, k]: the rows are indexed by two strides, never copied."""
    logits = randn(3, 9, 211, gen=gen, scale=2.0)
    topk = teacher_topk((3, 8), 211, 12, gen)
    loss, grad = check(logits[:, :-1], topk, "forward", backend)
    assert grad.shape == (3, 8, 211)


def test_sliced_student_with_a_transposed_upstream_gradient(backend, gen):
    """logits[:, :-1] (rows by two strides) and reduction="none" with an upstream gradient stored transposed: the
    backward's per-member values then inherit a non-contiguous layout, which every backend must accept."""
    logits = randn(3, 9, 211, gen=gen, scale=2.0)
    topk = teacher_topk((3, 8), 211, 12, gen)
    grad_out = torch.rand(8, 3, generator=gen).to(DEVICE).t()
    check(logits[:, :-1], topk, "jsd", backend, grad_out=grad_out, reduction="none", beta=0.3)


def test_tiny_student_tail_keeps_precision(backend, gen):
    """The student puts all but ~1e-11 of its mass on the top-k, the teacher 5% outside it: the tail term
    0.05 log(0.05 / Q) needs Q to full relative precision, which 1 - sum q_S (rounding ~1e-7) cannot give."""
    V, k = 500, 10
    student = randn(4, V, gen=gen)
    idx = torch.stack([torch.randperm(V, generator=gen)[:k] for _ in range(4)]).to(DEVICE)
    student.scatter_(-1, idx, 30.0)
    logprobs = torch.full((4, k), math.log(0.95 / k), dtype=torch.float32, device=DEVICE)
    loss, _ = check(student, klops.TopK(idx, logprobs), "forward", backend, reduction="none")
    assert (loss > 1.0).all()  # 0.05 log(0.05 / 1e-11) ~ 1.1


def test_teacher_mass_above_one_gives_no_tail(backend, gen):
    """sum p_S = 1 + 1e-5 (rounding in a stored teacher): the teacher's tail is 0, never NaN. Reverse KL is
    then infinite (the student has mass where the teacher has none), every other kind finite."""
    V, k = 64, 5
    idx = torch.arange(k, device=DEVICE).expand(3, k)
    logprobs = torch.full((3, k), math.log((1 + 1e-5) / k), device=DEVICE)
    for kind in KINDS:
        z = randn(3, V, gen=gen).requires_grad_()
        loss = klops.fused_kl(z, klops.TopK(idx, logprobs), kind, backend=backend, **COEF.get(kind, {}))
        if kind == "reverse":
            assert loss.item() == math.inf
            continue
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(z.grad).all(), kind
        check(z.detach(), klops.TopK(idx, logprobs), kind, backend, **COEF.get(kind, {}))


@pytest.mark.parametrize("tail", ["bin", "renormalize"])
def test_neg_inf_logits(tail, backend, gen):
    """A padded vocabulary: -inf student logits outside the top-k mean q = 0 there and never give NaN."""
    V = 300
    student = randn(5, V, gen=gen)
    student[:, 250:] = -math.inf
    log_p = torch.log_softmax(randn(5, V, gen=gen).masked_fill(student == -math.inf, -math.inf), dim=-1)
    idx = log_p.topk(7, dim=-1).indices
    topk = klops.TopK(idx, log_p.gather(-1, idx), tail)
    for kind in ["forward", "jsd", "tv"]:
        loss, grad = check(student, topk, kind, backend, **COEF.get(kind, {}))
        assert torch.isfinite(grad).all() and (grad[:, 250:] == 0).all()


def test_masks_weights_and_num_items(backend, gen):
    """labels / mask select rows, weights scale them, num_items divides the sum; an ignored row's ids are not
    checked (padding rows may hold anything)."""
    V, k = 97, 6
    student = randn(2, 7, V, gen=gen)
    topk = teacher_topk((2, 7), V, k, gen)
    labels = torch.randint(0, V, (2, 7), generator=gen).to(DEVICE)
    labels[0, 2] = -100
    mask = torch.ones(2, 7, dtype=torch.bool, device=DEVICE)
    mask[1, 4] = False
    bad_ids = topk.indices.clone()
    bad_ids[0, 2] = 0  # duplicated and ignored
    bad_ids[1, 4, 0] = V + 5  # out of range and masked
    weights = torch.rand(2, 7, generator=gen).to(DEVICE)
    for kw in (dict(labels=labels, mask=mask), dict(labels=labels, mask=mask, weights=weights, num_items=11)):
        loss = klops.fused_kl(student, klops.TopK(bad_ids, topk.logprobs), backend=backend, **kw)
        assert_close(loss, fused_kl_reference(student, topk, **kw), LOSS_TOL[torch.float32], f"{sorted(kw)}")
        check(student, topk, "forward", backend, **kw)
    z = student.clone().requires_grad_()
    klops.fused_kl(z, klops.TopK(bad_ids, topk.logprobs), labels=labels, mask=mask, backend=backend).backward()
    assert (z.grad[0, 2] == 0).all() and (z.grad[1, 4] == 0).all()


@pytest.mark.parametrize("tail", ["bin", "renormalize"])
def test_fully_masked(tail, backend, gen):
    z = randn(4, 50, gen=gen).requires_grad_()
    topk = teacher_topk((4,), 50, 5, gen, tail)
    loss = klops.fused_kl(z, topk, mask=torch.zeros(4, device=DEVICE), backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and (z.grad == 0).all()


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_empty_rows_in_every_layout(reduction, backend, gen):
    for layout, student in empty_rows(40, gen).items():
        topk = klops.TopK(torch.zeros(*student.shape[:-1], 3, dtype=torch.long, device=DEVICE),
                          torch.zeros(*student.shape[:-1], 3, device=DEVICE))  # fmt: skip
        z = student.detach().clone().requires_grad_()
        loss = klops.fused_kl(z, topk, reduction=reduction, backend=backend)
        loss.sum().backward()
        assert loss.shape == (student.shape[:-1] if reduction == "none" else ()), layout
        assert z.grad.shape == student.shape and float(loss.sum()) == 0.0, layout


def test_teacher_gets_no_gradient(backend, gen):
    topk = teacher_topk((5,), 80, 4, gen)
    logprobs = topk.logprobs.clone().requires_grad_()
    z = randn(5, 80, gen=gen).requires_grad_()
    klops.fused_kl(z, klops.TopK(topk.indices, logprobs), backend=backend).backward()
    assert logprobs.grad is None and z.grad is not None


@pytest.mark.parametrize("bad_id", [-1, "V"])
def test_ids_outside_the_vocabulary_are_never_read(bad_id, backend, gen):
    """Called below the eager checks (as under torch.compile, where they are device-side asserts), an id
    outside [0, V) gives NaN, not an out-of-bounds read. The torch backend's gather raises instead."""
    if backend == "torch":
        pytest.skip("the torch backend indexes with gather, which raises")
    V = 70
    ids = torch.tensor([[[3, 9, V if bad_id == "V" else -1]]], dtype=torch.int32, device=DEVICE).sort(-1).values
    out = topk_divergence_op(randn(1, 1, V, gen=gen), ids, torch.full((1, 1, 3), -2.0, device=DEVICE),
                             torch.ones(1, 1, dtype=torch.bool, device=DEVICE), None,
                             "forward", "bin", 1.0, 0.0, 0.0, 0.0, backend)  # fmt: skip
    assert torch.isnan(out[0]).all()


def test_auto_takes_triton_beyond_the_cuda_vocabulary_limit(monkeypatch):
    """backend="auto" where it would take the CUDA top-k kernels: Triton for V above their limit (the bitmap of
    csrc/topk.cu's kMaxTopkVocab), CUDA up to it; an explicit backend="cuda" stays (and its op names the limit)."""
    monkeypatch.setattr(klops.backend, "CUDA_EXTENSION_PROBLEM", None)
    monkeypatch.setattr(klops.backend, "available_backends", lambda device: ["cuda", "triton", "torch"])
    limit, device = klops.backend.CUDA_TOPK_MAX_VOCAB, torch.device("cuda")
    assert limit == 47 * 1024 * 8
    assert klops.backend.resolve("topk", "auto", device, vocab=limit) == "cuda"
    assert klops.backend.resolve("topk", "auto", device, vocab=limit + 1) == "triton"
    assert klops.backend.resolve("topk", "cuda", device, vocab=limit + 1) == "cuda"


def test_bad_input(gen):
    V = 30
    z = randn(4, V, gen=gen)
    good = teacher_topk((4,), V, 3, gen)
    cases = [
        (lambda: klops.TopK(good.indices.float(), good.logprobs), TypeError, "integer"),
        (lambda: klops.TopK(good.indices, good.logprobs.long()), TypeError, "logprobs must have dtype"),
        (lambda: klops.TopK(good.indices, good.logprobs[:, :2]), ValueError, "one shape"),
        (lambda: klops.TopK(good.indices, good.logprobs, tail="mass"), ValueError, "tail must be one of"),
        (lambda: klops.fused_kl(z[:3], good), ValueError, r"shape \(3, 3\)"),
        (lambda: klops.fused_kl(z, klops.TopK(good.indices + V, good.logprobs)), ValueError, r"lie in \[0, 30\)"),
        (lambda: klops.fused_kl(z, klops.TopK(good.indices[:, [0, 0, 1]], good.logprobs)), ValueError, "distinct"),
        (
            lambda: klops.fused_kl(z, klops.TopK(good.indices, good.logprobs, "renormalize"), "reverse"),
            ValueError,
            "infinite",
        ),  # fmt: skip
        (
            lambda: klops.fused_kl(z, klops.TopK(good.indices, good.logprobs, "renormalize"), "jsd", beta=1.0),
            ValueError,
            "kind='jsd' is infinite",
        ),  # fmt: skip
        (
            lambda: klops.fused_kl(z, klops.TopK(good.indices, good.logprobs, "renormalize"), "alpha", alpha=-0.5),
            ValueError,
            "infinite",
        ),  # fmt: skip
        (lambda: klops.fused_kl(z[:, :2], klops.TopK(good.indices % 2, good.logprobs)), ValueError, "more than"),
        (lambda: klops.fused_kl(z, good, target_is="probs"), ValueError, "carries its log-probs"),
        (lambda: klops.fused_kl(z, good, "forward", beta=0.3), ValueError, "takes no coefficient"),
    ]
    for call, error, message in cases:
        with pytest.raises(error, match=message):
            call()


def test_compile_fullgraph(gen):
    """One graph through fused_kl with a TopK built inside the compiled function."""
    V = 64
    topk = teacher_topk((2, 5), V, 4, gen)

    def step(z, idx, lp):
        return klops.fused_kl(z, klops.TopK(idx, lp), "forward", temperature=2.0, backend="torch")

    z = randn(2, 5, V, gen=gen).requires_grad_()
    loss = torch.compile(step, fullgraph=True)(z, topk.indices, topk.logprobs)
    loss.backward()
    z_ref = z.detach().clone().requires_grad_()
    ref = fused_kl_reference(z_ref, topk, temperature=2.0)
    ref.backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], "compiled loss")
    assert_close(z.grad, z_ref.grad, GRAD_TOL[torch.float32], "compiled grad")


@pytest.mark.parametrize("tail,kind", [("bin", "forward"), ("bin", "jsd"), ("renormalize", "skew_reverse")])
def test_fused_linear(tail, kind, backend, gen):
    """fused_linear_kl with the TopK in the teacher_hidden position, hidden[:, :-1] sliced, bias and softcap:
    gradients to hidden, weight and bias equal autograd through the float64 reference."""
    D, V = 24, 150
    hidden = randn(2, 6, D, gen=gen)[:, :-1]
    weight, bias = randn(V, D, gen=gen, scale=0.3), randn(V, gen=gen, scale=0.1)
    topk = teacher_topk((2, 5), V, 9, gen, tail)
    kw = dict(kind=kind, temperature=1.3, **COEF.get(kind, {}))
    params = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
    loss = klops.fused_linear_kl(params[0], params[1], topk, student_bias=params[2], softcap=5.0, backend=backend, **kw)
    loss.backward()
    ref_params = [t.detach().double().requires_grad_() for t in (hidden, weight, bias)]
    logits = 5.0 * torch.tanh((ref_params[0] @ ref_params[1].T + ref_params[2]) / 5.0)
    ref = fused_kl_reference(logits, topk, **kw)
    ref.backward()
    assert_close(loss, ref, LOSS_TOL[torch.float32], "loss")
    for name, got, want in zip(("hidden", "weight", "bias"), params, ref_params):
        assert_close(got.grad, want.grad, GRAD_TOL[torch.float32], f"grad {name}")


def test_fused_linear_bad_input(gen):
    hidden, weight = randn(4, 8, gen=gen), randn(30, 8, gen=gen)
    topk = teacher_topk((4,), 30, 3, gen)
    with pytest.raises(ValueError, match="takes no teacher_weight"):
        klops.fused_linear_kl(hidden, weight, topk, weight)
    with pytest.raises(ValueError, match=r"shape \(3, 3\)"):
        klops.fused_linear_kl(hidden[:3], weight, topk)


@pytest.mark.parametrize("tail", ["bin", "renormalize"])
def test_with_label_logprobs(tail, backend, gen):
    """D and log q(label) from one op against a TopK teacher; the label is sometimes one of the top-k ids
    (its member correction and its onehot meet) and sometimes not; one backward sweep writes both gradients."""
    V = 150
    student = randn(3, 6, V, gen=gen, scale=2.0)
    topk = teacher_topk((3, 6), V, 9, gen, tail)
    labels = torch.randint(0, V, (3, 6), generator=gen).to(DEVICE)
    labels[:, ::2] = topk.indices[:, ::2, 3]  # every other label among the ids
    labels[1, 1] = -100
    z = student.detach().clone().requires_grad_()
    rows, logp, teacher_logp = klops.divergence.divergence_and_label_logprobs(
        z, topk, labels, "jsd", beta=0.3, temperature=1.6, backend=backend
    )
    g_rows, g_logp = randn(3, 6, gen=gen), randn(3, 6, gen=gen)
    ((rows * g_rows).sum() + (logp * g_logp).sum()).backward()
    z_ref = student.detach().clone().requires_grad_()
    keep = labels != -100
    ref_rows = fused_kl_reference(z_ref, topk, "jsd", beta=0.3, temperature=1.6, mask=keep, reduction="none")
    ref_logp, _ = logprobs_reference(z_ref, labels, temperature=1.6)
    ((ref_rows * g_rows).sum() + (ref_logp * g_logp).sum()).backward()
    assert teacher_logp is None
    assert_close(rows, ref_rows, LOSS_TOL[torch.float32], "rows")
    assert_close(logp, ref_logp, LOSS_TOL[torch.float32], "logp")
    assert_close(z.grad, z_ref.grad, GRAD_TOL[torch.float32], "grad")


# ----------------------------------------------------------------------------------------------------
# TopK log-probs are checked: no entry above 0, their mass not above 1 (within _inputs.teacher_tolerance)


def test_topk_of_raw_logits_raises(backend, gen):
    """A TopK built from raw logits instead of log-probs (a finite, wrong loss without the check): ValueError
    naming the argument, in fused_kl and in fused_linear_kl (the TopK in the teacher_hidden position); and
    log-probs whose mass exceeds 1 (a top-k renormalized to 1, then scaled)."""
    V, k = 500, 20
    logits = randn(2, 3, V, gen=gen, scale=2.0)
    top = logits.topk(k, dim=-1)
    student = randn(2, 3, V, gen=gen)
    with pytest.raises(ValueError, match=r"teacher_logits \(TopK.logprobs\) must hold log-probabilities.*above 0"):
        klops.fused_kl(student, klops.TopK(top.indices, top.values), backend=backend)
    hidden, weight = randn(2, 3, 16, gen=gen), randn(V, 16, gen=gen)
    with pytest.raises(ValueError, match=r"teacher_hidden \(TopK.logprobs\) must hold log-probabilities"):
        klops.fused_linear_kl(hidden, weight, klops.TopK(top.indices, top.values), backend=backend)
    over = torch.log_softmax(top.values, -1) + math.log(1.5)  # each entry < 0, mass 1.5
    with pytest.raises(ValueError, match=r"probabilities sum to, got 1\.5"):
        klops.fused_kl(student, klops.TopK(top.indices, over), backend=backend)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rounded_topk_passes_and_ignored_rows_are_not_checked(dtype, backend, gen):
    """The top-k of log_softmax rounded to the dtype passes, k = V included (mass 1 up to rounding); rows masked
    or ignored may hold raw logits."""
    V = 300
    student = randn(4, V, gen=gen)
    for k in (8, V):
        topk = teacher_topk((4,), V, k, gen, dtype=dtype, scale=3.0)
        assert torch.isfinite(klops.fused_kl(student, topk, backend=backend))
        raw = topk.logprobs.clone()
        raw[1] = 5.0
        mask = torch.tensor([1, 0, 1, 1], device=DEVICE)
        assert torch.isfinite(klops.fused_kl(student, klops.TopK(topk.indices, raw), mask=mask, backend=backend))


def test_topk_check_under_compile(gen):
    """Compiled with fullgraph, the check is a device-side assertion (RuntimeError on the CPU), no graph break."""
    torch._dynamo.reset()
    V = 64
    topk = teacher_topk((2, 5), V, 4, gen)

    def step(z, idx, lp):
        return klops.fused_kl(z, klops.TopK(idx, lp), "forward", backend="torch")

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z = randn(2, 5, V, gen=gen)
    assert torch.isfinite(compiled(z, topk.indices, topk.logprobs))
    with pytest.raises(RuntimeError, match=r"teacher_logits \(TopK.logprobs\) must hold log-probabilities"):
        compiled(z, topk.indices, topk.logprobs + 3.0)
