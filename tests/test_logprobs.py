"""klops.logprobs (log-softmax-gather and entropy) against the float64 reference (docs/losses.md §2, §7)."""

import math

import pytest
import torch

import klops
from klops.logprobs import logprobs_op
from klops.reference import logprobs_reference, logprobs_row_stats_reference

from .conftest import DEVICE, GRAD_TOL, LABEL_DTYPES, LOSS_TOL, assert_close, empty_rows, randn


def labels_for(shape, V, gen, ignore_every=0):
    labels = torch.randint(0, V, shape, generator=gen)
    if ignore_every:
        labels.view(-1)[::ignore_every] = -100
    return labels.to(DEVICE)


def check(logits, labels, backend, dtype=torch.float32, with_entropy=True, **kw):
    """Forward and backward (random grad_output on both outputs) against the reference."""
    z = logits.detach().clone().requires_grad_()
    z_ref = logits.detach().clone().requires_grad_()
    ref_logp, ref_entropy = logprobs_reference(z_ref, labels, **kw)
    g_logp = torch.randn(labels.shape, dtype=torch.float64).to(DEVICE)
    g_entropy = torch.randn(labels.shape, dtype=torch.float64).to(DEVICE)
    if with_entropy:
        logp, entropy = klops.logprobs(z, labels, return_entropy=True, backend=backend, **kw)
        assert_close(entropy, ref_entropy, LOSS_TOL[dtype], "entropy")
        torch.autograd.backward([logp, entropy], [g_logp.float(), g_entropy.float()])
        torch.autograd.backward([ref_logp, ref_entropy], [g_logp, g_entropy])
    else:
        logp = klops.logprobs(z, labels, backend=backend, **kw)
        (logp * g_logp).sum().backward()
        ref_logp.backward(g_logp)
    assert logp.dtype == torch.float32 and logp.shape == labels.shape
    assert_close(logp, ref_logp, LOSS_TOL[dtype], "logprob")
    assert z.grad.dtype == logits.dtype
    assert_close(z.grad, z_ref.grad, GRAD_TOL[dtype], "logits grad")


@pytest.mark.parametrize("with_entropy", [True, False])
@pytest.mark.parametrize("shape", [(13, 67), (3, 4097), (2, 3, 331)])
def test_matches_reference(shape, with_entropy, backend, gen):
    logits = randn(*shape, gen=gen, scale=2.0)
    check(logits, labels_for(shape[:-1], shape[-1], gen, ignore_every=5), backend, with_entropy=with_entropy)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision(dtype, backend, gen):
    check(randn(19, 301, gen=gen, dtype=dtype, scale=3.0), labels_for((19,), 301, gen), backend, dtype)


@pytest.mark.parametrize("temperature", [0.3, 3.0])
def test_temperature(temperature, backend, gen):
    check(randn(11, 129, gen=gen, scale=2.0), labels_for((11,), 129, gen), backend, temperature=temperature)


def test_large_logits(backend, gen):
    """Entropy is accumulated relative to the running max, so 1e4 logits lose no precision."""
    logits = randn(6, 97, gen=gen, scale=1e4)
    logits[:, 5] = logits.max(dim=-1).values - 0.5  # a second entry near the max: entropy ~ 0.47
    labels = labels_for((6,), 97, gen)
    logp, entropy = klops.logprobs(logits, labels, return_entropy=True, backend=backend)
    ref_logp, ref_entropy = logprobs_reference(logits, labels)
    assert_close(logp, ref_logp, (1e-6, 1e-6), "logprob")
    assert_close(entropy, ref_entropy, (1e-4, 1e-5), "entropy")
    assert (entropy > 0.4).all()


def test_neg_inf_logits(backend, gen):
    logits = randn(8, 150, gen=gen)
    logits[:, 140:] = -math.inf
    logits[::3, 10:20] = -math.inf
    check(logits, labels_for((8,), 140, gen), backend)


def test_fully_ignored(backend, gen):
    """All labels ignored: zeros out, zero gradient, no NaN even with NaN logits in those rows."""
    logits = randn(4, 5, 70, gen=gen)
    logits[0, 0, 3] = math.nan
    z = logits.clone().requires_grad_()
    logp, entropy = klops.logprobs(z, torch.full((4, 5), -100, device=DEVICE), return_entropy=True, backend=backend)
    (logp.sum() + entropy.sum()).backward()
    assert (logp == 0).all() and (entropy == 0).all() and (z.grad == 0).all()


def test_empty_batch(backend):
    z = torch.zeros(0, 33, device=DEVICE, requires_grad=True)
    logp, entropy = klops.logprobs(
        z, torch.zeros(0, dtype=torch.long, device=DEVICE), return_entropy=True, backend=backend
    )
    (logp.sum() + entropy.sum()).backward()
    assert logp.shape == (0,) and entropy.shape == (0,) and z.grad.shape == (0, 33)


def test_non_contiguous(backend, gen):
    """logits[:, :-1] with labels[:, 1:] (the usual shift) is read in place."""
    logits, labels = randn(3, 9, 120, gen=gen), labels_for((3, 9), 120, gen)
    check(logits[:, :-1], labels[:, 1:], backend)


@pytest.mark.parametrize("dtype", LABEL_DTYPES)
def test_label_dtypes(dtype, backend, gen):
    """Labels of every integer dtype, on every backend (uint8 with ignore_index 255)."""
    labels = labels_for((7,), 50, gen)
    ignore_index = 255 if dtype == torch.uint8 else -100
    labels[2] = ignore_index
    check(randn(7, 50, gen=gen), labels.to(dtype), backend, ignore_index=ignore_index)


