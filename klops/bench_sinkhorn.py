"""The Sinkhorn cases of ``klops bench``: ``sinkhorn`` on point clouds and ``sinkhorn_distill_loss`` (SinKD).

sinkhorn: B problems of n = m points in d dimensions, squared euclidean cost, a fixed number of iterations
(``tol=None``, so every implementation does the same work), loss ``sum_b <P_b, C_b>`` and its envelope
gradient to x. Against POT (``ot.sinkhorn``, log domain, on the same tensors: POT runs on torch tensors of
any device; solved on the detached cost, then differentiated with the plan fixed) and the plain PyTorch
loop over the materialized [B, n, m] cost. The work is compute: per iteration 2 B n m (3 d + 6) FLOPs and
2 B n m exps, reported as GFLOP/s, no byte count.

sinkhorn_distill_loss: N rows of V logits (T = 2, eps = 0.1, 20 iterations) against SinKD's published
procedure in plain PyTorch (softmax of both, ``cdist``, the plain-domain normalizations, autograd through
all) eager and under torch.compile. Its floor is reading both logits and writing the gradient once, but
the L1 cost is N^2 V work (3 FLOPs each, forward and backward): both rates are reported. Its fp32
gradient differs from float64's by up to ~1e-2 of the largest entry at V = 32000: the gradient of |p - q| is
sign(p - q), and where a student and a teacher probability agree to fp32 rounding the two signs can differ.
"""

import dataclasses
import importlib.util
import math

import torch

from . import reference
from ._eager import compile_when_called
from .bench_baselines import klops_backends
from .sinkhorn import sinkhorn, sinkhorn_distill_loss

SINKHORN_ITERATIONS = 50


@dataclasses.dataclass
class SinkhornCase:
    op: str  # "sinkhorn" | "sinkhorn_distill_loss"
    rows: int  # n = m points per problem, or N logit rows
    size: int  # d, or V
    dtype: torch.dtype = torch.float32
    batch: int = 1  # B problems of the sinkhorn case
    hidden: int = 0  # (not a fused-linear case)
    kind_label = None  # (no kind)

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        if self.op == "sinkhorn":
            return f"sinkhorn B={self.batch} n=m={self.rows} d={self.size} it={SINKHORN_ITERATIONS} {dtype}"
        return f"sinkhorn_distill_loss N={self.rows} V={self.size} {dtype}"

    @property
    def shape(self) -> dict:
        """The case's sizes by name, for the JSON report."""
        if self.op == "sinkhorn":
            return dict(B=self.batch, n=self.rows, m=self.rows, d=self.size, iterations=SINKHORN_ITERATIONS)
        return dict(N=self.rows, V=self.size)

    def min_bytes(self, backward: bool = True) -> int:
        """SinKD: both logits read once, and with the backward the gradient written once; sinkhorn: none worth
        counting (compute)."""
        return (2 + backward) * self.rows * self.size * self.dtype.itemsize if self.op == "sinkhorn_distill_loss" else 0

    def min_flops(self, backward: bool = True) -> int:
        """sinkhorn: the iterations' soft-min updates (the envelope backward adds one pass, not counted); SinKD:
        |p - q| and its sum in the forward, sign times dW in the backward."""
        if self.op == "sinkhorn":
            return SINKHORN_ITERATIONS * 2 * self.batch * self.rows**2 * (3 * self.size + 6)
        return 2 * (2 + backward) * self.rows**2 * self.size

    def inputs(self, device: torch.device, gen: torch.Generator):
        if self.op == "sinkhorn":
            shape = (self.batch, self.rows, self.size)
            return torch.randn(shape, generator=gen).to(device, self.dtype), torch.randn(shape, generator=gen).to(
                device, self.dtype
            )
        shape = (self.rows, self.size)
        return (torch.randn(shape, generator=gen) * 2).to(device, self.dtype), (
            torch.randn(shape, generator=gen) * 2
        ).to(device, self.dtype)

    def implementations(self, device: torch.device) -> dict:
        backends = klops_backends("sinkhorn", device, dtype=self.dtype)
        if self.op == "sinkhorn":
            epsilon = 0.05 * self.size  # squared distances of unit normals are ~2 d
            impls = {f"klops[{b}]": lambda x, y, b=b: _klops_sinkhorn(x, y, epsilon, b) for b in backends}
            if importlib.util.find_spec("ot") is not None:  # POT, where installed
                impls["POT (ot.sinkhorn, log)"] = lambda x, y: _pot_sinkhorn(x, y, epsilon)
            impls["torch loop"] = lambda x, y: _torch_loop_sinkhorn(x, y, epsilon)
            return impls
        impls = {f"klops[{b}]": lambda z, y, b=b: sinkhorn_distill_loss(z, y, backend=b) for b in backends}
        impls["torch eager (published)"] = _published_sinkd
        impls["torch.compile (published)"] = compile_when_called(_published_sinkd)
        return impls

    def check(self, name: str, impl, z, y) -> float:
        """Largest relative error of the loss and the gradient against float64, on a sub-problem."""
        if self.op == "sinkhorn":
            x, y = z[:1, :256].detach(), y[:1, :256]
            x_k, x_r = x.clone().requires_grad_(), x.double().requires_grad_()
            loss = impl(x_k, y)
            cost = torch.cdist(x_r, y.double()).square()
            f, g, plan, _ = reference.sinkhorn_reference(cost.detach(), *_uniform(x_r, y), 0.05 * self.size,
                                                         SINKHORN_ITERATIONS)  # fmt: skip
            ref = (plan * cost).sum()
        else:
            z = z[:64].detach()
            x_k, x_r = z.clone().requires_grad_(), z.double().requires_grad_()
            loss = impl(x_k, y[:64])
            ref = reference.sinkhorn_distill_reference(x_r, y[:64], envelope=name.startswith("klops"))
        loss.backward(), ref.backward()
        err = abs(loss.item() - ref.item()) / max(abs(ref.item()), 1e-12)
        grad_err = (x_k.grad.double() - x_r.grad).abs().max() / x_r.grad.abs().max().clamp(min=1e-30)
        return max(err, grad_err.item())


