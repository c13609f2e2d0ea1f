"""Butcher tableaus as data.

Each explicit Runge–Kutta method is one frozen :class:`ButcherTableau`; one generic step
(:mod:`neuralode.solvers.runge_kutta`) consumes them all. Coefficients are facts from the cited papers.

A tableau may carry a *continuous extension*: polynomials ``b_i(θ)`` with ``b_i(1) = b_i`` such that
``y(t0 + θh) ≈ y0 + h Σ_i b_i(θ) k_i``. Where a method has none, cubic Hermite interpolation through
``(y0, f0, y1, f1)`` is used, written in the same form (``f1`` is the last stage of an FSAL method, or an
extra row appended after the stages otherwise).
"""

from __future__ import annotations

import dataclasses
from fractions import Fraction as Fr

import numpy as np
from numpy.polynomial import polynomial as P

__all__ = ["ButcherTableau", "TABLEAUS"]

#: tolerance of the consistency checks on tableaus given as decimals (Tsit5, DOPRI8)
_CHECK_TOL = 1e-12


@dataclasses.dataclass(frozen=True)
class ButcherTableau:
    """An explicit Runge–Kutta method.

    Arguments:
        name: the method's name (as accepted by ``odeint``).
        c: nodes, ``c[0] == 0``.
        a: the strictly lower triangular matrix, row ``i`` holding ``i`` entries.
        b: weights of the propagated solution.
        order: order of the propagated solution; the step-size exponent is ``1/order`` (as torchdiffeq).
        b_err: ``b - b̂`` where ``b̂`` are the weights of the embedded solution (``None`` for fixed-step
            methods without an error estimate).
        dense: optional continuous extension, ``dense[i]`` the ascending polynomial coefficients of
            ``b_i(θ)``, one row per stage.
        source: citation of the coefficients.
    """

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    b_err: tuple[float, ...] | None = None
    dense: tuple[tuple[float, ...], ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(row) != i for i, row in enumerate(self.a)):
            raise ValueError(f"{self.name}: `a` must be strictly lower triangular with {s} rows")
        if len(self.b) != s or (self.b_err is not None and len(self.b_err) != s):
            raise ValueError(f"{self.name}: `b` and `b_err` need one entry per stage ({s})")
        if self.c[0] != 0:
            raise ValueError(f"{self.name}: c[0] must be 0 for an explicit method")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > _CHECK_TOL:
                raise ValueError(f"{self.name}: row {i} of `a` sums to {sum(row)}, not c[{i}] = {self.c[i]}")
        if abs(sum(self.b) - 1) > _CHECK_TOL:
            raise ValueError(f"{self.name}: the weights `b` sum to {sum(self.b)}, not 1")
        if self.b_err is not None and abs(sum(self.b_err)) > _CHECK_TOL:
            raise ValueError(f"{self.name}: `b_err` sums to {sum(self.b_err)}, not 0")
        if self.dense is not None:
            if len(self.dense) != s:
                raise ValueError(f"{self.name}: `dense` needs one polynomial per stage")
            for i, poly in enumerate(self.dense):
                if abs(P.polyval(1.0, poly) - self.b[i]) > 1e-9 or abs(poly[0]) > _CHECK_TOL:
                    raise ValueError(f"{self.name}: dense polynomial {i} must vanish at 0 and equal b[{i}] at 1")

    @property
    def stages(self) -> int:
        """Number of stages (evaluations of ``func`` per step, one fewer after the first for FSAL methods)."""
        return len(self.c)

    @property
    def fsal(self) -> bool:
        """First-same-as-last: the last stage is evaluated at (t0 + h, y1), so it is the next step's first."""
        return self.c[-1] == 1 and tuple(self.a[-1]) == tuple(self.b[:-1]) and self.b[-1] == 0

    @property
    def adaptive(self) -> bool:
        """Whether the method has an embedded error estimate (``b_err``), i.e. supports adaptive steps."""
        return self.b_err is not None

    @property
    def f1_index(self) -> int:
        """Row of ``f(t0 + h, y1)`` in the extended stage matrix used by interpolation."""
        return self.stages - 1 if self.fsal else self.stages

    def interpolation_matrix(self, kind: str = "dense") -> np.ndarray:
        """Matrix ``W`` (rows: extended stages, columns: powers θ¹..θᴰ) with ``b_i(θ) = Σ_d W[i, d-1] θ^d``.

        ``kind="dense"`` uses the method's continuous extension when it has one and cubic Hermite
        otherwise; ``"hermite"`` forces cubic Hermite; ``"linear"`` is linear interpolation.
        """
        rows = self.stages if self.fsal else self.stages + 1
        b = np.zeros(rows)
        b[: self.stages] = self.b
        if kind == "dense" and self.dense is not None:
            polys = [np.asarray(p, dtype=np.float64) for p in self.dense] + [np.zeros(1)] * (rows - self.stages)
        elif kind == "linear":
            polys = [np.array([0.0, bi]) for bi in b]
        elif kind in ("dense", "hermite", "cubic"):
            # y(θ) = y0 + h01(θ) (y1 - y0) + h h10(θ) f0 + h h11(θ) f1, the cubic Hermite basis
            h01, h10, h11 = np.array([0, 0, 3, -2.0]), np.array([0, 1, -2, 1.0]), np.array([0, 0, -1, 1.0])
            polys = [h01 * bi for bi in b]
            polys[0] = P.polyadd(polys[0], h10)
            polys[self.f1_index] = P.polyadd(polys[self.f1_index], h11)
        else:
            raise ValueError(f"unknown interpolation kind {kind!r}; expected 'dense', 'cubic' or 'linear'")
        degree = max(len(p) for p in polys) - 1
        out = np.zeros((rows, degree))
        for i, p in enumerate(polys):
            out[i, : len(p) - 1] = p[1:]
        return out


