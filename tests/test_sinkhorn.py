"""klops.sinkhorn / sinkhorn_divergence / sinkhorn_distill_loss against POT, float64 references and finite
differences (docs/losses.md §5).

POT (``ot.sinkhorn(..., method="sinkhorn_log")``, ``ot.sinkhorn2``) is the reference for converged problems;
klops.reference.sinkhorn_reference (a plain float64 loop over whole-matrix logsumexps) for a fixed number of
iterations, which is how the Triton kernels are checked under the interpreter (one launch per half-iteration
is slow there). Gradients: float64 central differences on the torch backend, and Triton against torch.
"""

import math
import warnings

import pytest
import torch

import klops
from klops.reference import sinkhorn_distill_reference, sinkhorn_reference

from .conftest import DEVICE, assert_close, backends_of, randn

ot = pytest.importorskip("ot")

SINKHORN_BACKENDS = backends_of("sinkhorn")  # Sinkhorn has Triton and torch kernels
# fp32 kernels against float64 (rtol, atol as a fraction of the largest value): potentials are in cost units
# and accumulate the rounding of every iteration.
FP32_TOL = (1e-4, 2e-5)
# Converged solutions agree to the stopping tolerances (marginal errors of 1e-12 and POT's 1e-13).
FP64_TOL = (1e-7, 1e-9)


def simplex(*shape, gen, dtype=torch.float64):
    w = torch.rand(shape, generator=gen, dtype=torch.float64) + 0.1
    return (w / w.sum(-1, keepdim=True)).to(dtype).to(DEVICE)


def dense_cost(x, y, cost_fn):
    return torch.cdist(x, y, p=1) if cost_fn == "l1" else torch.cdist(x, y).square()


def pot_solve(cost, a, b, epsilon):
    """POT's log-domain plan and <P, C>, converged, per problem."""
    plans, values = [], []
    for c, u, v in zip(cost.double().cpu().numpy(), a.double().cpu().numpy(), b.double().cpu().numpy()):
        plans.append(torch.from_numpy(ot.sinkhorn(u, v, c, epsilon, method="sinkhorn_log", numItermax=100000,
                                                  stopThr=1e-13)))  # fmt: skip
        values.append(float(ot.sinkhorn2(u, v, c, epsilon, method="sinkhorn_log", numItermax=100000, stopThr=1e-13)))
    return torch.stack(plans), torch.tensor(values, dtype=torch.float64)


def assert_same_potentials(result, plan, cost, a, b, epsilon, tol):
    """f, g define ``plan`` (potentials are unique up to f + c, g - c): log P - log(a b) = (f + g - C)/eps."""
    log_ratio = torch.log(plan) - torch.log(a[:, :, None] * b[:, None, :]) + cost.double() / epsilon
    expected_f = epsilon * log_ratio[:, :, :1].squeeze(-1) - result.g[:, :1].double().cpu()
    assert_close(result.f.cpu(), expected_f, tol, "f")
    assert_close(result.g.cpu(), epsilon * log_ratio[:, :1, :].squeeze(1) - result.f[:, :1].double().cpu(), tol, "g")


# ----------------------------------------------------------------------------------------------------
# against POT, converged (torch backend: the Triton kernels are checked at fixed iterations below)