def cases(device: torch.device, quick: bool) -> list[SinkhornCase]:
    if device.type == "cuda":
        points = [(8, 4096, 64)] if not quick else [(8, 1024, 64)]
        sinkd = [(512, 32000)]
    else:
        points = [(2, 256, 16)] if quick else [(8, 1024, 64)]
        sinkd = [(32, 4000)] if quick else [(128, 32000)]
    return [SinkhornCase("sinkhorn", n, d, batch=b) for b, n, d in points] + [
        SinkhornCase("sinkhorn_distill_loss", n, v) for n, v in sinkd
    ]


def _uniform(x, y):
    B, n, m = x.shape[0], x.shape[1], y.shape[1]
    return torch.full((B, n), 1 / n, dtype=torch.float64, device=x.device), torch.full(
        (B, m), 1 / m, dtype=torch.float64, device=x.device
    )


def _klops_sinkhorn(x, y, epsilon, backend):
    result = sinkhorn(x=x, y=y, epsilon=epsilon, max_iter=SINKHORN_ITERATIONS, tol=None, backend=backend)
    return result.cost.sum()


def _pot_sinkhorn(x, y, epsilon):
    """POT's log-domain plan per problem on its cost matrix (solved on the detached cost: differentiating
    through POT's iterations holds every iteration's n x m temporaries), then <P, C> with P fixed."""
    import ot

    total = 0.0
    for xb, yb in zip(x, y):
        a = torch.full((xb.shape[0],), 1 / xb.shape[0], dtype=xb.dtype, device=xb.device)
        b = torch.full((yb.shape[0],), 1 / yb.shape[0], dtype=yb.dtype, device=yb.device)
        cost = ot.dist(xb, yb)
        plan = ot.sinkhorn(a, b, cost.detach(), epsilon, method="sinkhorn_log", numItermax=SINKHORN_ITERATIONS,
                           stopThr=0.0)  # fmt: skip
        total = total + (plan * cost).sum()
    return total


def _torch_loop_sinkhorn(x, y, epsilon):
    """The plain log-domain loop over the stored [B, n, m] cost; the plan's <P, C> differentiated with P fixed."""
    cost = torch.cdist(x, y).square()
    log_a = torch.full(x.shape[:2], -math.log(x.shape[1]), device=x.device)
    log_b = torch.full(y.shape[:2], -math.log(y.shape[1]), device=x.device)
    with torch.no_grad():
        c = cost.float()
        g = torch.zeros_like(log_b)
        for _ in range(SINKHORN_ITERATIONS):
            f = -epsilon * torch.logsumexp(log_b[:, None, :] + (g[:, None, :] - c) / epsilon, dim=2)
            g = -epsilon * torch.logsumexp(log_a[:, :, None] + (f[:, :, None] - c) / epsilon, dim=1)
        plan = torch.exp(log_a[:, :, None] + log_b[:, None, :] + (f[:, :, None] + g[:, None, :] - c) / epsilon)
    return (plan * cost).sum()


def _published_sinkd(student, teacher, temperature=2.0, epsilon=0.1, n_iter=20):
    """SinKD's loss as its authors' code computes it (without its 0.0008 weight), in the inputs' float32."""
    p_s = torch.softmax(student.float() / temperature, dim=1)
    p_t = torch.softmax(teacher.float() / temperature, dim=1)
    w = torch.cdist(p_s, p_t, p=1)
    plan = torch.exp(-w / epsilon)
    for _ in range(n_iter):
        plan = plan / plan.sum(1, keepdim=True)
        plan = plan / plan.sum(0, keepdim=True)
    return (plan * w).sum()
