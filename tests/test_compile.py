"""The ops are single custom ops: opcheck passes and torch.compile(fullgraph=True) does not break."""

import pytest
import torch

import klops
from klops.divergence import divergence_op
from klops.logprobs import logprobs_op

from .conftest import DEVICE, assert_close, randn


def test_opcheck_divergence(backend, gen):
    z = randn(2, 3, 40, gen=gen).requires_grad_()
    valid = torch.ones(2, 3, dtype=torch.bool, device=DEVICE)
    valid[0, 1] = False
    labels = torch.randint(0, 40, (2, 3), generator=gen).to(DEVICE)
    for kind, coef, row_labels in [("forward", 0.0, None), ("jsd", 0.3, labels), ("alpha", 1.5, None)]:
        args = (z, randn(2, 3, 40, gen=gen), valid, row_labels, kind, "logits", 1.3, coef, backend)
        torch.library.opcheck(divergence_op, args)


def test_opcheck_logprobs(backend, gen):
    z = randn(2, 3, 40, gen=gen).requires_grad_()
    labels = torch.randint(0, 40, (2, 3), generator=gen).to(DEVICE)
    labels[1, 2] = -100
    for with_entropy in (True, False):
        torch.library.opcheck(logprobs_op, (z, labels, 0.7, with_entropy, -100, backend))


def _loss_fn(backend):
    def loss_fn(student, teacher, labels):
        kl = klops.fused_kl(student, teacher, "jsd", beta=0.3, labels=labels, temperature=2.0, backend=backend)
        logp, entropy = klops.logprobs(student, labels, return_entropy=True, backend=backend)
        valid = labels != -100
        return kl - (logp * valid).sum() / valid.sum() + 0.01 * entropy.mean()

    return loss_fn


@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler, backend, gen):
    torch._dynamo.reset()
    student, teacher = randn(2, 6, 50, gen=gen), randn(2, 6, 50, gen=gen)
    labels = torch.randint(0, 50, (2, 6), generator=gen).to(DEVICE)
    labels[0, :2] = -100
    grads = []
    for fn in (_loss_fn(backend), torch.compile(_loss_fn(backend), backend=compiler, fullgraph=True)):
        z = student.clone().requires_grad_()
        fn(z, teacher, labels).backward()
        grads.append(z.grad)
    assert_close(grads[1], grads[0], (1e-5, 1e-6), "compiled grad")
