"""On a GPU (skipped without one): the op matrix (dense and top-k teachers) on a device that is not the
current one, no host sync in forward or backward, and capture of forward + backward in a CUDA graph.

With two GPUs the tensors live on cuda:1 while cuda:0 stays current (Hugging Face's device_map="auto"
puts the LM head on the last GPU), so a launch on the current device instead of the tensors' would
fault or read unordered memory; with one GPU the same tests run on it.
"""

import math

import pytest
import torch

import klops
from klops.backend import available_backends
from klops.divergence import DIVERGENCE_KINDS
from klops.kernels.kinds import infinite_where_p_is_0
from klops.reference import fused_kl_reference, logprobs_reference

from .conftest import COEF, GRAD_TOL, LOSS_TOL, assert_close

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")

GPU_BACKENDS = available_backends(torch.device("cuda")) if torch.cuda.is_available() else []
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
KINDS = [(kind, COEF.get(kind, {})) for kind in DIVERGENCE_KINDS]


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
@pytest.mark.parametrize("kind, coef", [(k, c) for k, c in KINDS if not infinite_where_p_is_0(k, *c.values())])
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


@pytest.mark.skipif("cuda" not in GPU_BACKENDS, reason="needs klops._C")
def test_topk_cuda_vocabulary_limit():
    """The CUDA top-k forward keeps a bitmap of the row's ids in shared memory: it launches at its largest V
    (385024: 47 KiB of bits beside the kernel's static shared memory, within the 48 KiB of a default launch) and
    names the limit and the Triton backend one entry above it, where backend="auto" takes Triton."""
    limit = klops.backend.CUDA_TOPK_MAX_VOCAB
    student, teacher, _ = inputs((1, 2, limit), torch.float32, seed=6)
    top = torch.log_softmax(teacher, dim=-1).topk(16, dim=-1)
    topk = klops.TopK(top.indices.cuda(), top.values.cuda())
    z = student.cuda().requires_grad_()
    loss = klops.fused_kl(z, topk, "forward", backend="cuda")
    loss.backward()
    z_ref = student.clone().requires_grad_()
    ref = fused_kl_reference(z_ref, klops.TopK(top.indices, top.values), "forward")
    ref.backward()
    assert_close(loss.cpu(), ref, LOSS_TOL[torch.float32], "loss")
    assert_close(z.grad.cpu(), z_ref.grad, GRAD_TOL[torch.float32], "grad")
    wide = torch.nn.functional.pad(z.detach(), (0, 1), value=-math.inf)
    with pytest.raises(RuntimeError, match=f"the CUDA top-k kernels take V <= {limit}.*backend='triton'"):
        klops.fused_kl(wide, topk, "forward", backend="cuda")
    assert_close(klops.fused_kl(wide, topk, "forward").cpu(), ref, LOSS_TOL[torch.float32], "auto beyond the limit")


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


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op", ["logprobs", "cross_entropy", "forward", "jsd"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_fused_linear_on_another_device(backend, op, dtype):
    """The fused-linear ops at a GPT-2-sized head (V = 50257, odd; D = 512, the teacher's 384) on sliced hidden
    states [:, :-1], with a bias and a soft cap, against float64 logits formed explicitly."""
    gen = torch.Generator().manual_seed(6)
    hidden, weight = torch.randn(2, 65, 512, generator=gen).to(dtype), (torch.randn(50257, 512, generator=gen) / 16)
    bias, weight = torch.randn(50257, generator=gen).to(dtype), weight.to(dtype)
    t_hidden, t_weight = torch.randn(2, 65, 384, generator=gen).to(dtype), (torch.randn(50257, 384, generator=gen) / 16)
    t_weight = t_weight.to(dtype)
    labels = torch.randint(0, 50257, (2, 64), generator=gen)
    labels[:, :9] = -100

    def run(h, w, b, t_h, t_w, y, backend):  # klops
        if op == "logprobs":
            logp, entropy = klops.fused_linear_logprobs(h, w, y, bias=b, softcap=30.0, temperature=0.7,
                                                         return_entropy=True, backend=backend)  # fmt: skip
            return (logp - 0.5 * entropy).sum()
        if op == "cross_entropy":
            return klops.fused_linear_cross_entropy(h, w, y, bias=b, softcap=30.0, label_smoothing=0.1, z_loss=1e-3,
                                                    backend=backend)  # fmt: skip
        beta = dict(beta=0.3) if op == "jsd" else {}
        return klops.fused_linear_kl(h, w, t_h, t_w, student_bias=b, kind=op, softcap=30.0, labels=y, backend=backend,
                                     **beta)  # fmt: skip

    def reference(h, w, b, t_h, t_w, y):  # float64, the logits formed explicitly
        z = 30.0 * torch.tanh((h @ w.T + b) / 30.0)
        if op == "logprobs":
            logp, entropy = logprobs_reference(z, y, temperature=0.7)
            return (logp - 0.5 * entropy).sum()
        if op == "cross_entropy":
            valid = y != -100
            lse = torch.logsumexp(z, dim=-1)[valid]
            ce = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1), label_smoothing=0.1)
            return ce + 1e-3 * lse.square().mean()
        beta = dict(beta=0.3) if op == "jsd" else {}
        return fused_kl_reference(z, 30.0 * torch.tanh(t_h @ t_w.T / 30.0), op, labels=y, **beta)

    device = tensor_device()
    with torch.cuda.device(0):
        h, w, b = (x.to(device).requires_grad_() for x in (hidden, weight, bias))
        loss = run(h[:, :-1], w, b, t_hidden[:, 1:].to(device), t_weight.to(device), labels.to(device), backend)
        loss.backward()
    refs = [x.detach().double().requires_grad_() for x in (hidden, weight, bias)]
    ref = reference(refs[0][:, :-1], *refs[1:], t_hidden[:, 1:].double(), t_weight.double(), labels)
    ref.backward()
    assert_close(loss.cpu(), ref, (2e-2, 2e-2) if dtype != torch.float32 else (1e-4, 1e-6), f"{op} loss")
    for name, ours, expected in zip(("hidden", "weight", "bias"), (h, w, b), refs):
        assert ours.grad.dtype == dtype
        tol = (5e-2, 2e-2) if dtype != torch.float32 else (1e-3, 1e-4)
        assert_close(ours.grad.cpu(), expected.grad, tol, f"{op} {name} grad")


