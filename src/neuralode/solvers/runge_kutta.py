"""One explicit Runge–Kutta step for any :class:`~neuralode.solvers.tableaus.ButcherTableau`.

The state is a flat 1-D tensor of ``N`` entries. Stage derivatives live in the rows of a buffer ``K`` of
shape ``(rows, N)``; each stage input is one fused ``addmv`` (``y + dt · K[:i]ᵀ a_i``), so a step costs
about three tensor operations per stage besides ``func`` itself. The step returns the new state and the
(unscaled) error vector; whether to accept is the controller's decision, not the step's.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from .tableaus import ButcherTableau

__all__ = ["RungeKutta", "StageBuffer", "Segment"]

RHS = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class StageBuffer:
    """Rows of stage derivatives plus precomputed views (transposed prefixes) used by ``addmv``."""

    __slots__ = ("K", "prefix_t", "rows", "grad")

    def __init__(self, rows: int, n: int, dtype: torch.dtype, device: torch.device) -> None:
        self.K = torch.empty(rows, n, dtype=dtype, device=device)
        self.prefix_t = [self.K[:i].t() for i in range(rows + 1)]
        self.rows = self.K.unbind(0)
        # under autograd, rows are written through fresh views (K[i] = f) so that the graph records them
        self.grad = torch.is_grad_enabled()

    def set(self, i: int, value: torch.Tensor) -> None:
        if self.grad:
            self.K[i] = value
        else:
            self.rows[i].copy_(value)


class RungeKutta:
    """A tableau bound to a dtype and device: coefficient tensors and the step itself.

    Arguments:
        tableau: the method.
        n: number of entries of the (flat) state.
        dtype, device: those of the state.
        interp: ``"dense"`` (the method's continuous extension, else cubic Hermite), ``"cubic"`` or
            ``"linear"``: how output between step ends is computed.
    """

    def __init__(self, tableau: ButcherTableau, n: int, dtype: torch.dtype, device: torch.device,
                 interp: str = "dense") -> None:
        self.tableau = tableau
        self.n, self.dtype, self.device = n, dtype, device
        self.stages = tableau.stages
        self.fsal = tableau.fsal
        as_t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
        self.a = [None] + [as_t(row) for row in tableau.a[1:]]
        self.c = tableau.c
        self.c_is_one = [c == 1.0 for c in tableau.c]
        self.b = as_t(tableau.b)
        self.b_err = as_t(tableau.b_err) if tableau.b_err is not None else None
        self.W = tableau.interpolation_matrix(interp)  # numpy (rows, D)
        self.rows = self.W.shape[0]
        self.f1_index = tableau.f1_index
        # does interpolation read f(t1, y1)? (for non-FSAL methods that costs an evaluation, shared with
        # the next step's first stage)
        self.interp_needs_f1 = bool(np.any(self.W[self.f1_index] != 0))
        if not self.interp_needs_f1 and self.rows > self.stages:
            self.W = self.W[: self.stages]  # the f1 row is never read: do not touch its (unset) memory
        self.rows_used = self.W.shape[0]
        self.powers = np.arange(1, self.W.shape[1] + 1)
        self._pool: list[StageBuffer] = []

    def new_buffer(self) -> StageBuffer:
        return StageBuffer(self.rows, self.n, self.dtype, self.device)

    def acquire(self) -> StageBuffer:
        """A scratch buffer from this stepper's pool (no-grad solves only); give it back with ``release``."""
        return self._pool.pop() if self._pool else self.new_buffer()

    def release(self, *bufs: StageBuffer) -> None:
        if len(self._pool) < 8:
            self._pool.extend(b for b in bufs if b is not None)

    def step(self, rhs: RHS, t: float, dt: float, y: torch.Tensor, buf: StageBuffer,
             perturb_last: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advance ``y`` from ``t`` by ``dt``; ``buf.rows[0]`` must hold ``f(t, y)``.

        Returns:
            ``(y1, e)`` where the local error estimate is ``dt · e`` (``e`` is ``None`` for fixed-step
            methods). For FSAL methods ``buf.rows[-1]`` holds ``f(t + dt, y1)`` afterwards.
        """
        S = self.stages
        c = self.c
        ts = torch.tensor([t + ci * dt for ci in c[1:]], dtype=self.dtype, device=self.device)
        if perturb_last:  # evaluate stages on the end point just before it (a discontinuity follows)
            ts = torch.where(torch.tensor(self.c_is_one[1:], dtype=torch.bool, device=self.device),
                             torch.nextafter(ts, torch.full_like(ts, t)), ts)
        ts = ts.unbind(0)
        rows, pre, grad = buf.rows, buf.prefix_t, buf.grad
        yi = y
        for i in range(1, S):
            yi = torch.addmv(y, pre[i], self.a[i], alpha=dt)
            if grad:
                buf.K[i] = rhs(ts[i - 1], yi)
            else:
                rows[i].copy_(rhs(ts[i - 1], yi))
        if self.fsal:
            y1 = yi
        else:
            y1 = torch.addmv(y, pre[S], self.b, alpha=dt)
        e = torch.mv(pre[S], self.b_err) if self.b_err is not None else None
        return y1, e

    def interpolate(self, y0: torch.Tensor, dt: float, K: torch.Tensor, thetas) -> torch.Tensor:
        """``y(t0 + θ dt)`` for each θ in ``thetas``, as a ``(len(thetas), N)`` tensor."""
        th = np.asarray(thetas, dtype=np.float64)[:, None] ** self.powers
        coef = torch.from_numpy(th @ self.W.T).to(dtype=self.dtype, device=self.device)
        return torch.addmm(y0, coef, K[: self.rows_used], alpha=dt)


class Segment:
    """One accepted step and its interpolant, ``t0 → t1``."""

    __slots__ = ("t0", "t1", "y0", "y1", "K", "method")

    def __init__(self, t0: float, t1: float, y0: torch.Tensor, y1: torch.Tensor, K: torch.Tensor,
                 method: RungeKutta) -> None:
        self.t0, self.t1, self.y0, self.y1, self.K, self.method = t0, t1, y0, y1, K, method

    def __call__(self, ts) -> torch.Tensor:
        dt = self.t1 - self.t0
        return self.method.interpolate(self.y0, dt, self.K, [(t - self.t0) / dt for t in ts])


def nextafter(x: float, toward: float) -> float:
    return math.nextafter(x, toward)
