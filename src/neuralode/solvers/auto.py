"""Automatic stiffness switching: the pieces behind ``method="auto"``.

A solve starts with an explicit pair (tsit5) and watches how stiff the problem is from what the steps already
compute; when the explicit steps are held at their stability limit it hands over to rodas4, and back when the
stiff steps become short enough for the explicit method to be stable again.

* Explicit phase: an estimate of the dominant eigenvalue at no extra evaluation, from the two last stages of a
  pair whose last two nodes are both 1 (tsit5, dopri5). Stage s−1 is evaluated at ``g = y + h Σ a_{s−1,j} k_j``
  and stage s at ``y1`` (first same as last), both at ``t + h``; for ``y' = J y``, ``k_s − k_{s−1} = J (y1 − g)``,
  so ``ρ = ‖k_s − k_{s−1}‖ / ‖y1 − g‖`` estimates ``|λ_max|`` (Hairer's DOPRI5 stiffness test, Hairer & Wanner,
  *Solving ODEs II*, §IV.2; the test in ``dopri5.f``).
* Stiff phase: ``ρ = ‖J‖_∞`` of the Jacobian each Rosenbrock step forms (an upper bound on the spectral
  radius, so the way back is conservative), as in DifferentialEquations.jl's ``AutoSwitch``.
* A step counts as stiff when ``ρ·|h| > tol · S``, with ``S`` the explicit method's stability boundary on the
  negative real axis (computed from its tableau) and ``tol = 3/4`` (``AutoSwitch``'s documented ``nonstifftol``:
  on stiff linear problems tsit5's controller settles at ``ρ·|h|`` ≈ 2.5–3.0, below 0.9 · S = 3.16, measured).
  Hysteresis as in ``dopri5.f``: switch to the stiff method
  after 15 stiff steps not interrupted by 6 consecutive non-stiff ones; back after 4 consecutive non-stiff
  steps of the stiff method (``AutoSwitch``'s ``maxnonstiffstep = 3``).
"""

from __future__ import annotations

import bisect
import math

import numpy as np
import torch

from .tableaus import ButcherTableau

__all__ = [
    "stability_boundary",
    "SwitchRule",
    "explicit_stiffness",
    "supports_estimate",
    "StepperSchedule",
    "stepper_of",
]


def stability_boundary(tableau: ButcherTableau, x_max: float = 50.0) -> float:
    """Largest x with |R(−ξ)| ≤ 1 for every ξ in [0, x], where R(z) = 1 + Σ_k z^k bᵀA^(k−1)𝟙 is the explicit
    method's stability polynomial (Hairer & Wanner, *Solving ODEs II*, §IV.2): how far along the negative real
    axis ``h λ`` may go while the step stays stable."""
    s = len(tableau.c)
    A = np.zeros((s, s))
    for i, row in enumerate(tableau.a):
        A[i, : len(row)] = row
    b = np.asarray(tableau.b, dtype=np.float64)
    coef, v = [1.0], np.ones(s)
    for _ in range(s):  # (A is nilpotent: at most s terms)
        coef.append(float(b @ v))
        v = A @ v
    R = np.polynomial.Polynomial(coef)
    xs = np.linspace(0.0, x_max, int(x_max * 1000) + 1)[1:]
    bad = np.nonzero(np.abs(R(-xs)) > 1.0 + 1e-12)[0]
    if len(bad) == 0:
        return x_max
    lo, hi = (xs[bad[0] - 1] if bad[0] else 0.0), xs[bad[0]]
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if abs(R(-mid)) > 1.0 + 1e-12 else (mid, hi)
    return float(lo)


def supports_estimate(tableau: ButcherTableau) -> bool:
    """Whether the free eigenvalue estimate applies: first same as last, and the stage before the last also at
    ``t + h``."""
    c = tableau.c
    return tableau.fsal and len(c) >= 3 and c[-1] == 1.0 and c[-2] == 1.0


