"""On a GPU (skipped without one): the op matrix (dense and top-k teachers) on a device that is not the
current one, no host sync in forward or backward, and capture of forward + backward in a CUDA graph.

With two GPUs the tensors live on cuda:1 while cuda:0 stays current (Hugging Face's device_map="auto"
puts the LM head on the last GPU), so a launch on the current device instead of the tensors' would
fault or read unordered memory; with one GPU the same tests run on it.
"""

import pytest
import torch

import klops
from klops.backend import available_backends
from klops.reference import fused_kl_reference, logprobs_reference

from .conftest import GRAD_TOL, LOSS_TOL, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

GPU_BACKENDS = available_backends(torch.device("cuda")) if torch.cuda.is_available() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = [("forward", {}), ("reverse", {}), ("jsd", dict(beta=0.3)), ("skew_forward", dict(alpha=0.2)),
         ("skew_reverse", dict(alpha=0.3)), ("tv", {}), ("alpha", dict(alpha=0.7))]  # fmt: skip


def tensor_device() -> torch.device:
    return torch.device("cuda", 1 if torch.cuda.device_count() >= 2 else 0)


def inputs(shape, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    student = (torch.randn(shape, generator=gen) * 2).to(dtype)
    teacher = (torch.randn(shape, generator=gen) * 2).to(dtype)
    labels = torch.randint(0, shape[-1], shape[:-1], generator=gen)
    labels.view(-1)[::5] = -100
    return student, teacher, labels


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind, coef", KINDS)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_kl_on_another_device(backend, kind, coef, dtype):
    student, teacher, labels = inputs((3, 9, 50257), dtype, seed=1)
    device = tensor_device()
    with torch.cuda.device(0):
        z = student[:, :-1].to(device).requires_grad_()  # sliced rows, odd V: every alignment
        loss = klops.fused_kl(z, teacher[:, 1:].to(device), kind, labels=labels[:, 1:].to(device),
                              backend=backend, **coef)  # fmt: skip
        loss.backward()
    assert loss.device == device and z.grad.device == device
    z_ref = student[:, :-1].clone().requires_grad_()
    ref = fused_kl_reference(z_ref, teacher[:, 1:], kind, labels=labels[:, 1:], **coef)
    ref.backward()
    assert_close(loss.cpu(), ref, LOSS_TOL[dtype], f"{kind} loss")
    assert_close(z.grad.cpu(), z_ref.grad, GRAD_TOL[dtype], f"{kind} grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tail", ["bin", "renormalize"])
@pytest.mark.parametrize("kind, coef", [kc for kc in KINDS if kc[0] != "reverse"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_topk_on_another_device(backend, kind, coef, tail, dtype):
    """A top-64 teacher over a 152064 vocabulary (Qwen2.5's), sliced student rows."""
    student, teacher, labels = inputs((2, 9, 152064), dtype, seed=5)
    top = torch.log_softmax(teacher[:, 1:].float(), dim=-1).topk(64, dim=-1)
    topk = klops.TopK(top.indices, top.values, tail)
    device = tensor_device()
    with torch.cuda.device(0):
        z = student[:, :-1].to(device).requires_grad_()
        on_device = klops.TopK(topk.indices.to(device), topk.logprobs.to(device), tail)
        loss = klops.fused_kl(z, on_device, kind, labels=labels[:, 1:].to(device), backend=backend, **coef)
        loss.backward()
    z_ref = student[:, :-1].clone().requires_grad_()
    ref = fused_kl_reference(z_ref, topk, kind, labels=labels[:, 1:], **coef)
    ref.backward()
    assert_close(loss.cpu(), ref, LOSS_TOL[dtype], f"{kind} loss")
    assert_close(z.grad.cpu(), z_ref.grad, GRAD_TOL[dtype], f"{kind} grad")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_logprobs_on_another_device(backend, dtype):
    logits, _, labels = inputs((2, 7, 32001), dtype, seed=2)
    device = tensor_device()
    with torch.cuda.device(0):
        z = logits[:, :-1].to(device).requires_grad_()
        logp, entropy = klops.logprobs(z, labels[:, 1:].to(device), return_entropy=True, backend=backend)
        (logp.sum() + entropy.sum()).backward()
    z_ref = logits[:, :-1].clone().requires_grad_()
    ref_logp, ref_entropy = logprobs_reference(z_ref, labels[:, 1:])
    (ref_logp.sum() + ref_entropy.sum()).backward()
    assert_close(logp.cpu(), ref_logp, LOSS_TOL[dtype], "logprob")
    assert_close(entropy.cpu(), ref_entropy, (1e-4, 1e-5), "entropy")
    assert_close(z.grad.cpu(), z_ref.grad, GRAD_TOL[dtype], "grad")


def _step(backend, student, teacher, labels):
    kl = klops.fused_kl(student, teacher, "jsd", beta=0.3, labels=labels, backend=backend)
    logp, entropy = klops.logprobs(student, labels, return_entropy=True, backend=backend)
    top = torch.log_softmax(teacher.float(), dim=-1).topk(16, dim=-1)
    sparse = klops.fused_kl(student, klops.TopK(top.indices, top.values), labels=labels, backend=backend)
    (kl + sparse - logp.mean() + 0.01 * entropy.mean()).backward()


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend):
    """Forward and backward with labels (their range check included) never wait for the GPU."""
    student, teacher, labels = (t.to(tensor_device()) for t in inputs((4, 32000), torch.bfloat16, seed=3))
    student.requires_grad_()
    _step(backend, student, teacher, labels)  # compile and load the kernels first
    torch.cuda.synchronize(student.device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(backend, student, teacher, labels)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend):
    """Forward + backward capture in a CUDA graph in eager mode and replay to the eager gradient."""
    device = tensor_device()
    student, teacher, labels = (t.to(device) for t in inputs((4, 32000), torch.bfloat16, seed=4))
    student.requires_grad_()
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                student.grad = None
                _step(backend, student, teacher, labels)
        torch.cuda.current_stream().wait_stream(side)
        expected = student.grad.clone()
        graph = torch.cuda.CUDAGraph()
        student.grad = None
        with torch.cuda.graph(graph):
            _step(backend, student, teacher, labels)
        graph.replay()
        torch.cuda.synchronize()
    assert_close(student.grad, expected, (0, 0), "replayed grad")
