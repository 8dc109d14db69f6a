"""Shared fixtures: the backends and device under test, seeded generators, and a verbose allclose."""

import os
import zlib

# Compile from scratch in every run: Inductor's on-disk caches are keyed without the Python source of
# custom ops' autograd, so a cached backward graph can outlive a change of the op's signature.
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from klops.backend import available_backends, op_backends  # noqa: E402
from klops.kernels.kinds import KINDS  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# Every concrete backend usable here: torch always; triton on a GPU or under TRITON_INTERPRET=1
# (CI runs the suite that way); cuda when klops._C is built and a GPU is present; cpu on the CPU where the C++
# CPU kernels build (the first call of available_backends builds them, once per cache: klops/_cpu.py).
BACKENDS = available_backends(DEVICE)


def backends_of(op: str) -> list[str]:
    """The backends of BACKENDS that op family ``op`` (a key of klops.backend.PREFERENCES) has kernels for."""
    return [b for b in BACKENDS if b in op_backends(op)]


# (rtol, atol as a fraction of max |expected|) for kernel vs float64 reference, by input dtype.
# Losses are accumulated in fp32 whatever the input; gradients are rounded to the input dtype. In fp32
# the gradients of the divergences cancel down to the rounding of log q - log p (the row max is taken
# out before dividing by T, so that is a few eps |log q|): at T = 0.3, jsd's reaches 1.7e-5 of the
# largest entry.
LOSS_TOL = {torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-5, 1e-6), torch.float16: (1e-5, 1e-6)}
GRAD_TOL = {torch.float32: (1e-4, 5e-5), torch.bfloat16: (1.6e-2, 4e-3), torch.float16: (2e-3, 1e-3)}


# The coefficient each divergence kind is tested with, as keyword arguments: kernels/kinds.py's example, away from
# the default 1/2 so that a swapped beta / alpha cannot pass; kinds without a coefficient are absent.
COEF = {kind.name: {kind.coefficient: kind.example} for kind in KINDS if kind.coefficient}


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    """A test run with backend="cpu" through an op family that has no C++ CPU kernels (klops.backend.PREFERENCES:
    the ops of the `backend` fixture share its parameters) is skipped, with the error that says so: the ValueError
    itself, or the failure of a pytest.raises that met it instead of the error it expected."""
    try:
        return (yield)
    except Exception as error:
        if "backend='cpu': " in str(error) and " has no C++ CPU kernels" in str(error):
            pytest.skip(str(error).splitlines()[-1])
        raise


@pytest.fixture
def gen(request):
    """A generator seeded from the test id: fresh inputs per test, reproducible per test."""
    seed = zlib.crc32(request.node.nodeid.encode())
    return torch.Generator().manual_seed(seed)


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(shape, generator=gen, dtype=torch.float64) * scale).to(dtype).to(DEVICE)


def assert_close(actual, expected, tol, what="", floor=1e-12):
    """allclose with atol relative to the largest expected magnitude (at least ``floor``, for values
    that should be 0 up to rounding); prints the worst mismatches."""
    rtol, atol_frac = tol
    expected = expected.to(torch.float64)
    actual = actual.to(torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    finite = expected[torch.isfinite(expected)]
    atol = max(atol_frac * (finite.abs().max().item() if finite.numel() else 1.0), floor)
    ok = torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    ok |= (actual == expected) & ~torch.isfinite(expected)  # same infinities
    if not bool(ok.all()):
        bad = (~ok).nonzero()[:5].tolist()
        rows = [f"  at {i}: got {actual[tuple(i)].item():.8g}, expected {expected[tuple(i)].item():.8g}" for i in bad]
        raise AssertionError(
            f"{what}: {(~ok).sum().item()} of {ok.numel()} mismatched (rtol={rtol}, atol={atol:.3g})\n"
            + "\n".join(rows)
        )


# Integer label dtypes a trainer may hold; every backend must accept each of them.
LABEL_DTYPES = [torch.int8, torch.int16, torch.uint8, torch.int32, torch.int64]


def empty_rows(V: int, gen) -> dict:
    """Inputs with no rows in the leading layouts a trainer produces, by name: [0, V], [B, 0, V] sliced
    from length-1 sequences (``logits[:, :-1]``), [0, L, V], and a 4-D [B, 0, H, V]."""
    return {
        "[0, V]": randn(0, V, gen=gen),
        "[B, 1, V][:, :-1]": randn(2, 1, V, gen=gen)[:, :-1],
        "[0, L, V]": randn(0, 3, V, gen=gen),
        "[B, 0, H, V]": randn(2, 0, 3, V, gen=gen),
    }
