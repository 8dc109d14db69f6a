"""``klops.sinkhorn``: batched log-domain Sinkhorn, the Sinkhorn divergence and SinKD (docs/losses.md §5).

Layers: ``kernels/sinkhorn.py`` (Triton soft-min updates from a cost matrix or from points, the points'
envelope gradient, SinKD's L1 cost between softmax rows and its backward), the torch backend below (the
same math, chunked), the solver loop ``_solve``, the custom ops ``klops::sinkhorn`` /
``klops::softmax_l1_cost`` and the public functions.

Potentials ``f [B, n]``, ``g [B, m]`` define the plan ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``. An
iteration is the two soft-min updates

    f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps)        g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)

from ``g = 0``. After the g update the columns of P sum to b exactly; the next f update ``f'`` gives the row
sums ``r_i = a_i exp((f_i - f'_i)/eps)`` for free, hence the marginal error ``sum_i |r_i - a_i|``, and the
same pass gives the Gibbs-weighted mean cost ``cbar_i``, hence ``<P, C> = sum_i r_i cbar_i``: no n x m
plan is formed unless asked for. With a ``tol``, the error is computed at the checks, every ``check_every``
iterations and at the last one, and read on the host there (the only syncs); a last check above tol warns
(SinkhornConvergenceWarning). Without one it is computed after the last iteration only, never read.
"""

import math
import warnings
from typing import NamedTuple

import torch

from . import _inputs
from ._chunked import log_softmax_from_stats
from .backend import launcher_table, resolve
from .distributed import is_sharded
from .logprobs import logprobs_op

__all__ = [
    "SinkhornResult", "SinkhornConvergenceWarning", "sinkhorn", "sinkhorn_divergence", "sinkhorn_distill_loss",
    "COST_FNS",
]  # fmt: skip

COST_FNS = ("sqeuclidean", "l1")
# The torch backend holds a few [B, rows, m] temporaries per chunk of rows: cap a chunk at this many entries.
CHUNK_ELEMENTS = 1 << 22
# Marginals must sum to 1 within this (absolute) tolerance.
MARGINAL_SUM_TOL = 1e-4


class SinkhornConvergenceWarning(RuntimeWarning):
    """``sinkhorn`` ran ``max_iter`` iterations and some problem's marginal error is still above ``tol``."""


class SinkhornResult(NamedTuple):
    """What ``sinkhorn`` returns, per problem of the batch.

    f [B, n], g [B, m]: potentials, ``P_ij = a_i b_j exp((f_i + g_j - C_ij)/eps)``.
    cost [B]: ``<P, C>``. objective [B]: the entropic value ``<a, f> + <b, g>`` (the dual of
    ``min_P <P, C> + eps KL(P | a b^T)``). iterations: f/g updates run. marginal_error [B]:
    ``sum_i |sum_j P_ij - a_i|`` (the columns are exact). converged [B] bool: ``marginal_error < tol``; None
    with ``tol=None`` (no target, and nothing read on the host). plan [B, n, m] with ``return_plan=True``, else
    None.
    """

    f: torch.Tensor
    g: torch.Tensor
    cost: torch.Tensor
    objective: torch.Tensor
    iterations: int
    marginal_error: torch.Tensor
    converged: torch.Tensor | None
    plan: torch.Tensor | None


class _Geometry(NamedTuple):
    """Where the cost comes from: a matrix [B, n, m], or points x [B, n, d], y [B, m, d] and a cost function."""

    cost: torch.Tensor | None
    x: torch.Tensor | None
    y: torch.Tensor | None
    cost_fn: str

    @property
    def shape(self) -> tuple[int, int, int]:
        if self.cost is not None:
            return tuple(self.cost.shape)
        return self.x.shape[0], self.x.shape[1], self.y.shape[1]

    def transposed(self) -> "_Geometry":
        cost = None if self.cost is None else self.cost.transpose(1, 2)
        return _Geometry(cost, self.y, self.x, self.cost_fn)

    def rows(self, rows: slice, dtype: torch.dtype) -> torch.Tensor:
        """The dense cost of ``rows``, [B, len(rows), m], in ``dtype`` (differentiable)."""
        if self.cost is not None:
            return self.cost[:, rows].to(dtype)
        return pairwise_cost(self.x[:, rows].to(dtype), self.y.to(dtype), self.cost_fn)


def pairwise_cost(x: torch.Tensor, y: torch.Tensor, cost_fn: str) -> torch.Tensor:
    """[B, n, m] cost between x [B, n, d] and y [B, m, d]: ``sum_k (x_ik - y_jk)^2`` or ``sum_k |x_ik - y_jk|``."""
    if cost_fn == "l1":
        return torch.cdist(x, y, p=1)
    dots = torch.baddbmm(y.square().sum(-1)[:, None, :], x, y.transpose(1, 2), alpha=-2)
    return (dots + x.square().sum(-1)[:, :, None]).clamp_min(0)