class _Rows:
    """The two combinations of stage rows the estimate needs, as one ``(2, s)`` matrix per dtype and device: row 0
    gives ``k_s − k_{s−1}``, row 1 ``w`` with ``y1 − g_{s−1} = h Σ_j w_j k_j`` (``w = a_s − a_{s−1}``)."""

    def __init__(self, tableau: ButcherTableau) -> None:
        s = len(tableau.c)
        W = np.zeros((2, s))
        W[0, s - 1], W[0, s - 2] = 1.0, -1.0
        W[1, : len(tableau.a[-1])] += tableau.a[-1]
        W[1, : len(tableau.a[-2])] -= tableau.a[-2]
        self.W = W
        self._cache: dict = {}

    def __call__(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (dtype, device)
        if key not in self._cache:
            self._cache[key] = torch.tensor(self.W, dtype=dtype, device=device)
        return self._cache[key]


_ROWS: dict = {}


def explicit_stiffness(tableau: ButcherTableau, K: torch.Tensor, h: float) -> float:
    """``ρ`` from an accepted explicit step's stage rows ``K`` (``(rows, N)``) of step size ``h``; 0 where
    ``y1 = g`` (nothing to estimate from) and NaN where a stage is not finite."""
    rows = _ROWS.get(tableau)
    if rows is None:
        rows = _ROWS[tableau] = _Rows(tableau)
    s = len(tableau.c)
    with torch.no_grad():
        M = torch.mm(rows(K.dtype, K.device), K.detach()[:s])
        num, den = torch.linalg.vector_norm(M, dim=1).tolist()
    if not (math.isfinite(num) and math.isfinite(den)):
        return math.nan
    if den == 0.0:
        return 0.0
    return num / (den * abs(h))


class SwitchRule:
    """When to switch, from one ``ρ · |h|`` per accepted step (``stiff`` says which method took it).

    Arguments:
        boundary: the explicit method's stability boundary ``S`` on the negative real axis.
        tol: a step is stiff when ``ρ |h| > tol · S`` (or ``ρ`` is NaN).
        to_stiff, reset_after: switch to the stiff method after ``to_stiff`` stiff explicit steps not broken
            by ``reset_after`` consecutive non-stiff ones (``dopri5.f``: 15 and 6).
        to_explicit: switch back after this many consecutive non-stiff steps of the stiff method.
    """

    def __init__(
        self, boundary: float, tol: float = 0.75, to_stiff: int = 15, reset_after: int = 6, to_explicit: int = 4
    ) -> None:
        self.limit = tol * boundary
        self.to_stiff, self.reset_after, self.to_explicit = to_stiff, reset_after, to_explicit
        self.reset()

    def reset(self) -> None:
        self.stiff_count = 0
        self.calm_count = 0

    def __call__(self, rho: float, h: float, stiff: bool) -> bool:
        """Record one accepted step; True when the solve should switch method now."""
        is_stiff = not (rho * abs(h) <= self.limit)  # (NaN counts as stiff)
        if is_stiff:
            self.stiff_count += 1
            self.calm_count = 0
        else:
            self.calm_count += 1
            if self.calm_count >= self.reset_after and not stiff:
                self.stiff_count = 0
        if stiff:
            return self.calm_count >= self.to_explicit
        return self.stiff_count >= self.to_stiff


class StepperSchedule:
    """Which stepper took each recorded step of a switching solve (for replaying steps: checkpointed
    gradients): ``at(i)`` is the stepper of step ``i``."""

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.steppers: list = []

    def add(self, first_step: int, stepper) -> None:
        if self.starts and self.starts[-1] == first_step:  # (a phase that took no step)
            self.steppers[-1] = stepper
            return
        self.starts.append(first_step)
        self.steppers.append(stepper)

    def at(self, i: int):
        return self.steppers[bisect.bisect_right(self.starts, i) - 1]

    def finish(self):
        """The one stepper where a single one ran, else this schedule."""
        return self.steppers[0] if len(set(map(id, self.steppers))) == 1 else self


def stepper_of(method, i: int):
    """The stepper that took step ``i`` of a solve whose result's ``method`` is ``method``."""
    return method.at(i) if isinstance(method, StepperSchedule) else method