@pytest.mark.parametrize("n, m", [(9, 9), (13, 6), (4, 17)])
@pytest.mark.parametrize("epsilon", [0.5, 0.05, 0.002])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cost_matches_pot(n, m, epsilon, dtype, gen):
    B = 3
    # costs up to 50 eps at eps = 0.002, where random costs over [0, 1] would take ~1e5 iterations
    cost = min(1.0, 25 * epsilon) * torch.rand(B, n, m, generator=gen, dtype=torch.float64).to(DEVICE)
    a, b = simplex(B, n, gen=gen), simplex(B, m, gen=gen)
    result = klops.sinkhorn(cost.to(dtype), a.to(dtype), b.to(dtype), epsilon=epsilon, max_iter=20000,
                            tol=1e-12 if dtype == torch.float64 else 1e-5,
                            return_plan=True, backend="torch")  # fmt: skip
    plan, value = pot_solve(cost, a, b, epsilon)
    tol = FP64_TOL if dtype == torch.float64 else (2e-3, 2e-4)
    assert result.iterations < 20000
    assert bool((result.marginal_error < (1e-12 if dtype == torch.float64 else 1e-5)).all())
    assert_close(result.plan.cpu(), plan, tol, "plan")
    assert_close(result.cost.cpu(), value, tol, "<P, C>")
    # the potentials as POT's plan gives them, through log P: within the marginal tolerance times eps
    assert_same_potentials(result, plan, cost.cpu(), a.cpu(), b.cpu(), epsilon, (1e-6, 1e-7) if dtype == torch.float64
                           else (1e-3, 1e-3))  # fmt: skip
    kl = (plan * (torch.log(plan) - torch.log(a.cpu()[:, :, None] * b.cpu()[:, None, :]))).sum((1, 2))
    assert_close(result.objective.cpu(), value + epsilon * kl, tol, "objective = <P, C> + eps KL(P | ab)")


def test_tiny_epsilon_where_the_plain_domain_overflows(gen):
    """At eps = 0.002 a row whose costs all exceed 1.5 has exp(-C/eps) = 0 in float64: POT's plain-domain
    Sinkhorn divides by zero there (a warning and a wrong value). With a well-separated optimal assignment the
    entropic plan at this eps is the exact one (POT's ``emd``) to ~exp(-1/eps), and the float64 loop agrees."""
    n = 6
    best = torch.eye(n, dtype=torch.float64)[torch.randperm(n, generator=gen)]
    cost = torch.rand(1, n, n, generator=gen, dtype=torch.float64) + 2 * (1 - best)
    cost[0, 0] += 2.0
    assert float(torch.exp(-cost[0, 0] / 0.002).max()) == 0.0
    uniform = torch.full((1, n), 1 / n, dtype=torch.float64)
    with pytest.warns(UserWarning):
        plain = ot.sinkhorn2(uniform[0].numpy(), uniform[0].numpy(), cost[0].numpy(), 0.002, method="sinkhorn")
    result = klops.sinkhorn(cost, epsilon=0.002, max_iter=20000, tol=1e-12, return_plan=True, backend="torch")
    exact_plan = torch.from_numpy(ot.emd(uniform[0].numpy(), uniform[0].numpy(), cost[0].numpy()))[None]
    exact = (exact_plan * cost).sum((1, 2))
    assert not math.isclose(float(plain), float(exact), rel_tol=0.1), "the plain domain was expected to fail here"
    assert torch.isfinite(result.f).all() and result.iterations < 20000
    assert_close(result.plan, exact_plan, (0, 0), "plan", floor=1e-9)
    assert_close(result.cost, exact, (1e-6, 0), "<P, C>")
    _, _, plan, value = sinkhorn_reference(cost, uniform, uniform, 0.002, result.iterations)
    assert_close(result.plan, plan, FP64_TOL, "plan against the float64 loop")


@pytest.mark.parametrize("cost_fn, metric", [("sqeuclidean", "sqeuclidean"), ("l1", "cityblock")])
def test_points_match_pot(cost_fn, metric, gen):
    B, n, m, d = 2, 11, 7, 3
    x, y = randn(B, n, d, gen=gen, dtype=torch.float64), randn(B, m, d, gen=gen, dtype=torch.float64)
    a, b = simplex(B, n, gen=gen), simplex(B, m, gen=gen)
    result = klops.sinkhorn(None, a, b, x=x, y=y, cost_fn=cost_fn, epsilon=0.1, max_iter=20000, tol=1e-10,
                            return_plan=True, backend="torch")  # fmt: skip
    cost = torch.stack([torch.from_numpy(ot.dist(u, v, metric=metric)) for u, v in zip(x.cpu().numpy(),
                                                                                       y.cpu().numpy())])  # fmt: skip
    plan, value = pot_solve(cost, a, b, 0.1)
    assert_close(result.plan.cpu(), plan, FP64_TOL, "plan")
    assert_close(result.cost.cpu(), value, FP64_TOL, "<P, C>")


