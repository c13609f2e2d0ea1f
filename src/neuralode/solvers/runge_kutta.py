"""One explicit Runge–Kutta step for any :class:`~neuralode.solvers.tableaus.ButcherTableau`.

The state is a flat 1-D tensor of ``N`` entries. Stage derivatives live in the rows of a buffer ``K`` of
shape ``(rows, N)``; each stage input is one fused ``addmv`` (``y + dt · K[:i]ᵀ a_i``), so a step costs
about three tensor operations per stage besides ``func`` itself. The step returns the new state and the
(unscaled) error vector; whether to accept is the controller's decision, not the step's.
"""

from __future__ import annotations

import functools
from typing import Callable

import numpy as np
import torch

from .tableaus import ButcherTableau

__all__ = ["RungeKutta", "StageBuffer", "Segment", "combo", "tableau_floats", "interpolate_records"]

RHS = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


POOL_MAX_BYTES = 1 << 20  # buffers up to this size are pooled between solves


def view_args(shape) -> tuple:
    """Arguments for ``y.view(*view_args(shape))``: unpacked ints parse several times faster than a
    ``torch.Size``, and a 0-d shape needs the explicit empty tuple (``view()`` with no argument is an error)."""
    dims = tuple(shape)
    return dims if dims else ((),)


def tableau_floats(tab) -> tuple[list, list, list, list | None]:
    """A tableau's ``(a, c, b, b_err)`` as Python floats: constants that ``torch.compile`` folds into a graph."""
    a = [[float(v) for v in row] for row in tab.a]
    b_err = [float(v) for v in tab.b_err] if tab.b_err is not None else None
    return a, [float(v) for v in tab.c], [float(v) for v in tab.b], b_err


def combo(coefs, K):
    """``Σⱼ coefs[j] K[j]`` over the nonzero coefficients (Python floats), as plain tensor arithmetic that
    ``torch.compile`` traces into one fused expression; None where every coefficient is zero."""
    acc = None
    for j, a in enumerate(coefs):
        if a != 0.0:
            acc = a * K[j] if acc is None else acc + a * K[j]
    return acc


