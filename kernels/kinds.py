"""The divergence kinds of ``fused_kl`` (docs/losses.md §1): one entry each, in the order of their integer ids (the
Triton kernels' ``KIND`` constexpr and the CUDA ops' ``kind`` argument index ``KINDS``).

Everything that lists kinds reads this table: the argument checks and their messages (klops/divergence.py), the
``TopK(tail="renormalize")`` check (klops/topk.py), the tests' coefficients (tests/conftest.py), the bench cases, and
the test that docs/losses.md's tables list these kinds. Imports nothing, so that the kernels (installed as
``klops.kernels``, without klops) read it too. CONTRIBUTING.md says what else a new kind takes.
"""

import math
from collections.abc import Callable
from typing import NamedTuple

ALWAYS = (-math.inf, math.inf)  # every coefficient: the kind's infinite_where_p_is_0 when it is infinite there whatever


def nothing_where_p_is_0(coef: float) -> tuple[float, float]:
    return 0.0, 0.0


class Kind(NamedTuple):
    name: str
    coefficient: str | None = None  # the argument that sets it ("beta" or "alpha"), None when it takes none
    default: float | None = None  # the coefficient when the argument is not given
    range: tuple[float, float] | None = None  # of the coefficient, closed where finite
    same_as: tuple[tuple[float, str], ...] = ()  # (coefficient, kind): there it is exactly that kind, computed as it
    excluded: tuple[tuple[float, str], ...] = ()  # (coefficient, kind): rejected, it only tends to that kind there
    # Coefficients (a closed interval; ALWAYS; None: never) at which D is +inf where p = 0 < q, as against a TopK
    # teacher with tail="renormalize", which such kinds refuse.
    infinite_where_p_is_0: tuple[float, float] | None = None
    # coef -> (loss_v, a_v) / q_v of an entry where p_v = 0 (both linear in q_v: q f(0), q g(0)) where finite: the
    # tail of TopK(tail="renormalize"), a multiple of the student's mass outside the top-k (docs/losses.md §1).
    where_p_is_0: Callable[[float], tuple[float, float]] = nothing_where_p_is_0
    example: float | None = None  # a coefficient away from the default, for the tests and benchmarks
    anchor: str = "#1-token-level-divergences-klopsfused_kl"  # the docs/losses.md heading whose tables define it


KINDS = (
    Kind("forward"),
    Kind("reverse", infinite_where_p_is_0=ALWAYS),
    Kind("jsd", "beta", 0.5, (0.0, 1.0), same_as=((0.0, "forward"), (1.0, "reverse")),
         infinite_where_p_is_0=(1.0, 1.0),
         where_p_is_0=lambda beta: (-(1 - beta) * math.log1p(-beta),) * 2,  # (1-beta) q log(q / ((1-beta) q))
         example=0.3),
    Kind("skew_forward", "alpha", 0.5, (0.0, 1.0), example=0.2),
    Kind("skew_reverse", "alpha", 0.5, (0.0, 1.0), infinite_where_p_is_0=(0.0, 0.0),
         where_p_is_0=lambda alpha: (-math.log(alpha),) * 2, example=0.3),  # q log(q / (alpha q))
    Kind("tv", where_p_is_0=lambda _: (0.5, 0.5)),
    Kind("alpha", "alpha", 0.5, (-math.inf, math.inf), excluded=((0.0, "reverse"), (1.0, "forward")),
         infinite_where_p_is_0=(-math.inf, 0.0),
         where_p_is_0=lambda alpha: (1.0 / (alpha * (1.0 - alpha)), 0.0),  # (q - 0) / (alpha (1-alpha)); a = 0
         example=0.7),
)  # fmt: skip
DIVERGENCE_KINDS = tuple(kind.name for kind in KINDS)
BY_NAME = {kind.name: kind for kind in KINDS}


def default_coefficient(name: str) -> dict:
    """Kind ``name``'s default coefficient as keyword arguments ({"beta": 0.5} for jsd); {} for a kind without one."""
    kind = BY_NAME[name]
    return {kind.coefficient: kind.default} if kind.coefficient else {}


def infinite_where_p_is_0(name: str, coef: float = 0.0) -> bool:
    """Whether kind ``name`` with coefficient ``coef`` is +inf where p = 0 < q (TopK tail="renormalize" refuses it)."""
    where = BY_NAME[name].infinite_where_p_is_0
    return where is not None and where[0] <= coef <= where[1]


def finite_where_p_is_0() -> str:
    """The kinds finite where p = 0 < q, in words: "forward, jsd with beta < 1, ..."."""
    words = []
    for kind in KINDS:
        where = kind.infinite_where_p_is_0
        if where is None:
            words.append(kind.name)
        elif where != ALWAYS:  # an interval at one end of the coefficient's range: finite beyond its other end
            condition = f"< {where[0]:g}" if where[1] >= kind.range[1] else f"> {where[1]:g}"
            words.append(f"{kind.name} with {kind.coefficient} {condition}")
    return ", ".join(words)
