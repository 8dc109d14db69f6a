"""The ops are single custom ops: opcheck passes and torch.compile(fullgraph=True) does not break."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

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
    for with_entropy, with_stats in ((True, False), (False, True)):
        torch.library.opcheck(logprobs_op, (z, labels, 0.7, with_entropy, with_stats, -100, backend))


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


class _RecordKlopsOps(TorchDispatchMode):
    """Records each klops:: op call (op, args, kwargs), forward and backward, with its inputs detached: floating
    tensors of a forward op keep requires_grad (so that opcheck checks its autograd), a backward op's drop it."""

    def __init__(self):
        super().__init__()
        self.calls = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "klops" and func.name() not in self.calls:
            backward = "backward" in func.name() or "gradient" in func.name()

            def detached(a):
                if not isinstance(a, torch.Tensor):
                    return a
                return a.detach().clone().requires_grad_(a.requires_grad and a.is_floating_point() and not backward)

            self.calls[func.name()] = (func, tuple(detached(a) for a in args), kwargs)
        return func(*args, **kwargs)


def _every_op_call(backend, gen):
    """One public call of each op family, forward and backward, on tiny inputs."""
    V, D = 30, 8
    z, y = randn(2, 3, V, gen=gen).requires_grad_(), randn(2, 3, V, gen=gen)
    labels = torch.randint(0, V, (2, 3), generator=gen).to(DEVICE)
    top = torch.log_softmax(y, dim=-1).topk(5, dim=-1)
    hidden, weight = randn(2, 3, D, gen=gen).requires_grad_(), randn(V, D, gen=gen).requires_grad_()
    x, on = randn(2, 5, 3, gen=gen).requires_grad_(), dict(backend=backend)
    topk, dense = klops.TopK(top.indices, top.values), dict(teacher_logits=y, kind="reverse")
    none, chunked = dict(reduction="none"), dict(backend="torch")
    losses = [
        klops.fused_kl(z, y, "jsd", beta=0.3, labels=labels, backend=backend),
        klops.fused_kl(z, klops.TopK(top.indices, top.values, tail="bin"), "skew_reverse", alpha=0.3, backend=backend),
        sum(klops.logprobs(z, labels, return_entropy=True, backend=backend)).sum(),
        sum(klops.forward_reverse_kl(z, y, backend=backend)).sum(),
        klops.fused_linear_logprobs(hidden, weight, labels, backend=backend).sum(),
        # a scalar loss on the chunked path (torch, cuda) forms its gradient in the forward (the *_total ops); per-row
        # losses and the Triton backend recompute
        *(klops.fused_linear_cross_entropy(hidden, weight, labels, **kw).sum() for kw in (on, on | none, chunked)),
        *(klops.fused_linear_kl(hidden, weight, **dense, **kw).sum() for kw in (on, on | none, chunked)),
        *(klops.fused_linear_kl(hidden, weight, topk, kind="alpha", alpha=0.7, **kw).sum() for kw in (on, on | none)),
        klops.sinkhorn_distill_loss(z[0], y[0], backend=backend),
        klops.sinkhorn(x=x, y=randn(2, 4, 3, gen=gen), epsilon=0.5, max_iter=4, tol=None, **on).objective.sum(),
    ]
    sum(losses).backward()


def test_opcheck_every_op(backend, gen):
    """torch.library.opcheck on every registered klops:: op, the backward ops included, with the arguments the
    public functions pass it; an op that no public call here reaches fails the test."""
    if backend == "cuda":
        pytest.skip("no CUDA kernels for Sinkhorn, AKL or the fused-linear ops; the other backends check the ops")
    with _RecordKlopsOps() as recorder:
        _every_op_call(backend, gen)
    registered = {name for name in torch._C._dispatch_get_all_op_names() if name.startswith("klops::")}
    if backend != "cpu":  # fused_kl's scalar form on the C++ CPU kernels (gradient in the forward)
        registered -= {"klops::divergence_total"}
    assert set(recorder.calls) == registered, f"ops no call here reaches: {sorted(registered - set(recorder.calls))}"
    for name, (op, args, kwargs) in sorted(recorder.calls.items()):
        try:
            torch.library.opcheck(op, args, kwargs)
        except Exception as error:
            raise AssertionError(f"opcheck of {name}") from error