def _f(*xs) -> tuple[float, ...]:
    return tuple(float(Fr(x)) if isinstance(x, str) else float(x) for x in xs)


def _rows(*rows) -> tuple[tuple[float, ...], ...]:
    return tuple(_f(*r) for r in rows)


# ----------------------------------------------------------------------------------------------------------
# Fixed-step methods. Hairer, Nørsett & Wanner, "Solving ODEs I" (2nd ed., 1993), §II.1 tables 1.1–1.2.
EULER = ButcherTableau("euler", _f(0), _rows(()), _f(1), order=1, source="Euler (1768); HNW I §II.1")
MIDPOINT = ButcherTableau(
    "midpoint", _f(0, "1/2"), _rows((), ("1/2",)), _f(0, 1), order=2, source="Runge (1895); HNW I §II.1"
)
HEUN2 = ButcherTableau("heun2", _f(0, 1), _rows((), (1,)), _f("1/2", "1/2"), order=2, source="Heun (1900); HNW I §II.1")
HEUN3 = ButcherTableau(
    "heun3",
    _f(0, "1/3", "2/3"),
    _rows((), ("1/3",), (0, "2/3")),
    _f("1/4", 0, "3/4"),
    order=3,
    source="Heun (1900); HNW I table II.1.1",
)
RK4 = ButcherTableau(  # the "3/8 rule", which torchdiffeq's `rk4` uses
    "rk4",
    _f(0, "1/3", "2/3", 1),
    _rows((), ("1/3",), ("-1/3", 1), (1, -1, 1)),
    _f("1/8", "3/8", "3/8", "1/8"),
    order=4,
    source="Kutta (1901), 3/8 rule; HNW I table II.1.2",
)

# ----------------------------------------------------------------------------------------------------------
# Adaptive (embedded) methods.
ADAPTIVE_HEUN = ButcherTableau(  # Heun's method with Euler embedded: order 2(1)
    "adaptive_heun",
    _f(0, 1),
    _rows((), (1,)),
    _f("1/2", "1/2"),
    order=2,
    b_err=_f("-1/2", "1/2"),
    source="Heun–Euler 2(1) pair; HNW I §II.4",
)
FEHLBERG2 = ButcherTableau(  # RKF1(2): the order-2 solution is propagated, as in torchdiffeq
    "fehlberg2",
    _f(0, "1/2", 1),
    _rows((), ("1/2",), ("1/256", "255/256")),
    _f("1/512", "255/256", "1/512"),
    order=2,
    b_err=_f("1/512", 0, "-1/512"),
    source="Fehlberg, NASA TR R-315 (1969), RKF1(2)",
)
BOSH3 = ButcherTableau(
    "bosh3",
    _f(0, "1/2", "3/4", 1),
    _rows((), ("1/2",), (0, "3/4"), ("2/9", "1/3", "4/9")),
    _f("2/9", "1/3", "4/9", 0),
    order=3,
    b_err=tuple(x - y for x, y in zip(_f("2/9", "1/3", "4/9", 0), _f("7/24", "1/4", "1/3", "1/8"))),
    source="Bogacki & Shampine, Appl. Math. Lett. 2(4) 321–325 (1989)",
)