def test_empty_rows_in_every_layout(backend, gen):
    """N = 0 in each leading layout (logits[:, :-1] of length-1 sequences among them)."""
    for layout, logits in empty_rows(45, gen).items():
        z = logits.detach().clone().requires_grad_()
        labels = torch.zeros(logits.shape[:-1], dtype=torch.long, device=DEVICE)
        logp, entropy = klops.logprobs(z, labels, return_entropy=True, backend=backend)
        (logp.sum() + entropy.sum()).backward()
        assert logp.shape == labels.shape and entropy.shape == labels.shape, layout
        assert z.grad.shape == logits.shape, layout


def row_stats_case(gen, shape, dtype):
    """Logits with the pitfalls of the row statistics: a row whose max is tied before the label (not top-1), one
    tied after it (top-1), one whose label is the unique max, -inf entries, ignored rows."""
    logits = randn(*shape, gen=gen, scale=2.0, dtype=dtype)
    V = shape[-1]
    labels = labels_for(shape[:-1], V, gen, ignore_every=7)
    rows, flat_labels = logits.view(-1, V), labels.view(-1)
    flat_labels[:3] = torch.tensor([V - 2, 1, V // 2])
    rows[0, 0] = rows[0, V - 2] = rows[0].max() + 1  # tie, the first before the label: not top-1
    rows[1, 1] = rows[1, V - 1] = rows[1].max() + 1  # tie, the label first: top-1
    rows[2, V // 2] = rows[2].max() + 1  # the unique max
    rows[3, ::3] = -math.inf
    return logits, labels


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(9, 67), (5, 4099)])
def test_row_stats_match_reference(shape, dtype, backend, gen):
    """return_row_stats: log sum q^2, mean z / T and the first argmax against float64, from the same sweep; the
    log-prob, entropy and gradients are those without it."""
    logits, labels = row_stats_case(gen, shape, dtype)
    z = logits.detach().clone().requires_grad_()
    out = klops.logprobs(z, labels, temperature=0.7, return_entropy=True, return_row_stats=True, backend=backend)
    assert isinstance(out, klops.LogprobOutputs) and out.is_top1.dtype == torch.bool
    log_sum_sq, mean, top1 = logprobs_row_stats_reference(logits, labels, temperature=0.7)
    finite = torch.isfinite(mean)
    assert_close(out.log_sum_sq_probs, log_sum_sq, LOSS_TOL[dtype], "log_sum_sq_probs")
    assert_close(out.mean_logits[finite], mean[finite], LOSS_TOL[dtype], "mean_logits")
    assert torch.equal(out.mean_logits[~finite], mean[~finite].float())  # -inf entries give a -inf mean
    assert torch.equal(out.is_top1, top1), (out.is_top1, top1)
    assert top1.view(-1)[:3].tolist() == [False, True, True]
    z2 = logits.detach().clone().requires_grad_()
    logp, entropy = klops.logprobs(z2, labels, temperature=0.7, return_entropy=True, backend=backend)
    assert torch.equal(out.logprob, logp) and torch.equal(out.entropy, entropy)
    (out.logprob.sum() + out.entropy.sum()).backward()
    (logp.sum() + entropy.sum()).backward()
    assert torch.equal(z.grad, z2.grad)
    without_entropy = klops.logprobs(logits, labels, temperature=0.7, return_row_stats=True, backend=backend)
    assert without_entropy.entropy is None and torch.equal(without_entropy.is_top1, out.is_top1)


def test_out_of_range_label_is_never_read(backend, gen):
    """Past the checks (the op called directly), a label outside [0, V) gives a NaN log-prob (Triton,
    CUDA) or an error (torch's gather), never a read outside the row."""
    logits = randn(1, 3, 64, gen=gen)
    labels = torch.tensor([[5, 64, 1 << 40]], device=DEVICE)
    try:
        logp, *_ = logprobs_op(logits, labels, 1.0, False, False, -100, backend)
    except (RuntimeError, IndexError):
        assert backend == "torch"
        return
    assert torch.isfinite(logp[0, 0]) and torch.isnan(logp[0, 1:]).all()


def test_module_wrapper(backend, gen):
    logits, labels = randn(4, 60, gen=gen), labels_for((4,), 60, gen)
    module = klops.nn.LogProbs(temperature=0.7, return_entropy=True, backend=backend)
    logp, entropy = module(logits, labels)
    ref_logp, ref_entropy = klops.logprobs(logits, labels, temperature=0.7, return_entropy=True, backend=backend)
    assert torch.equal(logp, ref_logp) and torch.equal(entropy, ref_entropy)


def test_reference_gradcheck(gen):
    logits = torch.randn(4, 9, generator=gen, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([1, -100, 8, 0])
    torch.autograd.gradcheck(lambda z: logprobs_reference(z, labels, temperature=0.8), (logits,))


def test_reference_known_values():
    q = torch.tensor([[0.25, 0.75]], dtype=torch.float64)
    logp, entropy = logprobs_reference(q.log(), torch.tensor([1]))
    assert math.isclose(logp.item(), math.log(0.75), rel_tol=1e-12)
    assert math.isclose(entropy.item(), -(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), rel_tol=1e-12)


def test_torch_backend_chunks(gen, monkeypatch):
    """Chunks of 4 rows (ragged last chunk) give the reference values too."""
    monkeypatch.setattr(klops._chunked, "TORCH_CHUNK_ELEMENTS", 4 * 90)
    check(randn(2, 11, 90, gen=gen), labels_for((2, 11), 90, gen, ignore_every=4), "torch")


def test_vocab_256k(backend, gen):
    """V = 262144, bf16, labels near both ends of the vocabulary."""
    labels = torch.tensor([0, 262143, 131071], device=DEVICE)
    check(randn(3, 262144, gen=gen, dtype=torch.bfloat16, scale=3.0), labels, backend, torch.bfloat16)