def _row_blocks(n: int, row_elements: int):
    step = max(1, CHUNK_ELEMENTS // max(1, row_elements))
    return [slice(start, min(n, start + step)) for start in range(0, n, step)]


# ----------------------------------------------------------------------------------------------------
# torch backend, chunked over rows (differentiable: unroll=True runs it under autograd).


def softmin_torch(geometry: _Geometry, h, log_w, eps: float):
    """(out, cbar), each [B, n]: ``out_i = -eps lse_j(log w_j + (h_j - C_ij)/eps)`` and the mean of
    ``C_i.`` under the weights ``softmax_j(log w_j + (h_j - C_ij)/eps)``; both 0 where every weight is 0."""
    B, n, m = geometry.shape
    outs, cbars = [], []
    for rows in _row_blocks(n, B * m):
        c = geometry.rows(rows, h.dtype)
        t = log_w[:, None, :] + (h[:, None, :] - c) / eps
        lse = torch.logsumexp(t, dim=-1)
        empty = lse == -math.inf
        weights = torch.exp(t - torch.where(empty, 0.0, lse)[..., None])
        outs.append(torch.where(empty, 0.0, -eps * lse))
        cbars.append(torch.where(empty, 0.0, (weights * torch.where(weights > 0, c, 0.0)).sum(-1)))
    return torch.cat(outs, 1), torch.cat(cbars, 1)


def _plan_rows(rows: slice, c, log_a, log_b, f, g, eps: float) -> torch.Tensor:
    """``a_i b_j exp((f_i + g_j - C_ij)/eps)`` of ``rows``, [B, len(rows), m], from their cost ``c``."""
    return torch.exp(log_a[:, rows, None] + log_b[:, None, :] + (f[:, rows, None] + g[:, None, :] - c) / eps)


def plan_torch(geometry: _Geometry, log_a, log_b, f, g, eps: float) -> torch.Tensor:
    """The dense plan [B, n, m] ``a_i b_j exp((f_i + g_j - C_ij)/eps)``."""
    B, n, m = geometry.shape
    blocks = [_plan_rows(rows, geometry.rows(rows, f.dtype), log_a, log_b, f, g, eps) for rows in _row_blocks(n, B * m)]
    return torch.cat(blocks, 1)


def points_gradient_torch(x, y, f, g, log_a, log_b, eps: float, cost_fn: str) -> torch.Tensor:
    """[B, n, d]: ``sum_j P_ij dc(x_i, y_j)/dx_i`` (``2 (x_i - y_j)`` or ``sign(x_i - y_j)``)."""
    geometry = _Geometry(None, x, y, cost_fn)
    B, n, m = geometry.shape
    x, y = geometry.x.to(f.dtype), geometry.y.to(f.dtype)
    per_row = B * m * (x.shape[-1] if geometry.cost_fn == "l1" else 1)
    blocks = []
    for rows in _row_blocks(n, per_row):
        p = _plan_rows(rows, pairwise_cost(x[:, rows], y, geometry.cost_fn), log_a, log_b, f, g, eps)
        if geometry.cost_fn == "l1":
            blocks.append((p[..., None] * torch.sign(x[:, rows, None, :] - y[:, None, :, :])).sum(2))
        else:
            blocks.append(2 * (p.sum(-1)[..., None] * x[:, rows] - p @ y))
    return torch.cat(blocks, 1)


_launchers = launcher_table(  # (softmin, points_gradient)
    triton=("klops.kernels.sinkhorn:softmin", "klops.kernels.sinkhorn:points_gradient"),
    torch=(softmin_torch, points_gradient_torch),
)


@torch.library.custom_op("klops::sinkhorn_points_gradient", mutates_args=())
def points_gradient_op(
    x: torch.Tensor, y: torch.Tensor, f: torch.Tensor, g: torch.Tensor, log_a: torch.Tensor, log_b: torch.Tensor,
    eps: float, cost_fn: str, backend: str,
) -> torch.Tensor:  # fmt: skip
    """[B, n, d] (the potentials' dtype): ``sum_j P_ij dc(x_i, y_j)/dx_i``, streamed (no n x m tensor on Triton)."""
    _, points_gradient = _launchers(backend)
    return points_gradient(x, y, f, g, log_a, log_b, eps, cost_fn).to(f.dtype)


@points_gradient_op.register_fake
def _(x, y, f, g, log_a, log_b, eps, cost_fn, backend):
    return x.new_empty(x.shape, dtype=f.dtype)


# ----------------------------------------------------------------------------------------------------
# the solver


def _solve(geometry: _Geometry, log_a, log_b, schedule: list[float], tol: float | None, check_every: int,
           backend: str, symmetric: bool = False):  # fmt: skip
    """Runs the iterations with the regularizations of ``schedule`` (one per iteration, ending at eps) and
    returns (f, g, cost, objective, marginal_error, iterations).

    ``symmetric`` (OT(a, a) on a symmetric cost, for the divergence's debiasing terms): g = f and the averaged
    update ``f <- (f + T(f)) / 2``, T(f) the soft-min of f, one pass per iteration (GeomLoss's; the plain
    alternation oscillates on these problems and converges far more slowly)."""
    softmin, _ = _launchers(backend)
    transposed = geometry.transposed()
    eps = schedule[-1]
    g = log_b.new_zeros(log_b.shape)
    f, _ = softmin(geometry, g, log_b, schedule[0])
    worst = math.inf  # the largest marginal error at the latest check
    for k, eps_k in enumerate(schedule, 1):
        if symmetric:
            g = f
        else:
            g, _ = softmin(transposed, f, log_a, eps_k)
        f_next, cbar = softmin(geometry, g, log_b, eps_k)  # the next f update, and the row sums of (f, g)
        last = k == len(schedule)
        checking = tol is not None and (last or k % check_every == 0) and eps_k == eps
        if last or checking:
            row_mass = torch.exp(log_a + (f - f_next) / eps_k)
            error = (row_mass - log_a.exp()).abs().sum(-1)
            if checking:
                worst = float(error.detach().max()) if error.numel() else 0.0  # the host sync of a check
            if last or (checking and worst < tol):
                break
        f = 0.5 * (f + f_next) if symmetric else f_next
    if tol is not None and not worst < tol:
        _warn_not_converged(error, tol, worst, k)
    cost = (row_mass * cbar).sum(-1)
    objective = _dot(log_a, f) + _dot(log_b, g)
    return f, g, cost, objective, error, k


def _warn_not_converged(error: torch.Tensor, tol: float, worst: float, iterations: int) -> None:
    """SinkhornConvergenceWarning: how many problems missed tol after the last iteration, and by how much."""
    missed = int((~(error.detach() < tol)).sum())  # a second read, on this failure path only
    warnings.warn(
        f"sinkhorn did not converge: after max_iter={iterations} iterations the marginal error of {missed} of "
        f"{error.numel()} problems is above tol={tol:.3g}, the largest {worst:.3g} ({worst / tol:.3g} times tol); "
        "raise max_iter, epsilon or check the inputs (result.converged says which problems)",
        SinkhornConvergenceWarning,
        stacklevel=3,
    )


def _weighted(log_w, h):
    """exp(log_w) h, with 0 for entries of weight 0 (whatever h is there)."""
    return torch.where(log_w > -math.inf, log_w.exp() * h, 0.0)


def _dot(log_w, h):
    """<exp(log_w), h> per problem."""
    return _weighted(log_w, h).sum(-1)


@torch.library.custom_op("klops::sinkhorn", mutates_args=())
def sinkhorn_op(
    cost: torch.Tensor | None,
    x: torch.Tensor | None,
    y: torch.Tensor | None,
    log_a: torch.Tensor,
    log_b: torch.Tensor,
    cost_fn: str,
    schedule: list[float],
    tol: float | None,
    check_every: int,
    backend: str,
    symmetric: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> (f [B, n], g [B, m], cost [B], objective [B], marginal_error [B], iterations (0-d int64))."""
    f, g, value, objective, error, iterations = _solve(
        _Geometry(cost, x, y, cost_fn), log_a, log_b, schedule, tol, check_every, backend, symmetric
    )
    g = g.clone() if g is f else g  # the symmetric solve's g is f; a custom op's outputs may not alias
    return f, g, value, objective, error, torch.tensor(iterations)


@sinkhorn_op.register_fake
def _(cost, x, y, log_a, log_b, cost_fn, schedule, tol, check_every, backend, symmetric):
    B = log_a.shape[0]
    new = log_a.new_empty
    return new(log_a.shape), new(log_b.shape), new(B), new(B), new(B), torch.empty((), dtype=torch.int64)


def _sinkhorn_setup(ctx, inputs, output):
    cost, x, y, log_a, log_b, cost_fn, schedule, tol, check_every, backend, _symmetric = inputs
    f, g, *_ = output
    ctx.save_for_backward(cost, x, y, log_a, log_b, f, g)
    ctx.params = (cost_fn, schedule[-1], backend)


def _sinkhorn_backward(ctx, _grad_f, _grad_g, grad_cost, grad_objective, _grad_error, _grad_iterations):
    """Envelope theorem: d/dC = P, d/dx through the cost, d/dlog a = a f, d/dlog b = b g, scaled per problem by
    the sum of the gradients of ``cost`` and ``objective`` (as POT's ``sinkhorn2`` does for ``<P, C>``)."""
    cost, x, y, log_a, log_b, f, g = ctx.saved_tensors
    cost_fn, eps, backend = ctx.params
    grads = [grad for grad in (grad_cost, grad_objective) if grad is not None]
    if not grads:
        return (None,) * 11
    scale = sum(grads)
    geometry = _Geometry(cost, x, y, cost_fn)
    d_cost = d_x = d_y = None
    if cost is not None and ctx.needs_input_grad[0]:
        d_cost = (scale[:, None, None] * plan_torch(geometry, log_a, log_b, f, g, eps)).to(cost.dtype)
    if x is not None and ctx.needs_input_grad[1]:
        d_x = (scale[:, None, None] * points_gradient_op(x, y, f, g, log_a, log_b, eps, cost_fn, backend)).to(x.dtype)
    if y is not None and ctx.needs_input_grad[2]:
        d_y = (scale[:, None, None] * points_gradient_op(y, x, g, f, log_b, log_a, eps, cost_fn, backend)).to(y.dtype)
    d_log_a = scale[:, None] * _weighted(log_a, f)
    d_log_b = scale[:, None] * _weighted(log_b, g)
    return d_cost, d_x, d_y, d_log_a, d_log_b, None, None, None, None, None, None


torch.library.register_autograd("klops::sinkhorn", _sinkhorn_backward, setup_context=_sinkhorn_setup)


# ----------------------------------------------------------------------------------------------------
# input checks


def _check_float3(name: str, t, dims: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.dim() != 3:
        raise ValueError(f"{name} must have shape {dims}, got {tuple(t.shape)}")
    _inputs.check_none(torch.isnan(t), t, f"{name} must not contain NaN")


def _geometry(cost, x, y, cost_fn) -> _Geometry:
    if (cost is None) == (x is None and y is None):
        raise ValueError("give either cost [B, n, m] or the points x [B, n, d] and y [B, m, d], not both")
    if cost is not None:
        if cost_fn is not None:
            raise ValueError("cost_fn applies to points x, y; a given cost matrix takes none")
        _check_float3("cost", cost, "[B, n, m]")
        if cost.shape[1] == 0 or cost.shape[2] == 0:
            raise ValueError(f"cost must have n >= 1 and m >= 1, got shape {tuple(cost.shape)}")
        return _Geometry(cost, None, None, "sqeuclidean")
    if x is None or y is None:
        raise ValueError("the points need both x [B, n, d] and y [B, m, d]")
    _check_float3("x", x, "[B, n, d]")
    _check_float3("y", y, "[B, m, d]")
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2] or x.device != y.device:
        raise ValueError(f"x [B, n, d] and y [B, m, d] must share B, d and device, got {tuple(x.shape)} on "
                         f"{x.device} and {tuple(y.shape)} on {y.device}")  # fmt: skip
    if x.shape[1] == 0 or y.shape[1] == 0:
        raise ValueError(f"x and y need at least one point each, got {tuple(x.shape)} and {tuple(y.shape)}")
    cost_fn = "sqeuclidean" if cost_fn is None else cost_fn
    _inputs.check_choice("cost_fn", cost_fn, COST_FNS)
    return _Geometry(None, x, y, cost_fn)


def _log_marginal(name: str, w, B: int, n: int, ref: torch.Tensor, dtype) -> torch.Tensor:
    """log of the marginal ``w`` [B, n] (uniform when None), checked: nonnegative, no NaN, sums to 1."""
    if w is None:
        return torch.full((B, n), -math.log(n), dtype=dtype, device=ref.device)
    if not isinstance(w, torch.Tensor) or not w.dtype.is_floating_point:
        raise TypeError(f"{name} must be a floating-point tensor, got {getattr(w, 'dtype', type(w).__name__)}")
    if tuple(w.shape) != (B, n) or w.device != ref.device:
        raise ValueError(f"{name} must have shape {(B, n)} on {ref.device}, got {tuple(w.shape)} on {w.device}")
    _inputs.check_none((w < 0) | torch.isnan(w), w, f"{name} must be nonnegative")
    total = w.sum(-1, dtype=torch.float64)
    _inputs.check_none((total - 1).abs() > MARGINAL_SUM_TOL, total, f"{name} must sum to 1 over its last dim")
    return torch.log(w.to(dtype)).contiguous()


def _schedule(geometry: _Geometry, epsilon: float, max_iter: int, anneal) -> list[float]:
    """One regularization per iteration: epsilon throughout, or with ``anneal`` (a factor in (0, 1)) the
    geometric decay ``max(epsilon, diameter * anneal^k)`` from the largest cost (a bound from the points'
    bounding box), one host read."""
    if anneal is None:
        return [epsilon] * max_iter
    anneal = _inputs.check_real("anneal", anneal, low=0.0, high=1.0, open_low=True)
    if anneal == 1.0:
        raise ValueError("anneal must lie in (0, 1), got 1.0")
    if geometry.cost is not None:
        start = float(geometry.cost.abs().amax())
    else:
        both = torch.cat([geometry.x, geometry.y], 1)
        extent = both.amax(1) - both.amin(1)
        start = float((extent.square() if geometry.cost_fn == "sqeuclidean" else extent).sum(-1).amax())
    steps = max(0, math.ceil(math.log(epsilon / start) / math.log(anneal))) if start > epsilon else 0
    if steps >= max_iter:
        raise ValueError(f"max_iter={max_iter} leaves no iteration at epsilon: annealing from {start:.3g} by "
                         f"{anneal} takes {steps}")  # fmt: skip
    return [max(epsilon, start * anneal**k) for k in range(steps)] + [epsilon] * (max_iter - steps)


# ----------------------------------------------------------------------------------------------------
# public functions


def sinkhorn(
    cost: torch.Tensor | None = None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    cost_fn: str | None = None,
    epsilon: float,
    max_iter: int = 100,
    tol: float | None = 1e-6,
    check_every: int = 10,
    anneal: float | None = None,
    return_plan: bool = False,
    unroll: bool = False,
    backend: str = "auto",
) -> SinkhornResult:
    """Entropic optimal transport for a batch of B problems, by log-domain Sinkhorn iterations.

    ``min_P <P, C> + eps KL(P | a b^T)`` over plans with row sums a and column sums b, alternating
    ``f_i = -eps log sum_j b_j exp((g_j - C_ij)/eps)`` and ``g_j = -eps log sum_i a_i exp((f_i - C_ij)/eps)``
    (stable for any eps: nothing is exponentiated outside a log-sum-exp).

    Args:
        cost: [B, n, m] cost matrix; or None with ``x`` [B, n, d] and ``y`` [B, m, d], whose cost
            (``cost_fn``: "sqeuclidean", the default, ``sum_k (x_k - y_k)^2``, no 1/2, as POT's ``ot.dist``;
            or "l1") is computed tile by tile, never stored.
        a, b: [B, n], [B, m] nonnegative marginals summing to 1 (uniform when None).
        epsilon: the regularization eps > 0, in cost units.
        max_iter: most iterations (each one f and one g update).
        tol: stop when every problem's marginal error ``sum_i |sum_j P_ij - a_i|`` is under tol, tested every
            ``check_every`` iterations and after the last (the only host syncs); ``result.converged`` says which
            problems got under it, and a ``SinkhornConvergenceWarning`` says by how much the others missed it
            after ``max_iter``. None runs exactly max_iter, with no sync, no warning and ``converged=None``.
        anneal: None, or a factor in (0, 1): epsilon scaling from the largest cost down to epsilon
            (``eps_k = max(epsilon, C_max anneal^k)``); the annealing iterations count in max_iter.
        return_plan: also return the dense plan [B, n, m] (differentiable only with unroll=True).
        unroll: backpropagate through the iterations (torch backend, the cost materialized, as SinKD's
            code does) instead of the envelope gradient.
        backend: "auto" | "triton" | "torch" (float64 inputs run on torch).

    Gradients (default, envelope theorem): ``cost`` and ``objective`` both pass ``P`` to C, P's
    ``sum_j P_ij dc/dx_i`` to the points, and f, g to a, b (exact for ``objective`` at convergence; for
    ``cost`` an approximation, which drops the change of P). This is the gradient of POT's
    ``ot.solve(..., grad="envelope")`` (of its ``value``); POT's ``sinkhorn2`` on torch tensors differentiates
    through its iterations instead, as ``unroll=True`` does (tests/test_sinkhorn.py checks both against POT
    0.9.7). The potentials carry no gradient.

    Returns a ``SinkhornResult`` (f, g, cost, objective, iterations, marginal_error, converged, plan).
    """
    return _sinkhorn(cost, a, b, x, y, cost_fn=cost_fn, epsilon=epsilon, max_iter=max_iter, tol=tol,
                     check_every=check_every, anneal=anneal, return_plan=return_plan, unroll=unroll, backend=backend,
                     symmetric=False)  # fmt: skip


def _sinkhorn(cost, a, b, x, y, *, cost_fn, epsilon, max_iter, tol, check_every, anneal, return_plan, unroll, backend,
              symmetric: bool) -> SinkhornResult:  # fmt: skip
    geometry = _geometry(cost, x, y, cost_fn)
    B, n, m = geometry.shape
    ref = geometry.cost if geometry.cost is not None else geometry.x
    dtype = torch.float64 if any(t is not None and t.dtype == torch.float64 for t in (cost, x, y, a, b)) else (
        torch.float32)  # fmt: skip
    log_a = _log_marginal("a", a, B, n, ref, dtype)
    log_b = _log_marginal("b", b, B, m, ref, dtype)
    epsilon = _inputs.check_real("epsilon", epsilon, low=0.0, high=math.inf, open_low=True)
    max_iter = _inputs.check_int("max_iter", max_iter, 1)
    check_every = _inputs.check_int("check_every", check_every, 1)
    if tol is not None:
        tol = _inputs.check_real("tol", tol, low=0.0, high=math.inf, open_low=True)
    return_plan, unroll = _inputs.check_bool("return_plan", return_plan), _inputs.check_bool("unroll", unroll)
    backend = resolve("sinkhorn", backend, ref.device, dtype=dtype)
    schedule = _schedule(geometry, epsilon, max_iter, anneal)

    if unroll:
        f, g, value, objective, error, iterations = _solve(geometry, log_a, log_b, schedule, tol, check_every,
                                                           "torch", symmetric)  # fmt: skip
    else:
        f, g, value, objective, error, iterations = sinkhorn_op(
            geometry.cost, geometry.x, geometry.y, log_a, log_b, geometry.cost_fn, schedule, tol, check_every, backend,
            symmetric,
        )  # fmt: skip
        iterations = int(iterations)
    if not unroll:  # the envelope: neither the potentials nor the plan carry a gradient
        f, g = f.detach(), g.detach()
    with torch.set_grad_enabled(unroll and torch.is_grad_enabled()):
        plan = plan_torch(geometry, log_a, log_b, f, g, epsilon) if return_plan else None
    converged = None if tol is None else error.detach() < tol
    return SinkhornResult(f, g, value, objective, iterations, error.detach(), converged, plan)


def sinkhorn_divergence(
    cost=None,
    a: torch.Tensor | None = None,
    b: torch.Tensor | None = None,
    *,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    value: str = "objective",
    **options,
) -> torch.Tensor:
    """Debiased Sinkhorn divergence ``S = OT(a, b) - OT(a, a)/2 - OT(b, b)/2`` per problem, [B].

    ``cost`` is the tuple ``(C_ab [B, n, m], C_aa [B, n, n], C_bb [B, m, m])``, or None with points x, y (the
    self-costs then come from the same points). ``value="objective"`` (default) uses the entropic value, which
    makes S >= 0 and S = 0 only when a = b (Feydy et al. 2019, GeomLoss); ``"cost"`` uses ``<P, C>``.
    ``options`` are sinkhorn's (epsilon, cost_fn, max_iter, tol, check_every, anneal, unroll, backend). The two
    self terms run the symmetric update ``f <- (f + T(f)) / 2`` (one soft-min pass per iteration; the plain
    alternation oscillates on them), so ``C_aa`` and ``C_bb`` must be symmetric.
    """
    _inputs.check_choice("value", value, ("objective", "cost"))
    if "return_plan" in options:
        raise TypeError("sinkhorn_divergence does not return plans")
    if cost is not None:
        if not isinstance(cost, tuple | list) or len(cost) != 3:
            raise TypeError("sinkhorn_divergence's cost must be the tuple (C_ab, C_aa, C_bb)")
        c_ab, c_aa, c_bb = cost
        problems = ((c_ab, a, b, None, None), (c_aa, a, a, None, None), (c_bb, b, b, None, None))
    else:
        problems = ((None, a, b, x, y), (None, a, a, x, x), (None, b, b, y, y))
    settings = {"cost_fn": None, "max_iter": 100, "tol": 1e-6, "check_every": 10, "anneal": None, "unroll": False,
                "backend": "auto"}  # fmt: skip
    unknown = set(options) - set(settings) - {"epsilon"}
    if unknown or "epsilon" not in options:
        raise TypeError(f"sinkhorn_divergence takes epsilon= and {', '.join(settings)}; got {sorted(options)}")
    settings |= options
    values = [
        getattr(_sinkhorn(*problem, **settings, return_plan=False, symmetric=i > 0), value)
        for i, problem in enumerate(problems)
    ]
    return values[0] - 0.5 * values[1] - 0.5 * values[2]


# ----------------------------------------------------------------------------------------------------
# SinKD: the L1 cost between softmax rows


def softmax_l1_cost_torch(student, teacher, max_s, logsum_s, max_t, logsum_t, valid, temperature: float):
    """Torch backend of the (N, N) cost, blockwise over V: at most [N, block] probabilities at a time."""
    B, L, V = student.shape
    zs, zt = student.reshape(B * L, V), teacher.reshape(B * L, V)
    N = B * L
    w = student.new_zeros((N, N), dtype=torch.float32)
    for cols in _row_blocks(V, 4 * N):
        p = torch.exp(log_softmax_from_stats(zs[:, cols], max_s, logsum_s, temperature))
        q = torch.exp(log_softmax_from_stats(zt[:, cols], max_t, logsum_t, temperature))
        w += torch.cdist(p[None], q[None], p=1)[0]
    return torch.where(valid[:, None] & valid[None, :], w, 0.0)


def softmax_l1_cost_backward_torch(grad_w, student, teacher, max_s, logsum_s, max_t, logsum_t, temperature: float):
    """(N, V) fp32 ``G_iv = sum_j dW_ij sign(p_iv - q_jv)``, blockwise over V: the backward of ``cdist(p, q, 1)``
    (torch's own kernel, which forms no [N, N, block] tensor)."""
    B, L, V = student.shape
    zs, zt = student.reshape(B * L, V), teacher.reshape(B * L, V)
    grad_p = torch.empty((B * L, V), dtype=torch.float32, device=student.device)
    for cols in _row_blocks(V, 4 * B * L):
        p = torch.exp(log_softmax_from_stats(zs[:, cols], max_s, logsum_s, temperature))[None]
        q = torch.exp(log_softmax_from_stats(zt[:, cols], max_t, logsum_t, temperature))[None]
        w = torch.cdist(p, q, p=1)
        grad_p[:, cols] = torch.ops.aten._cdist_backward(grad_w[None].contiguous(), p, q, 1.0, w)[0]
    return grad_p


_l1_launchers = launcher_table(  # (forward, backward)
    triton=("klops.kernels.sinkhorn:softmax_l1_cost", "klops.kernels.sinkhorn:softmax_l1_cost_backward"),
    torch=(softmax_l1_cost_torch, softmax_l1_cost_backward_torch),
)


@torch.library.custom_op("klops::softmax_l1_cost", mutates_args=())
def softmax_l1_cost_op(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, temperature: float, backend: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, V) logits -> (W (N, N) fp32, max_s, logsum_s, max_t, logsum_t (N,) fp32), N = B L."""
    B, L, V = student.shape
    labels = torch.where(valid, 0, -100).reshape(B, L)
    _, _, max_s, logsum_s, *_ = logprobs_op(student, labels, temperature, False, False, -100, backend)
    _, _, max_t, logsum_t, *_ = logprobs_op(teacher, labels, temperature, False, False, -100, backend)
    stats = (max_s.reshape(-1), logsum_s.reshape(-1), max_t.reshape(-1), logsum_t.reshape(-1))
    forward, _ = _l1_launchers(backend)
    return forward(student, teacher, *stats, valid.reshape(-1), temperature), *stats


@softmax_l1_cost_op.register_fake
def _(student, teacher, valid, temperature, backend):
    N = student.shape[0] * student.shape[1]
    new = student.new_empty
    return new((N, N), dtype=torch.float32), *(new(N, dtype=torch.float32) for _ in range(4))


@torch.library.custom_op("klops::softmax_l1_cost_backward", mutates_args=())
def softmax_l1_cost_backward_op(
    grad_w: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor, max_s: torch.Tensor,
    logsum_s: torch.Tensor, max_t: torch.Tensor, logsum_t: torch.Tensor, temperature: float, backend: str,
) -> torch.Tensor:  # fmt: skip
    """(N, N) fp32 dL/dW -> (B, L, V) dL/dz_s (the student's dtype): ``p (G - <p, G>) / T`` per row."""
    _, backward = _l1_launchers(backend)
    B, L, V = student.shape
    grad_p = backward(grad_w.contiguous(), student, teacher, max_s, logsum_s, max_t, logsum_t, temperature)
    dz = torch.empty((B * L, V), dtype=student.dtype, device=student.device)
    zs = student.reshape(B * L, V)
    for rows in _row_blocks(B * L, V):
        p = torch.exp(log_softmax_from_stats(zs[rows], max_s[rows], logsum_s[rows], temperature))
        chunk = p * (grad_p[rows] - (p * grad_p[rows]).sum(-1, keepdim=True)) / temperature
        dz[rows] = torch.where(valid.reshape(-1)[rows, None], chunk, 0.0)
    return dz.reshape(B, L, V)


@softmax_l1_cost_backward_op.register_fake
def _(grad_w, student, *rest):
    return torch.empty(student.shape, dtype=student.dtype, device=student.device)


def _l1_setup(ctx, inputs, output):
    student, teacher, valid, temperature, backend = inputs
    _, *stats = output
    ctx.save_for_backward(student, teacher, valid, *stats)
    ctx.params = (temperature, backend)


def _l1_backward(ctx, grad_w, *_grad_stats):
    dz = softmax_l1_cost_backward_op(grad_w, *ctx.saved_tensors, *ctx.params)
    return dz, None, None, None, None


torch.library.register_autograd("klops::softmax_l1_cost", _l1_backward, setup_context=_l1_setup)


def sinkhorn_distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    n_iter: int = 20,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    unroll: bool = False,
    backend: str = "auto",
    vocab_group: torch.distributed.ProcessGroup | None = None,
) -> torch.Tensor:
    """SinKD (Cui et al., 2024): optimal transport between the student's and the teacher's softmax rows.

    Over the N valid rows of the batch, ``p_i = softmax(z_s,i / T)``, ``q_j = softmax(z_t,j / T)``,
    ``W_ij = ||p_i - q_j||_1`` (built blockwise over V from each row's softmax statistics, never an [N, V]
    probability tensor), and SinKD's published procedure: ``K = exp(-W/eps)`` normalized ``n_iter`` times,
    rows then columns, to ``P``; the loss is ``sum_ij P_ij W_ij``. That P has unit row and column sums
    (N times the uniform-marginal plan), so the loss is ``N_valid <P_unif, W>``; the published code then
    scales it by a loss weight (0.0008), which is the caller's to apply. Computed here in the log domain.

    Args:
        student_logits, teacher_logits: [..., V] of one shape (rows are flattened to N).
        temperature: T (SinKD: 2). epsilon: eps (0.1). n_iter: the normalizations (20).
        labels: optional [...] labels; rows equal to ``ignore_index`` take no part (neither as a student
            row nor as a teacher column).
        unroll: backpropagate through the iterations, as the published code does; by default the envelope
            gradient ``dL/dW = N_valid P``.
        backend: "auto" | "triton" | "torch".
        vocab_group: not vocabulary-parallel (a ValueError, as for logits DTensors): the cost ``W_ij`` couples
            every pair of rows over the whole vocabulary, an [N, N] sum per rank rather than a few floats per row.

    Returns the 0-d fp32 loss; gradient to the student logits only (the teacher's is not computed).
    An all-ignored batch gives 0 with a zero gradient.
    """
    if vocab_group is not None or is_sharded(student_logits) or is_sharded(teacher_logits):
        raise ValueError(
            "sinkhorn_distill_loss is not vocabulary-parallel: its cost ||p_i - q_j||_1 couples every pair of rows "
            "over the whole vocabulary; pass full-vocabulary logits (e.g. DTensor.full_tensor()) without vocab_group"
        )
    _inputs.check_logits("student_logits", student_logits)
    _inputs.check_logits("teacher_logits", teacher_logits)
    if teacher_logits.shape != student_logits.shape or teacher_logits.device != student_logits.device:
        raise ValueError(f"teacher_logits must have the student's shape {tuple(student_logits.shape)} and device, "
                         f"got {tuple(teacher_logits.shape)} on {teacher_logits.device}")  # fmt: skip
    temperature = _inputs.check_temperature(temperature)
    epsilon = _inputs.check_real("epsilon", epsilon, low=0.0, high=math.inf, open_low=True)
    n_iter = _inputs.check_int("n_iter", n_iter, 1)
    unroll = _inputs.check_bool("unroll", unroll)
    if labels is None:
        valid = torch.ones(student_logits.shape[:-1], dtype=torch.bool, device=student_logits.device)
    else:
        valid = _inputs.as_labels("labels", labels, "student_logits", student_logits) != ignore_index
    backend = resolve("sinkhorn", backend, student_logits.device, dtype=torch.float32)

    if valid.numel() == 0:
        return student_logits.float().sum() * 0.0
    student3, teacher3 = _inputs.as_rows(student_logits, teacher_logits.detach())
    valid = valid.reshape(student3.shape[:2])
    w, *_ = softmax_l1_cost_op(student3, teacher3, valid, temperature, backend)
    n_valid = valid.sum()
    log_marginal = torch.where(valid.reshape(1, -1), -torch.log(n_valid.clamp_min(1).float()), -math.inf)
    schedule = [epsilon] * n_iter
    if unroll:
        geometry = _Geometry(w[None], None, None, "sqeuclidean")
        _, _, value, *_ = _solve(geometry, log_marginal, log_marginal, schedule, None, 1, "torch")
    else:
        _, _, value, *_ = sinkhorn_op(w[None], None, None, log_marginal, log_marginal, "sqeuclidean", schedule, None, 1,
                                      backend, False)  # fmt: skip
    return n_valid * value[0]