_DP5_B = _f("35/384", 0, "500/1113", "125/192", "-2187/6784", "11/84", 0)
_DP5_BHAT = _f("5179/57600", 0, "7571/16695", "393/640", "-92097/339200", "187/2100", "1/40")
# Dense output of DOPRI5 (Hairer, Nørsett & Wanner I §II.6, the coefficients of the code DOPRI5's CONTD5):
# y(θ) = y0 + θ r2 + θ(1-θ) r3 + θ²(1-θ) r4 + θ²(1-θ)² r5 with r2 = y1 - y0, r3 = h k1 - r2,
# r4 = 2 r2 - h k1 - h k7 and r5 = h Σ d_i k_i.
_DP5_D = _f(
    "-12715105075/11282082432",
    0,
    "87487479700/32700410799",
    "-10690763975/1880347072",
    "701980252875/199316789632",
    "-1453857185/822651844",
    "69997945/29380423",
)


def _dopri5_dense() -> tuple[tuple[float, ...], ...]:
    th = np.array([0.0, 1.0])
    one_minus = np.array([1.0, -1.0])
    p1, p2 = th, P.polymul(th, one_minus)
    p3 = P.polymul(P.polymul(th, th), one_minus)
    p4 = P.polymul(p3, one_minus)
    out = []
    for i in range(7):
        e1, e7 = float(i == 0), float(i == 6)
        poly = P.polyadd(P.polyadd(p1 * _DP5_B[i], p2 * (e1 - _DP5_B[i])), p3 * (2 * _DP5_B[i] - e1 - e7))
        out.append(tuple(P.polyadd(poly, p4 * _DP5_D[i])))
    return tuple(out)


DOPRI5 = ButcherTableau(
    "dopri5",
    _f(0, "1/5", "3/10", "4/5", "8/9", 1, 1),
    _rows(
        (),
        ("1/5",),
        ("3/40", "9/40"),
        ("44/45", "-56/15", "32/9"),
        ("19372/6561", "-25360/2187", "64448/6561", "-212/729"),
        ("9017/3168", "-355/33", "46732/5247", "49/176", "-5103/18656"),
        _DP5_B[:6],
    ),
    _DP5_B,
    order=5,
    b_err=tuple(x - y for x, y in zip(_DP5_B, _DP5_BHAT)),
    dense=_dopri5_dense(),
    source="Dormand & Prince, J. Comput. Appl. Math. 6(1) 19–26 (1980); dense output HNW I §II.6",
)

# Tsitouras, "Runge–Kutta pairs of order 5(4) satisfying only the first column simplifying assumption",
# Comput. Math. Appl. 62(2) 770–775 (2011): Table 1 (coefficients) and the interpolant b_i(θ) of §4.
_TS5_B = (0.09646076681806523, 0.01, 0.4798896504144996, 1.379008574103742, -3.290069515436081, 2.324710524099774, 0.0)
_TS5_BERR = (  # b - b̂, from the paper's table of b̂_i - b_i (sign irrelevant to the norm)
    0.00178001105222577714,
    0.0008164344596567469,
    -0.007880878010261995,
    0.1447110071732629,
    -0.5823571654525552,
    0.45808210592918697,
    -1 / 66,
)


