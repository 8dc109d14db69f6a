"""Property tests: random shapes, kinds, coefficients and temperatures against the reference."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import klops
from klops.kernels.kinds import BY_NAME
from klops.reference import fused_kl_reference, logprobs_reference

from .conftest import BACKENDS, DEVICE, GRAD_TOL, LOSS_TOL, assert_close

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@st.composite
def divergence_case(draw):
    kind = draw(st.sampled_from(klops.divergence.DIVERGENCE_KINDS))
    coef = draw(st.floats(0.05, 0.95))
    if kind == "alpha":
        coef = draw(st.sampled_from([-0.5, 0.25, 0.8, 1.7]))
    return dict(
        rows=draw(st.integers(0, 9)),
        vocab=draw(st.integers(1, 700)),
        kind=kind,
        coef=coef,
        temperature=draw(st.sampled_from([0.5, 1.0, 2.0])),
        scale=draw(st.sampled_from([0.1, 1.0, 4.0])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(case=divergence_case())
def test_fused_kl_random(backend, case):
    gen = torch.Generator().manual_seed(case["seed"])
    shape = (case["rows"], case["vocab"])
    student = (torch.randn(shape, generator=gen) * case["scale"]).to(DEVICE)
    teacher = (torch.randn(shape, generator=gen) * case["scale"]).to(DEVICE)
    coefficient = BY_NAME[case["kind"]].coefficient
    kw = dict(temperature=case["temperature"], reduction="sum") | ({coefficient: case["coef"]} if coefficient else {})
    z, z_ref = student.clone().requires_grad_(), student.clone().requires_grad_()
    loss = klops.fused_kl(z, teacher, case["kind"], backend=backend, **kw)
    ref = fused_kl_reference(z_ref, teacher, case["kind"], **kw)
    loss.backward(), ref.backward()
    # Each row's log-probabilities carry an fp32 offset of a few eps |logsum| (logsum <= log V + max |z/T|),
    # which the loss takes up to first order; Amari's alpha amplifies it by 1 / min(|a|, |1 - a|). So
    # floor the tolerance there (a divergence of 0, for V = 1 or p = q, is such an offset too).
    max_z = student.abs().max().item() if student.numel() else 0.0
    amplify = 1 / min(abs(case["coef"]), abs(1 - case["coef"])) if case["kind"] == "alpha" else 1.0
    loss_floor = 4 * 2**-23 * (math.log(case["vocab"]) + 2 * max_z / case["temperature"] + 1) * amplify
    assert_close(loss, ref, (1e-4, 1e-5), "loss", floor=max(1e-6, case["rows"] * loss_floor))
    # Where p ~ q the gradient is a difference of nearly equal fp32 log-probabilities: its absolute
    # error is a few eps * |log q| / T (|log q| up to max |z/T|) whatever its size, so floor the tolerance there.
    log_scale = (student.abs().max().item() if student.numel() else 0.0) / case["temperature"] + 1.0
    floor = 2 * 2**-23 * log_scale / case["temperature"]
    if case["kind"] == "alpha" and student.numel():
        # dz = (a - q sum a) / T with a = -p^alpha q^(1-alpha) / alpha: for alpha outside (0, 1) and p << q,
        # a is huge where q ~ 1 and cancels against q sum a, leaving an error of a few eps * max |a| / T.
        log_q = torch.log_softmax(student.double() / case["temperature"], -1)
        log_p = torch.log_softmax(teacher.double() / case["temperature"], -1)
        a_max = (torch.exp(case["coef"] * log_p + (1 - case["coef"]) * log_q) / abs(case["coef"])).max().item()
        floor = max(floor, 4 * 2**-23 * a_max / case["temperature"])
    assert_close(z.grad, z_ref.grad, GRAD_TOL[torch.float32], "grad", floor=floor)


@pytest.mark.parametrize("backend", BACKENDS)
@SETTINGS
@given(rows=st.integers(0, 9), vocab=st.integers(1, 700), dtype=st.sampled_from([torch.float32, torch.bfloat16]),
       temperature=st.sampled_from([0.5, 1.0, 2.0]), seed=st.integers(0, 2**31 - 1))  # fmt: skip
def test_logprobs_random(backend, rows, vocab, dtype, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(rows, vocab, generator=gen) * 3).to(dtype).to(DEVICE)
    labels = torch.randint(0, vocab, (rows,), generator=gen).to(DEVICE)
    z, z_ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    logp, entropy = klops.logprobs(z, labels, temperature=temperature, return_entropy=True, backend=backend)
    ref_logp, ref_entropy = logprobs_reference(z_ref, labels, temperature=temperature)
    (logp.sum() + entropy.sum()).backward(), (ref_logp.sum() + ref_entropy.sum()).backward()
    # Near one-hot rows have log-probs and entropies near 0, where what is left is fp32 rounding: of
    # (z - max) / T and logsum for the log-prob, and of log S (S = sum exp(d), near 1) and W / S for the
    # entropy (a few eps, whatever the logits' scale).
    eps = 2**-23
    max_z = logits.float().abs().max().item() if logits.numel() else 0.0
    assert_close(
        logp, ref_logp, LOSS_TOL[dtype], "logprob", floor=4 * eps * (2 * max_z / temperature + math.log(vocab) + 1)
    )
    assert_close(entropy, ref_entropy, (1e-4, 1e-5), "entropy", floor=16 * eps)
    assert_close(z.grad, z_ref.grad, GRAD_TOL[dtype], "grad")