# ----------------------------------------------------------------------------------------------------
# every backend at a fixed number of iterations against the float64 loop


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("source", ["cost-fp32", "cost-bf16-transposed", "sqeuclidean", "l1"])
def test_fixed_iterations_match_reference(backend, source, gen):
    B, n, m, d, n_iter = 2, 37, 150, 4, 12  # 150 columns: more than one block of 128
    # eps at about 1/40 of the costs' spread: 12 iterations leave a marginal error of ~1e-3
    epsilon = {"sqeuclidean": 0.5, "l1": 0.2}.get(source, 0.05)
    x, y = randn(B, n, d, gen=gen), randn(B, m, d, gen=gen)
    a, b = simplex(B, n, gen=gen, dtype=torch.float32), simplex(B, m, gen=gen, dtype=torch.float32)
    if source.startswith("cost"):
        cost = dense_cost(x, y, "l1") / d
        if source == "cost-bf16-transposed":
            cost = cost.to(torch.bfloat16).transpose(1, 2).contiguous().transpose(1, 2)
        kwargs = {"cost": cost}
    else:
        cost, kwargs = dense_cost(x.double(), y.double(), source), {"x": x, "y": y, "cost_fn": source}
        kwargs["cost"] = None
    result = klops.sinkhorn(a=a, b=b, epsilon=epsilon, max_iter=n_iter, tol=None, return_plan=True, backend=backend,
                            **kwargs)  # fmt: skip
    f, g, plan, value = sinkhorn_reference(cost.double(), a, b, epsilon, n_iter)
    assert result.iterations == n_iter
    assert_close(result.f, f, FP32_TOL, "f")
    assert_close(result.g, g, FP32_TOL, "g")
    assert_close(result.plan, plan, FP32_TOL, "plan")
    assert_close(result.cost, value, FP32_TOL, "<P, C>")
    error = (plan.sum(2) - a.double()).abs().sum(-1)
    assert_close(result.marginal_error, error, (1e-2, 0), "marginal error", floor=1e-6)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_zero_marginal_entries_and_infinite_costs(backend, gen):
    """a_i = 0 removes row i; C_ij = +inf forbids (i, j): neither gives NaN."""
    cost = torch.rand(1, 6, 5, generator=gen).to(DEVICE)
    cost[0, 2, 3] = math.inf
    a = torch.tensor([[0.2, 0.0, 0.3, 0.1, 0.2, 0.2]], device=DEVICE)
    result = klops.sinkhorn(cost, a, epsilon=0.1, max_iter=8, tol=None, return_plan=True, backend=backend)
    assert torch.isfinite(result.f).all() and torch.isfinite(result.cost).all()
    assert float(result.plan[0, 1].abs().sum()) == 0.0 and float(result.plan[0, 2, 3]) == 0.0
    finite = torch.where(torch.isinf(cost), 1e9, cost)
    _, _, plan, value = sinkhorn_reference(finite, a, torch.full((1, 5), 0.2, device=DEVICE), 0.1, 8)
    assert_close(result.cost, value, FP32_TOL, "<P, C>")


def test_stopping(gen):
    cost = torch.rand(4, 10, 12, generator=gen, dtype=torch.float64)
    early = klops.sinkhorn(cost, epsilon=0.1, max_iter=1000, tol=1e-8, check_every=5, backend="torch")
    assert early.iterations % 5 == 0 and early.iterations < 1000
    assert bool((early.marginal_error < 1e-8).all())
    fixed = klops.sinkhorn(cost, epsilon=0.1, max_iter=early.iterations - 5, tol=None, backend="torch")
    assert fixed.iterations == early.iterations - 5 and bool((fixed.marginal_error >= 1e-8).any())