def _tsit5_dense() -> tuple[tuple[float, ...], ...]:
    def prod(*polys):
        out = np.array([1.0])
        for p in polys:
            out = P.polymul(out, np.asarray(p, dtype=np.float64))
        return out

    th, th2 = [0, 1], [0, 0, 1]
    polys = [
        -1.0530884977290216 * prod(th, [-1.3299890189751412, 1], [0.7139816917074209, -1.4364028541716351, 1]),
        0.1017 * prod(th2, [1.2949852507374631, -2.1966568338249754, 1]),
        2.490627285651252793 * prod(th2, [1.57803468208092486, -2.38535645472061657, 1]),
        -16.54810288924490272 * prod(th2, [-1.21712927295533244, 1], [-0.61620406037800089, 1]),
        47.37952196281928122 * prod(th2, [-1.203071208372362603, 1], [-0.658047292653547382, 1]),
        -34.87065786149660974 * prod(th2, [-1.2, 1], [-0.666666666666666667, 1]),
        2.5 * prod(th2, [-1, 1], [-0.6, 1]),
    ]
    return tuple(tuple(p) for p in polys)


TSIT5 = ButcherTableau(
    "tsit5",
    (0.0, 0.161, 0.327, 0.9, 0.9800255409045097, 1.0, 1.0),
    (
        (),
        (0.161,),
        (-0.008480655492356989, 0.335480655492357),
        (2.8971530571054935, -6.359448489975075, 4.3622954328695815),
        (5.325864828439257, -11.748883564062828, 7.4955393428898365, -0.09249506636175525),
        (5.86145544294642, -12.92096931784711, 8.159367898576159, -0.071584973281401, -0.02826905039406838),
        _TS5_B[:6],
    ),
    _TS5_B,
    order=5,
    b_err=_TS5_BERR,
    dense=_tsit5_dense(),
    source="Tsitouras, Comput. Math. Appl. 62(2) 770–775 (2011)",
)

