"""Algebraically reversible solvers: every step can be undone exactly from its end state, so a backward pass
can rebuild the forward states from the last one instead of storing them (``gradient="reversible"``).

Two schemes, each a small class with ``init`` (the scheme's state from y0), ``step`` (one step and its local
error vector) and ``back`` (the step undone):

- :class:`ReversibleHeun`, Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural
  SDEs", NeurIPS 34, arXiv:2105.13493, the ODE case (no noise increment): state (y, ŷ, f(t, ŷ)), one evaluation
  per step, order 2; error estimate ½(f₁ − f₀)h (the Euler–Heun difference).
- :class:`CoupledRK`, McCallum & Foster (2024), "Efficient, accurate and stable gradients for neural ODEs",
  arXiv:2410.11648: any explicit Runge–Kutta base step Ψ and a coupling λ ∈ (0, 1] drive two states (y, z)
  with y₀ = z₀: y₁ = λy + (1 − λ)z + Ψ_h(t, z), z₁ = z − Ψ_{−h}(t + h, y₁); two base steps per step, the
  base method's order; the error estimate is the base method's for the second sub-step.

Both are weakly stable for strongly dissipative dynamics (reversible Heun's parasitic root grows like e^{h|μ|}
on y' = μy, μ < 0; the coupled scheme damps it only while h|μ| ≲ 1 − λ), and undoing a step amplifies
round-off (by up to 1/λ per step for the coupled scheme): float64 states and a coupling close to 1 suit long
or dissipative solves.

The loop lands a step on every output time (no interpolation between the stored states), keeps the grid of
accepted steps, and with ``keep_segments`` gives linear dense output between steps.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from .control import StepController, initial_step
from .integrate import RHS, IntegrationResult, Status
from .tableaus import ButcherTableau

__all__ = ["ReversibleHeun", "CoupledRK", "integrate_reversible", "LinearSegment"]


class ReversibleHeun:
    """Reversible Heun (Kidger et al. 2021, the ODE case of their reversible scheme)."""

    order = 2
    evals_per_step = 1

    def init(self, rhs: RHS, t: float, y: torch.Tensor) -> tuple:
        return (y, y, rhs.at(t, y))

    def step(self, rhs: RHS, t: float, h: float, s: tuple) -> tuple:
        y, yh, f = s
        yh1 = 2 * y - yh + h * f
        f1 = rhs.at(t + h, yh1)
        y1 = y + (0.5 * h) * (f + f1)
        return (y1, yh1, f1), (0.5 * h) * (f1 - f)

    def back(self, rhs: RHS, t1: float, h: float, s1: tuple) -> tuple:
        y1, yh1, f1 = s1
        yh = 2 * y1 - yh1 - h * f1
        f = rhs.at(t1 - h, yh)
        return (y1 - (0.5 * h) * (f + f1), yh, f)


class CoupledRK:
    """McCallum & Foster's reversible scheme around an explicit Runge–Kutta ``base`` with coupling ``lam``."""

    def __init__(self, base: ButcherTableau, lam: float) -> None:
        if not (isinstance(lam, (int, float)) and not isinstance(lam, bool) and 0 < lam <= 1):
            raise ValueError(f"option `coupling` must be a number in (0, 1], got {lam!r}")
        self.base, self.lam = base, float(lam)
        self.order = int(base.order)
        self.evals_per_step = 2 * len(base.b)
        self._a = [list(row) for row in base.a]
        self._c, self._b = list(base.c), list(base.b)
        self._e = None if base.b_err is None else list(base.b_err)

    def _psi(self, rhs: RHS, t: float, h: float, y: torch.Tensor) -> tuple:
        """The base method's increment y(t + h) − y from y, and its error vector (None without b_err)."""
        K: list[torch.Tensor] = []
        for i, ci in enumerate(self._c):
            yi = y
            for aij, k in zip(self._a[i], K):
                if aij:
                    yi = yi + (h * aij) * k
            K.append(rhs.at(t + ci * h, yi))
        inc = sum((h * bi) * k for bi, k in zip(self._b, K) if bi)
        err = None if self._e is None else sum((h * ei) * k for ei, k in zip(self._e, K) if ei)
        return inc, err

    def init(self, rhs: RHS, t: float, y: torch.Tensor) -> tuple:
        return (y, y)

    def step(self, rhs: RHS, t: float, h: float, s: tuple) -> tuple:
        y, z = s
        lam = self.lam
        psi, _ = self._psi(rhs, t, h, z)
        y1 = lam * y + (1 - lam) * z + psi if lam != 1 else y + psi
        back, err = self._psi(rhs, t + h, -h, y1)
        return (y1, z - back), err

    def back(self, rhs: RHS, t1: float, h: float, s1: tuple) -> tuple:
        y1, z1 = s1
        lam = self.lam
        back, _ = self._psi(rhs, t1, -h, y1)
        z = z1 + back
        psi, _ = self._psi(rhs, t1 - h, h, z)
        return ((y1 - (1 - lam) * z - psi) / lam, z)