def _step(backend, student, teacher, labels):
    kl = klops.fused_kl(student, teacher, "jsd", beta=0.3, labels=labels, backend=backend)
    logp, entropy = klops.logprobs(student, labels, return_entropy=True, backend=backend)
    top = torch.log_softmax(teacher.float(), dim=-1).topk(16, dim=-1)
    sparse = klops.fused_kl(student, klops.TopK(top.indices, top.values), labels=labels, backend=backend)
    (kl + sparse - logp.mean() + 0.01 * entropy.mean()).backward()


def _linear_step(backend, hidden, weight, teacher_hidden, labels):
    kl = klops.fused_linear_kl(hidden, weight, teacher_hidden, weight, kind="jsd", beta=0.3, labels=labels,
                               backend=backend)  # fmt: skip
    ce = klops.fused_linear_cross_entropy(hidden, weight, labels, backend=backend)
    logp, entropy = klops.fused_linear_logprobs(hidden, weight, labels, return_entropy=True, backend=backend)
    (kl + ce - logp.mean() + 0.01 * entropy.mean()).backward()


def _steps(backend, seed):
    """The row ops' step and the fused-linear ops' step, each on its own inputs: [(step, inputs), ...]."""
    device = tensor_device()
    student, teacher, labels = (t.to(device) for t in inputs((4, 32000), torch.bfloat16, seed=seed))
    gen = torch.Generator().manual_seed(seed)
    hidden, teacher_hidden = (torch.randn(64, 256, generator=gen).to(device, torch.bfloat16) for _ in range(2))
    weight = (torch.randn(32000, 256, generator=gen) / 16).to(device, torch.bfloat16)
    hidden_labels = torch.randint(0, 32000, (64,), generator=gen).to(device)
    linear_args = (hidden.requires_grad_(), weight.requires_grad_(), teacher_hidden, hidden_labels)
    return [(_step, (student.requires_grad_(), teacher, labels)), (_linear_step, linear_args)]


@pytest.mark.parametrize("step", [0, 1], ids=["row ops", "fused-linear ops"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_no_host_sync(backend, step):
    """Forward and backward with labels (their range check included) never wait for the GPU."""
    fn, args = _steps(backend, seed=3)[step]
    fn(backend, *args)  # compile and load the kernels first
    torch.cuda.synchronize(args[0].device)
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn(backend, *args)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("step", [0, 1], ids=["row ops", "fused-linear ops"])
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_cuda_graph_capture(backend, step):
    """Forward + backward capture in a CUDA graph in eager mode and replay to the eager gradient."""
    fn, args = _steps(backend, seed=4)[step]
    leaf = args[0]
    with torch.cuda.device(leaf.device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                leaf.grad = None
                fn(backend, *args)
        torch.cuda.current_stream().wait_stream(side)
        expected = leaf.grad.clone()
        graph = torch.cuda.CUDAGraph()
        leaf.grad = None
        with torch.cuda.graph(graph):
            fn(backend, *args)
        graph.replay()
        torch.cuda.synchronize()
    # the fused-linear backward adds with atomics: equal up to the order of fp32 sums, rounded to bf16
    assert_close(leaf.grad, expected, (0, 0) if step == 0 else (1e-2, 1e-3), "replayed grad")