@pytest.mark.parametrize("unroll", [False, True])
def test_converged_and_the_warning_of_a_miss(unroll, gen):
    """converged [B] says which problems got under tol; after max_iter a SinkhornConvergenceWarning says how many
    missed it and by how much; tol=None gives converged=None and no warning (nothing read on the host)."""
    cost = torch.rand(3, 10, 12, generator=gen, dtype=torch.float64).requires_grad_(unroll)
    cost = cost * torch.tensor([1.0, 30.0, 1.0], dtype=torch.float64)[:, None, None]  # eps is tiny against C[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        done = klops.sinkhorn(cost[[0, 2]], epsilon=0.1, max_iter=5000, tol=1e-8, backend="torch")
        assert done.converged.shape == (2,) and bool(done.converged.all())
        fixed = klops.sinkhorn(cost, epsilon=0.1, max_iter=7, tol=None, backend="torch")
        assert fixed.converged is None
    with pytest.warns(klops.SinkhornConvergenceWarning) as caught:
        missed = klops.sinkhorn(cost, epsilon=0.1, max_iter=47, tol=1e-8, check_every=10, unroll=unroll)
    assert missed.iterations == 47 and missed.converged.dtype == torch.bool
    assert missed.converged.tolist() == (missed.marginal_error < 1e-8).tolist() and not bool(missed.converged[1])
    worst, missing = float(missed.marginal_error.max()), int((~missed.converged).sum())
    message = str(caught[0].message)
    assert f"after max_iter=47 iterations the marginal error of {missing} of 3 problems" in message
    assert f"the largest {worst:.3g} ({worst / 1e-8:.3g} times tol)" in message


def test_annealing_reaches_the_same_solution(gen):
    cost = 5 * torch.rand(2, 9, 9, generator=gen, dtype=torch.float64)
    plain = klops.sinkhorn(cost, epsilon=0.5, max_iter=50000, tol=1e-12, backend="torch")
    annealed = klops.sinkhorn(cost, epsilon=0.5, max_iter=50000, tol=1e-12, anneal=0.5, backend="torch")
    assert plain.iterations < 50000 and annealed.iterations < 50000
    assert_close(annealed.cost, plain.cost, FP64_TOL, "<P, C>")
    assert_close(annealed.f - annealed.f[:, :1], plain.f - plain.f[:, :1], FP64_TOL, "f")
    # from max C ~ 5 down to 0.5 by halves takes 4 iterations at eps > 0.5
    with pytest.raises(ValueError, match="max_iter=4 leaves no iteration at epsilon"):
        klops.sinkhorn(cost, epsilon=0.5, max_iter=4, anneal=0.5, backend="torch")


def test_empty_batch():
    result = klops.sinkhorn(torch.zeros(0, 3, 4, device=DEVICE), epsilon=0.1)
    assert result.f.shape == (0, 3) and result.cost.shape == (0,)


# ----------------------------------------------------------------------------------------------------
# gradients


def central_difference(fn, t, direction, h=1e-6):
    return (fn(t + h * direction) - fn(t - h * direction)) / (2 * h)


@pytest.mark.parametrize("wrt", ["cost", "a", "b"])
def test_envelope_gradient_matches_finite_differences(wrt, gen):
    B, n, m, epsilon = 2, 6, 5, 0.2
    inputs = {"cost": torch.rand(B, n, m, generator=gen, dtype=torch.float64), "a": simplex(B, n, gen=gen).cpu(),
              "b": simplex(B, m, gen=gen).cpu()}  # fmt: skip

    def objective(value):
        args = {**inputs, wrt: value}
        return klops.sinkhorn(args["cost"], args["a"], args["b"], epsilon=epsilon, max_iter=100000, tol=1e-13,
                              backend="torch").objective.sum()  # fmt: skip

    leaf = inputs[wrt].clone().requires_grad_()
    (grad,) = torch.autograd.grad(objective(leaf), leaf)
    direction = torch.randn(inputs[wrt].shape, generator=gen, dtype=torch.float64)
    if wrt != "cost":  # stay on the simplex: marginals' gradients are defined up to a constant per problem
        direction -= direction.mean(-1, keepdim=True)
    expected = central_difference(objective, inputs[wrt], direction)
    assert_close((grad * direction).sum(), expected, (1e-6, 0), f"d objective / d {wrt}")