class LinearSegment:
    """Dense output of one step: linear between its end values."""

    def __init__(self, t0: float, t1: float, y0: torch.Tensor, y1: torch.Tensor) -> None:
        self.t0, self.t1, self.y0, self.y1 = t0, t1, y0, y1

    def __call__(self, ts: Sequence[float]) -> torch.Tensor:
        w = torch.tensor([(float(s) - self.t0) / (self.t1 - self.t0) for s in ts], dtype=self.y0.dtype)
        w = w.to(self.y0.device)[:, None]
        return self.y0[None] + w * (self.y1 - self.y0)[None]


def integrate_reversible(
    rhs: RHS,
    y0: torch.Tensor,
    t_out: Sequence[float],
    scheme,
    ctrl: StepController | None,
    *,
    rtol,
    atol,
    norm=None,
    step_size: float | None = None,
    first_step: float | None = None,
    lands: Sequence[float] = (),
    max_num_steps: int = 100_000,
    keep_segments: bool = False,
) -> IntegrationResult:
    """Solve with a reversible ``scheme`` through every time in ``t_out`` (each one landed on by a step), with
    fixed steps of at most ``step_size`` or adaptive steps chosen by ``ctrl``. Besides the usual result it
    sets ``final_state`` (the scheme's state at the last time reached), ``grid`` (the accepted steps as
    ``(t0, h)``) and ``out_steps`` (for each output after the first, the number of accepted steps before it)."""
    t0, t_end = float(t_out[0]), float(t_out[-1])
    direction = 1.0 if t_end >= t0 else -1.0
    marks = sorted({float(s) for s in (*t_out, *lands) if direction * (s - t0) > 0 and direction * (t_end - s) >= 0})
    marks.sort(key=lambda s: direction * s)
    outputs = {float(s) for s in t_out[1:]}
    state = scheme.init(rhs, t0, y0)
    ys, grid, out_steps, segments = [y0], [], [], [] if keep_segments else None
    n_rej = 0
    status, message, t_fail = Status.SUCCESS, "", None

    def ratio_of(e: torch.Tensor, y: torch.Tensor, y1: torch.Tensor) -> float:
        with torch.no_grad():
            scale = atol + rtol * torch.maximum(y.abs(), y1.abs())
            x = e / scale
            return (
                float(norm(x))
                if norm is not None
                else float(torch.linalg.vector_norm(x)) / math.sqrt(max(x.numel(), 1))
            )

    t = t0
    if step_size is None:
        if first_step is not None:
            dt = direction * abs(float(first_step))
        else:
            with torch.no_grad():
                rms = lambda x: float(torch.linalg.vector_norm(x)) / math.sqrt(max(x.numel(), 1))  # noqa: E731
                dt, _ = initial_step(rhs.at, t, y0, rhs.at(t, y0), direction, scheme.order, rtol, atol, rms)
    for target in marks:
        while direction * (target - t) > 0:
            if len(grid) + n_rej >= max_num_steps:
                status, t_fail = Status.MAX_STEPS, t
                message = f"reached max_num_steps={max_num_steps} at t={t:.10g}"
                break
            if step_size is not None:  # equal steps of at most step_size up to the next mark
                n = max(1, math.ceil(abs(target - t) / step_size * (1 - 1e-12)))
                h = (target - t) / n
            else:
                lands_here = direction * (t + dt - target) >= 0
                h = target - t if lands_here else dt
                if abs(h) < 1e-14 * max(1.0, abs(t)) or not math.isfinite(h):
                    status, t_fail = Status.DT_UNDERFLOW, t
                    message = f"the step size became too small at t={t:.10g} (a singularity, or a stiff problem?)"
                    break
            new, err = scheme.step(rhs, t, h, state)
            if step_size is None:
                ratio = ratio_of(err, state[0], new[0])
                if not ratio <= 1.0:
                    n_rej += 1
                    dt = ctrl.next_step(h, ratio if math.isfinite(ratio) else 1e10, False)
                    continue
                dt = ctrl.next_step(h, ratio, True)
            t1 = target if abs(target - (t + h)) <= 1e-13 * max(1.0, abs(target)) else t + h
            grid.append((t, h))
            if segments is not None:
                segments.append(LinearSegment(t, t1, state[0], new[0]))
            state, t = new, t1
        if status != Status.SUCCESS:
            break
        t = target
        if target in outputs:
            ys.append(state[0])
            out_steps.append(len(grid))
    res = IntegrationResult(torch.stack(ys), status, message, t_fail, len(grid), n_rej, segments)
    res.final_state, res.grid, res.out_steps = state, grid, out_steps
    return res