class StageBuffer:
    """Rows of stage derivatives plus precomputed views: transposed prefixes for ``addmv``, and (for a tensor
    state) the rows and a scratch stage input viewed in the state's own shape, so that a stage costs no
    reshaping."""

    __slots__ = ("K", "prefix_t", "rows", "grad", "rows_shaped", "scratch", "scratch_shaped", "shape", "dims")

    def __init__(
        self, rows: int, n: int, dtype: torch.dtype, device: torch.device, shape: torch.Size | None = None
    ) -> None:
        self.K = torch.empty(rows, n, dtype=dtype, device=device)
        self.prefix_t = [self.K[:i].t() for i in range(rows + 1)]
        self.rows = self.K.unbind(0)
        # under autograd, rows are written through fresh views (K[i] = f) so that the graph records them,
        # and stage inputs are fresh tensors (autograd keeps them)
        self.grad = torch.is_grad_enabled()
        self.shape = shape
        self.dims = None if shape is None else view_args(shape)
        if shape is not None and not self.grad:
            self.rows_shaped = [r.view(shape) for r in self.rows]
            self.scratch = torch.empty(n, dtype=dtype, device=device)
            self.scratch_shaped = self.scratch.view(shape)
        else:
            self.rows_shaped = self.scratch = self.scratch_shaped = None

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

    def __init__(
        self, tableau: ButcherTableau, n: int, dtype: torch.dtype, device: torch.device, interp: str = "dense"
    ) -> None:
        self.tableau = tableau
        self.n, self.dtype, self.device = n, dtype, device
        self.wide = dtype in (torch.float64, torch.complex128)  # (where summing the increment first gains nothing)
        self.stages = tableau.stages
        self.fsal = tableau.fsal
        as_t = lambda v: torch.tensor(v, dtype=dtype, device=device)  # noqa: E731
        self.a = [None] + [as_t(row) for row in tableau.a[1:]]
        self.c = tableau.c
        self.c_is_one = [c == 1.0 for c in tableau.c]
        self.c_repeats = [i > 1 and tableau.c[i] == tableau.c[i - 1] for i in range(len(tableau.c))]
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
        self._pool: dict = {}
        #: a float to a 0-d time tensor (on CPU without the device argument: its parsing costs ~0.5 µs a call)
        self.time = (
            functools.partial(torch.scalar_tensor, dtype=dtype)
            if torch.device(device).type == "cpu"
            else functools.partial(torch.scalar_tensor, dtype=dtype, device=device)
        )

    def new_buffer(self, shape: torch.Size | None = None) -> StageBuffer:
        return StageBuffer(self.rows, self.n, self.dtype, self.device, shape)

    def acquire(self, shape: torch.Size | None = None) -> StageBuffer:
        """A buffer from this stepper's pool (no-grad solves only); give it back with ``release``."""
        pool = self._pool.get(shape)
        return pool.pop() if pool else self.new_buffer(shape)

    def release(self, *bufs: StageBuffer) -> None:
        """Keep small buffers for the next solve (allocation dominates tiny solves); large ones are freed, so
        that a cache never holds memory that training needs (an ODE-Net's stages are megabytes)."""
        for b in bufs:
            if b is not None and b.K.numel() * b.K.element_size() <= POOL_MAX_BYTES:
                pool = self._pool.setdefault(b.shape, [])
                if len(pool) < 4:
                    pool.append(b)

    def step(
        self, rhs: RHS, t: float, dt: float, y: torch.Tensor, buf: StageBuffer, perturb_last: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Advance ``y`` from ``t`` by ``dt``; ``buf.rows[0]`` must hold ``f(t, y)``.

        Returns:
            ``(y1, e)`` where the local error estimate is ``dt · e`` (``e`` is ``None`` for fixed-step
            methods). For FSAL methods ``buf.rows[-1]`` holds ``f(t + dt, y1)`` afterwards.
        """
        S, c, time = self.stages, self.c, self.time
        pre, grad, a = buf.prefix_t, buf.grad, self.a
        shaped = buf.rows_shaped
        yi = y
        ti = None
        for i in range(1, S):
            if not self.c_repeats[i]:  # (dopri5, tsit5: two stages at c = 1 share one time tensor)
                ti = time(t + c[i] * dt)
                if perturb_last and c[i] == 1.0:  # a discontinuity follows: evaluate just before the end point
                    ti = torch.nextafter(ti, time(t))
            if shaped is not None:  # no graph, tensor state: stage input in scratch, output straight into K
                if i == S - 1 and self.fsal:
                    yi = self._advance(y, pre[i], a[i], dt)
                    rhs.shaped_into(ti, yi.view(*buf.dims), shaped[i])
                else:
                    torch.addmv(y, pre[i], a[i], alpha=dt, out=buf.scratch)
                    rhs.shaped_into(ti, buf.scratch_shaped, shaped[i])
            else:
                yi = (
                    self._advance(y, pre[i], a[i], dt)
                    if i == S - 1 and self.fsal
                    else torch.addmv(y, pre[i], a[i], alpha=dt)
                )
                if grad:
                    buf.K[i] = rhs(ti, yi)
                else:
                    buf.rows[i].copy_(rhs(ti, yi))
        if self.fsal:
            y1 = yi
        else:
            y1 = self._advance(y, pre[S], self.b, dt)
        e = torch.mv(pre[S], self.b_err) if self.b_err is not None else None
        return y1, e

    def _advance(self, y: torch.Tensor, Kt: torch.Tensor, w: torch.Tensor, dt: float) -> torch.Tensor:
        """``y + dt Σⱼ wⱼ Kⱼ``, the step's new state. Below float64 the increment is summed first and added to y
        once: ``addmv`` over the transposed stage rows adds each stage to y in turn, a rounding of y per stage
        (measured: float32 rk4 on a linear solution drifts by about one ulp of y per stage)."""
        if self.wide:
            return torch.addmv(y, Kt, w, alpha=dt)
        return torch.add(y, torch.mv(Kt, w), alpha=dt)

    def interpolate(self, y0: torch.Tensor, dt: float, K: torch.Tensor, thetas) -> torch.Tensor:
        """``y(t0 + θ dt)`` for each θ in ``thetas``, as a ``(len(thetas), N)`` tensor."""
        th = np.asarray(thetas, dtype=np.float64)[:, None] ** self.powers
        coef = torch.from_numpy(th @ self.W.T).to(dtype=self.dtype, device=self.device)
        return torch.addmm(y0, coef, K[: self.rows_used], alpha=dt)


class Segment:
    """One accepted step and its interpolant, ``t0 → t1``."""

    __slots__ = ("t0", "t1", "y0", "y1", "K", "method")

    def __init__(
        self, t0: float, t1: float, y0: torch.Tensor, y1: torch.Tensor, K: torch.Tensor, method: RungeKutta
    ) -> None:
        self.t0, self.t1, self.y0, self.y1, self.K, self.method = t0, t1, y0, y1, K, method

    def __call__(self, ts) -> torch.Tensor:
        dt = self.t1 - self.t0
        return self.method.interpolate(self.y0, dt, self.K, [(t - self.t0) / dt for t in ts])


def interpolate_records(
    a: torch.Tensor, t0: torch.Tensor, h: torch.Tensor, ys: torch.Tensor, Qs: torch.Tensor, Tq: torch.Tensor
) -> torch.Tensor:
    """The solution at the requested times ``Tq`` ((K, 1) shared, or (K, G) per group) for every group from the
    recorded attempts: ``a`` (K, G)
    the attempt over each (time, group), ``t0``/``h`` (A, G) their start and step, ``ys`` (A, G, d) their start
    value and ``Qs`` (A, G, degree, d) their continuous extension, y(t0 + θh) = y0 + Σ_p h θ^(p+1) Q_p.

    Requested times outnumber steps (several per step), so this is gathers and a short sum per output;
    compiled, it is one fused loop over the outputs with indirect loads (no gathered copies)."""
    g = torch.arange(t0.shape[1], device=t0.device)
    h_sel = h[a, g]
    theta = ((Tq - t0[a, g]) / torch.where(h_sel == 0, 1.0, h_sel)).clamp(0.0, 1.0)
    w = h_sel * theta
    acc = ys[a, g]
    for p in range(Qs.shape[2]):
        acc = acc + w.to(ys.dtype)[..., None] * Qs[a, g, p]
        w = w * theta
    return acc