@pytest.mark.parametrize("cost_fn", ["sqeuclidean", "l1"])
def test_points_gradient_matches_finite_differences(cost_fn, gen):
    B, n, m, d = 2, 7, 6, 3
    x, y = torch.randn(B, n, d, generator=gen, dtype=torch.float64), torch.randn(B, m, d, generator=gen,
                                                                                dtype=torch.float64)  # fmt: skip

    def objective(xv, yv):
        return klops.sinkhorn(x=xv, y=yv, cost_fn=cost_fn, epsilon=0.5, max_iter=100000, tol=1e-13,
                              backend="torch").objective.sum()  # fmt: skip

    xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
    gx, gy = torch.autograd.grad(objective(xl, yl), (xl, yl))
    dx, dy = torch.randn(x.shape, generator=gen, dtype=torch.float64), torch.randn(y.shape, generator=gen,
                                                                                 dtype=torch.float64)  # fmt: skip
    assert_close((gx * dx).sum(), central_difference(lambda v: objective(v, y), x, dx), (1e-6, 0), "d/dx")
    assert_close((gy * dy).sum(), central_difference(lambda v: objective(x, v), y, dy), (1e-6, 0), "d/dy")


@pytest.mark.parametrize("source", ["cost", "sqeuclidean"])
def test_unrolled_gradient_matches_finite_differences(source, gen):
    """unroll=True differentiates the n_iter iterations themselves (not converged here)."""
    B, n, m, d = 1, 5, 4, 2
    x, y = torch.randn(B, n, d, generator=gen, dtype=torch.float64), torch.randn(B, m, d, generator=gen,
                                                                                dtype=torch.float64)  # fmt: skip
    base = dense_cost(x, y, "sqeuclidean") if source == "cost" else x

    def value(t):
        kwargs = {"cost": t} if source == "cost" else {"cost": None, "x": t, "y": y}
        return klops.sinkhorn(**kwargs, epsilon=0.3, max_iter=4, tol=None, unroll=True).cost.sum()

    leaf = base.clone().requires_grad_()
    (grad,) = torch.autograd.grad(value(leaf), leaf)
    direction = torch.randn(base.shape, generator=gen, dtype=torch.float64)
    assert_close((grad * direction).sum(), central_difference(value, base, direction), (1e-6, 0), "unrolled")
    envelope_leaf = base.clone().requires_grad_()
    kwargs = {"cost": envelope_leaf} if source == "cost" else {"cost": None, "x": envelope_leaf, "y": y}
    (envelope,) = torch.autograd.grad(klops.sinkhorn(**kwargs, epsilon=0.3, max_iter=4, tol=None).cost.sum(),
                                      envelope_leaf)  # fmt: skip
    assert not torch.allclose(envelope, grad), "4 iterations are not converged: the two gradients must differ"


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")  # POT's, at stopThr=0 (a fixed iteration count)
def test_envelope_and_unrolled_gradients_match_pot():
    """The default (envelope) gradient is POT's ``ot.solve(..., grad="envelope")``; on torch tensors POT's
    ``sinkhorn2`` differentiates through its iterations, as unroll=True does, and differs from the envelope's."""
    gen = torch.Generator().manual_seed(0)
    n, m, d, epsilon, iters = 7, 9, 3, 0.5, 3000
    x, y = (torch.randn(k, d, generator=gen, dtype=torch.float64) for k in (n, m))
    a, b = torch.full((n,), 1 / n, dtype=torch.float64), torch.full((m,), 1 / m, dtype=torch.float64)

    def grad_y(value_of):
        leaf = y.clone().requires_grad_()
        (grad,) = torch.autograd.grad(value_of(leaf), leaf)
        return grad

    def klops_value(unroll, output="cost"):
        def value(v):
            result = klops.sinkhorn(x=x[None], y=v[None], cost_fn="sqeuclidean", epsilon=epsilon, max_iter=iters,
                                    tol=None, unroll=unroll, backend="torch")  # fmt: skip
            return getattr(result, output).sum()

        return value

    envelope, unrolled = grad_y(klops_value(False)), grad_y(klops_value(True))
    pot_envelope = grad_y(lambda v: ot.solve(ot.dist(x, v), a, b, reg=epsilon, max_iter=iters, tol=0,
                                             grad="envelope").value)  # fmt: skip
    pot_sinkhorn2 = grad_y(lambda v: ot.sinkhorn2(a, b, ot.dist(x, v), epsilon, method="sinkhorn_log",
                                                  numItermax=iters, stopThr=0))  # fmt: skip
    assert_close(envelope, pot_envelope, FP64_TOL, "envelope vs ot.solve(grad='envelope')")
    assert_close(grad_y(klops_value(False, "objective")), pot_envelope, FP64_TOL, "objective vs ot.solve")
    assert_close(unrolled, pot_sinkhorn2, FP64_TOL, "unroll=True vs ot.sinkhorn2")
    assert float((envelope - pot_sinkhorn2).norm() / pot_sinkhorn2.norm()) > 0.05  # not the same gradient