# Prince & Dormand, "High order embedded Runge–Kutta formulae", J. Comput. Appl. Math. 7(1) 67–75 (1981):
# RK8(7)13M, the rational approximations printed there. The 14th row is the FSAL evaluation at (t0+h, y1).
_DP8_C = (
    0.0,
    1 / 18,
    1 / 12,
    1 / 8,
    5 / 16,
    3 / 8,
    59 / 400,
    93 / 200,
    5490023248 / 9719169821,
    13 / 20,
    1201146811 / 1299019798,
    1.0,
    1.0,
    1.0,
)
_DP8_A_BODY = (
    (1 / 18,),
    (1 / 48, 1 / 16),
    (1 / 32, 0, 3 / 32),
    (5 / 16, 0, -75 / 64, 75 / 64),
    (3 / 80, 0, 0, 3 / 16, 3 / 20),
    (29443841 / 614563906, 0, 0, 77736538 / 692538347, -28693883 / 1125000000, 23124283 / 1800000000),
    (
        16016141 / 946692911,
        0,
        0,
        61564180 / 158732637,
        22789713 / 633445777,
        545815736 / 2771057229,
        -180193667 / 1043307555,
    ),
    (
        39632708 / 573591083,
        0,
        0,
        -433636366 / 683701615,
        -421739975 / 2616292301,
        100302831 / 723423059,
        790204164 / 839813087,
        800635310 / 3783071287,
    ),
    (
        246121993 / 1340847787,
        0,
        0,
        -37695042795 / 15268766246,
        -309121744 / 1061227803,
        -12992083 / 490766935,
        6005943493 / 2108947869,
        393006217 / 1396673457,
        123872331 / 1001029789,
    ),
    (
        -1028468189 / 846180014,
        0,
        0,
        8478235783 / 508512852,
        1311729495 / 1432422823,
        -10304129995 / 1701304382,
        -48777925059 / 3047939560,
        15336726248 / 1032824649,
        -45442868181 / 3398467696,
        3065993473 / 597172653,
    ),
    (
        185892177 / 718116043,
        0,
        0,
        -3185094517 / 667107341,
        -477755414 / 1098053517,
        -703635378 / 230739211,
        5731566787 / 1027545527,
        5232866602 / 850066563,
        -4093664535 / 808688257,
        3962137247 / 1805957418,
        65686358 / 487910083,
    ),
    (
        403863854 / 491063109,
        0,
        0,
        -5068492393 / 434740067,
        -411421997 / 543043805,
        652783627 / 914296604,
        11173962825 / 925320556,
        -13158990841 / 6184727034,
        3936647629 / 1978049680,
        -160528059 / 685178525,
        248638103 / 1413531060,
        0,
    ),
)
_DP8_B = (
    14005451 / 335480064,
    0,
    0,
    0,
    0,
    -59238493 / 1068277825,
    181606767 / 758867731,
    561292985 / 797845732,
    -1041891430 / 1371343529,
    760417239 / 1151165299,
    118820643 / 751138087,
    -528747749 / 2220607170,
    1 / 4,
    0.0,
)
_DP8_BHAT = (
    13451932 / 455176623,
    0,
    0,
    0,
    0,
    -808719846 / 976000145,
    1757004468 / 5645159321,
    656045339 / 265891186,
    -3867574721 / 1518517206,
    465885868 / 322736535,
    53011238 / 667516719,
    2 / 45,
    0,
    0.0,
)
# Continuous extension of RK8(7)13M used by torchdiffeq and diffrax: b_i(θ) = θ (p0 + p1 θ + ... + p5 θ⁵),
# given below as (p5, p4, p3, p2, p1, p0) for the stages that have one.
_DP8_DENSE_DESC = {
    0: (
        -6.3448349392860401388,
        22.1396504998094068976,
        -30.0610568289666450593,
        19.9990069333683970610,
        -6.6910181737837595697,
        1.0,
    ),
    5: (
        -39.6107919852202505218,
        116.4422149550342161651,
        -121.4999627731334642623,
        52.2273532792945524050,
        -7.6142658045872677172,
        0.0,
    ),
    6: (
        20.3761213808791436958,
        -67.1451318825957197185,
        83.1721004639847717481,
        -46.8919164181093621583,
        10.7281392630428866124,
        0.0,
    ),
    7: (
        7.3347098826795362023,
        -16.5672243527496524646,
        9.5724507555993664382,
        -0.1890893225010595467,
        0.5526637063753648783,
        0.0,
    ),
    8: (
        32.8801774352459155182,
        -89.9916014847245016028,
        87.8406057677205645007,
        -35.7075975946222072821,
        4.2186562625665153803,
        0.0,
    ),
    9: (
        -10.1588990526426760954,
        22.6237489648532849093,
        -17.4152107770762969005,
        6.2736448083240352160,
        -0.6627209125361597559,
        0.0,
    ),
    10: (
        -12.5401268098782561200,
        32.2362340167355370113,
        -28.5903289514790976966,
        10.3160881272450748458,
        -1.2636789001135462218,
        0.0,
    ),
    11: (
        29.5553001484516038033,
        -82.1020315488359848644,
        81.6630950584341412934,
        -34.7650769866611817349,
        5.4106037898590422230,
        0.0,
    ),
    12: (
        -41.7923486424390588923,
        116.2662185791119533462,
        -114.9375291377009418170,
        47.7457971078225540396,
        -7.0321379067945741781,
        0.0,
    ),
    13: (
        20.3006925822100825485,
        -53.9020777466385396792,
        50.2558364226176017553,
        -19.0082099341608028453,
        2.3537586759714983486,
        0.0,
    ),
}


def _dopri8_dense() -> tuple[tuple[float, ...], ...]:
    out = []
    for i in range(14):
        desc = _DP8_DENSE_DESC.get(i)
        out.append((0.0,) + tuple(reversed(desc)) if desc else (0.0, 0.0))
    return tuple(out)


DOPRI8 = ButcherTableau(
    "dopri8",
    _DP8_C,
    ((),) + _DP8_A_BODY + (_DP8_B[:13],),
    _DP8_B,
    order=8,
    b_err=tuple(x - y for x, y in zip(_DP8_B, _DP8_BHAT)),
    dense=_dopri8_dense(),
    source="Prince & Dormand, J. Comput. Appl. Math. 7(1) 67–75 (1981), RK8(7)13M",
)

TABLEAUS: dict[str, ButcherTableau] = {
    t.name: t for t in (EULER, MIDPOINT, HEUN2, HEUN3, RK4, ADAPTIVE_HEUN, FEHLBERG2, BOSH3, DOPRI5, TSIT5, DOPRI8)
}
"""The explicit Runge–Kutta methods by name (``"dopri5"``, ``"tsit5"``, ``"rk4"``, ...): each a
:class:`ButcherTableau` with its coefficients and their source, e.g. ``TABLEAUS["dopri5"].order == 5``."""