@pytest.mark.parametrize("backend", [b for b in SINKHORN_BACKENDS if b != "torch"])
@pytest.mark.parametrize("cost_fn", ["sqeuclidean", "l1"])
def test_points_gradient_kernel_matches_torch(backend, cost_fn, gen):
    B, n, m, d = 2, 40, 35, 5
    x, y = randn(B, n, d, gen=gen), randn(B, m, d, gen=gen)
    grads = {}
    for name in ("torch", backend):
        xl, yl = x.clone().requires_grad_(), y.clone().requires_grad_()
        result = klops.sinkhorn(x=xl, y=yl, cost_fn=cost_fn, epsilon=2.0, max_iter=6, tol=None, backend=name)
        weights = torch.arange(1.0, B + 1, device=DEVICE)
        grads[name] = torch.autograd.grad((weights * result.cost).sum(), (xl, yl))
    for got, want, what in zip(grads[backend], grads["torch"], ("dx", "dy")):
        assert_close(got, want, FP32_TOL, what)


# ----------------------------------------------------------------------------------------------------
# Sinkhorn divergence


def test_divergence_is_debiased(gen):
    x, y = torch.randn(3, 8, 2, generator=gen, dtype=torch.float64), torch.randn(3, 6, 2, generator=gen,
                                                                               dtype=torch.float64)  # fmt: skip
    options = {"epsilon": 1.0, "max_iter": 100000, "tol": 1e-12, "backend": "torch"}
    same = klops.sinkhorn_divergence(x=x, y=x.clone(), **options)
    assert_close(same, torch.zeros(3, dtype=torch.float64), (0, 0), "S(a, a)", floor=1e-10)
    divergence = klops.sinkhorn_divergence(x=x, y=y, **options)
    assert bool((divergence > 0).all())
    expected = (klops.sinkhorn(x=x, y=y, **options).objective - klops.sinkhorn(x=x, y=x, **options).objective / 2
                - klops.sinkhorn(x=y, y=y, **options).objective / 2)  # fmt: skip
    assert_close(divergence, expected, FP64_TOL, "S")
    costs = (dense_cost(x, y, "sqeuclidean"), dense_cost(x, x, "sqeuclidean"), dense_cost(y, y, "sqeuclidean"))
    assert_close(klops.sinkhorn_divergence(costs, **options), expected, FP64_TOL, "S from the three costs")
    by_cost = klops.sinkhorn_divergence(x=x, y=y, value="cost", **options)
    expected = (klops.sinkhorn(x=x, y=y, **options).cost - klops.sinkhorn(x=x, y=x, **options).cost / 2
                - klops.sinkhorn(x=y, y=y, **options).cost / 2)  # fmt: skip
    assert_close(by_cost, expected, FP64_TOL, "S on <P, C>")


def test_symmetric_update_of_the_self_terms():
    """OT(x, x) by the averaged symmetric update reaches the plain alternation's solution in far fewer iterations
    (here eps is 1/30 of the costs' spread: 27 iterations against 3446)."""
    from klops.sinkhorn import _sinkhorn

    # a fixed draw: the plain alternation's iteration count varies a lot from one draw to another (3446 here)
    x = torch.randn(2, 12, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    options = dict(cost_fn=None, epsilon=0.3, max_iter=200000, tol=1e-11, check_every=1, anneal=None,
                   return_plan=False, unroll=False, backend="torch")  # fmt: skip
    plain = _sinkhorn(None, None, None, x, x, **options, symmetric=False)
    symmetric = _sinkhorn(None, None, None, x, x, **options, symmetric=True)
    assert_close(symmetric.objective, plain.objective, FP64_TOL, "OT(x, x)")
    assert_close(symmetric.f, symmetric.g, (0, 0), "g = f", floor=1e-15)
    assert symmetric.iterations * 10 < plain.iterations, (symmetric.iterations, plain.iterations)


# ----------------------------------------------------------------------------------------------------
# SinKD


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("unroll", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_distill_matches_published_procedure(backend, unroll, dtype, gen):
    N, V = 21, 45  # 21 rows: two row tiles of 16; V = 45: a partial block of 16
    student, teacher = randn(N, V, gen=gen, scale=3.0, dtype=dtype), randn(N, V, gen=gen, scale=3.0, dtype=dtype)
    student[3, 7:20] = -math.inf
    labels = torch.randint(0, V, (N,), generator=gen).to(DEVICE)
    labels[[2, 9]] = -100
    leaf = student.clone().requires_grad_()
    loss = klops.sinkhorn_distill_loss(leaf, teacher, labels=labels, unroll=unroll, backend=backend)
    loss.backward()
    ref_leaf = student.double().requires_grad_()
    expected = sinkhorn_distill_reference(ref_leaf, teacher, valid=labels != -100, envelope=not unroll)
    expected.backward()
    assert_close(loss, expected.detach(), (1e-5, 0), "loss")
    assert_close(leaf.grad, ref_leaf.grad, {torch.float32: (1e-4, 5e-5), torch.bfloat16: (1.6e-2, 4e-3)}[dtype], "grad")
    assert float(leaf.grad[[2, 9]].abs().sum()) == 0.0


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_sinkhorn_distill_sliced_and_batched_rows(backend, gen):
    """[B, L, V] logits sliced as a trainer does (``logits[:, :-1]``): no copy, same loss as the flat rows."""
    full_s, full_t = randn(2, 6, 30, gen=gen), randn(2, 6, 30, gen=gen)
    student, teacher = full_s[:, :-1], full_t[:, :-1]
    loss = klops.sinkhorn_distill_loss(student, teacher, temperature=1.5, epsilon=0.2, n_iter=5, backend=backend)
    expected = sinkhorn_distill_reference(student.reshape(10, 30), teacher.reshape(10, 30), temperature=1.5,
                                          epsilon=0.2, n_iter=5)  # fmt: skip
    assert_close(loss, expected, (1e-5, 0), "loss")


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
def test_sinkhorn_distill_all_ignored_and_empty(backend, gen):
    student = randn(4, 10, gen=gen).requires_grad_()
    loss = klops.sinkhorn_distill_loss(student, randn(4, 10, gen=gen), labels=torch.full((4,), -100, device=DEVICE),
                                       backend=backend)  # fmt: skip
    loss.backward()
    assert float(loss) == 0.0 and float(student.grad.abs().sum()) == 0.0
    empty = randn(0, 10, gen=gen).requires_grad_()
    loss = klops.sinkhorn_distill_loss(empty, randn(0, 10, gen=gen), backend=backend)
    loss.backward()
    assert float(loss) == 0.0 and empty.grad.shape == (0, 10)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.filterwarnings("ignore::klops.SinkhornConvergenceWarning")  # tol=1e-3 in 4 iterations: a stopping check
def test_opcheck(backend, gen):
    from klops.sinkhorn import sinkhorn_op, softmax_l1_cost_op

    log_a, log_b = torch.full((2, 5), -math.log(5), device=DEVICE), torch.full((2, 4), -math.log(4), device=DEVICE)
    cost = torch.rand(2, 5, 4, generator=gen).to(DEVICE).requires_grad_()
    args = (cost, None, None, log_a, log_b, "sqeuclidean", [0.5] * 4, None, 1, backend, False)
    torch.library.opcheck(sinkhorn_op, args)
    x, y = randn(2, 5, 3, gen=gen).requires_grad_(), randn(2, 4, 3, gen=gen)
    torch.library.opcheck(sinkhorn_op, (None, x, y, log_a, log_b, "l1", [0.5] * 4, 1e-3, 2, backend, False))
    log_a = torch.full((2, 4), -math.log(4), device=DEVICE)
    torch.library.opcheck(sinkhorn_op, (None, y.requires_grad_(), y, log_a, log_a, "sqeuclidean", [0.5] * 4, None, 1,
                                        backend, True))  # fmt: skip
    valid = torch.ones(1, 6, dtype=torch.bool, device=DEVICE)
    args = (randn(1, 6, 20, gen=gen).requires_grad_(), randn(1, 6, 20, gen=gen), valid, 2.0, backend)
    torch.library.opcheck(softmax_l1_cost_op, args)


@pytest.mark.parametrize("backend", SINKHORN_BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compile_fullgraph(compiler, backend, gen):
    """sinkhorn_distill_loss and an envelope sinkhorn are custom ops to torch.compile: no graph break."""
    torch._dynamo.reset()
    student, teacher, x = randn(12, 30, gen=gen), randn(12, 30, gen=gen), randn(2, 9, 3, gen=gen)

    def loss_fn(z, points):
        transport = klops.sinkhorn(x=points, y=points.flip(1) + 1, epsilon=0.5, max_iter=5, tol=None, backend=backend)
        return klops.sinkhorn_distill_loss(z, teacher, n_iter=5, backend=backend) + transport.cost.sum()

    grads = []
    for fn in (loss_fn, torch.compile(loss_fn, backend=compiler, fullgraph=True)):
        z, points = student.clone().requires_grad_(), x.clone().requires_grad_()
        fn(z, points).backward()
        grads.append((z.grad, points.grad))
    for (got_z, got_x), (want_z, want_x) in zip(grads[1:], grads[:1]):
        assert_close(got_z, want_z, (1e-5, 1e-6), "d/dz")
        assert_close(got_x, want_x, (1e-5, 1e-6), "d/dx")


# ----------------------------------------------------------------------------------------------------
# input checks


def test_bad_inputs_are_named():
    cost = torch.rand(2, 3, 4)
    with pytest.raises(ValueError, match="either cost"):
        klops.sinkhorn(cost, x=torch.rand(2, 3, 1), y=torch.rand(2, 4, 1), epsilon=0.1)
    with pytest.raises(ValueError, match=r"cost must have shape \[B, n, m\]"):
        klops.sinkhorn(torch.rand(3, 4), epsilon=0.1)
    with pytest.raises(ValueError, match="cost must not contain NaN"):
        klops.sinkhorn(torch.full((1, 2, 2), math.nan), epsilon=0.1)
    with pytest.raises(ValueError, match="a must be nonnegative"):
        klops.sinkhorn(cost, torch.tensor([[1.5, -0.5, 0.0]] * 2), epsilon=0.1)
    with pytest.raises(ValueError, match="b must sum to 1"):
        klops.sinkhorn(cost, None, torch.full((2, 4), 0.3), epsilon=0.1)
    with pytest.raises(ValueError, match=r"a must have shape \(2, 3\)"):
        klops.sinkhorn(cost, torch.full((2, 4), 0.25), epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon must lie in"):
        klops.sinkhorn(cost, epsilon=0.0)
    with pytest.raises(ValueError, match="cost_fn must be one of"):
        klops.sinkhorn(x=torch.rand(1, 2, 3), y=torch.rand(1, 2, 3), cost_fn="cosine", epsilon=0.1)
    with pytest.raises(ValueError, match="a given cost matrix takes none"):
        klops.sinkhorn(cost, cost_fn="l1", epsilon=0.1)
    with pytest.raises(ValueError, match="must share B, d"):
        klops.sinkhorn(x=torch.rand(1, 2, 3), y=torch.rand(1, 2, 4), epsilon=0.1)
    with pytest.raises(ValueError, match="max_iter must be an int >= 1"):
        klops.sinkhorn(cost, epsilon=0.1, max_iter=0)
    with pytest.raises(ValueError, match="no CUDA kernels"):
        klops.sinkhorn(cost, epsilon=0.1, backend="cuda")
    with pytest.raises(ValueError, match="teacher_logits must have the student's shape"):
        klops.sinkhorn_distill_loss(torch.rand(3, 5), torch.rand(3, 6))
    with pytest.raises(TypeError, match=r"cost must be the tuple \(C_ab, C_aa, C_bb\)"):
        klops.sinkhorn_divergence(cost, epsilon=0.1)
