"""Implicit Runge–Kutta steps for stiff problems: fixed-grid collocation and diagonally implicit methods.

A step solves the stage equations ``Z_i = h Σ_j a_ij f(t + c_j h, y + Z_j)`` by simplified Newton iterations
with the iteration matrix ``I − h (A ⊗ J)``, J the Jacobian of f at the step's start, LU-factorised once per
step. States whose first dimension is a batch of independent systems get one small Jacobian per sample
(``jacobian="batched"``, the default for states with two or more dimensions); otherwise the Jacobian of the
whole flat state is used (``"dense"``). Jacobians come from autograd (one batched vector–Jacobian product).

Under autograd the converged stages are refined by one more Newton step with the exact iteration matrix at
the stages, so the step's derivative is that of its exact (converged) solution: backprop and checkpointed
gradients are exact for these methods up to the Newton tolerance.

The stepper has the interface of ``RungeKutta`` that the fixed-grid loop uses: its stage buffer holds
``f(t0, y0)``, the mean slope ``(y1 − y0)/h`` and optionally ``f(t1, y1)``, so interpolation is linear or
cubic Hermite.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction as Fr

import numpy as np
import torch

from .runge_kutta import POOL_MAX_BYTES, StageBuffer

__all__ = ["ImplicitTableau", "IMPLICIT_TABLEAUS", "ImplicitRK", "NewtonError", "batched_jacobian", "FlatBuffers"]


class NewtonError(RuntimeError):
    """The stage equations of an implicit step did not converge."""


@dataclass(frozen=True)
class ImplicitTableau:
    """An implicit Runge–Kutta method: full ``a`` (s×s), weights ``b``, nodes ``c``, classical ``order``."""

    name: str
    c: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    b: tuple[float, ...]
    order: int
    source: str = ""

    def __post_init__(self) -> None:
        s = len(self.c)
        if len(self.a) != s or any(len(r) != s for r in self.a) or len(self.b) != s:
            raise ValueError(f"{self.name}: `a` must be {s}×{s} and `b` have {s} entries")
        for i, row in enumerate(self.a):
            if abs(sum(row) - self.c[i]) > 1e-13:
                raise ValueError(f"{self.name}: row {i} of `a` sums to {sum(row)}, not c[{i}] = {self.c[i]}")
        if abs(sum(self.b) - 1) > 1e-13:
            raise ValueError(f"{self.name}: the weights sum to {sum(self.b)}, not 1")

    @property
    def stages(self) -> int:
        """Number of stages (unknowns of the stage equations per state entry)."""
        return len(self.c)

    @property
    def stiffly_accurate(self) -> bool:
        """b equals the last row of a: y1 is the last stage value (no extra error from f at y1)."""
        return all(abs(x - y) < 1e-15 for x, y in zip(self.a[-1], self.b))


def _q(x) -> float:
    return float(Fr(x)) if isinstance(x, str) else float(x)


_S6, _S3, _S15, _S2 = math.sqrt(6), math.sqrt(3), math.sqrt(15), math.sqrt(2)

# Hairer & Wanner, "Solving ODEs II" (2nd ed., 1996), §IV.5 (Tables 5.1, 5.5, 5.6) and §IV.6.
IMPLICIT_EULER = ImplicitTableau("implicit_euler", (1.0,), ((1.0,),), (1.0,), 1, "HW II §IV.3 (Radau IIA, s=1)")
IMPLICIT_MIDPOINT = ImplicitTableau(
    "implicit_midpoint", (0.5,), ((0.5,),), (1.0,), 2, "HW II §IV.5 Table 5.1 (Gauss, s=1)"
)
TRAPEZOID = ImplicitTableau(
    "trapezoid", (0.0, 1.0), ((0.0, 0.0), (0.5, 0.5)), (0.5, 0.5), 2, "HW II §IV.3 (Lobatto IIIA, s=2)"
)
RADAU_IIA3 = ImplicitTableau(
    "radauIIA3",
    (_q("1/3"), 1.0),
    ((_q("5/12"), _q("-1/12")), (_q("3/4"), _q("1/4"))),
    (_q("3/4"), _q("1/4")),
    3,
    "HW II §IV.5 Table 5.5",
)
RADAU_IIA5 = ImplicitTableau(
    "radauIIA5",
    ((4 - _S6) / 10, (4 + _S6) / 10, 1.0),
    (
        ((88 - 7 * _S6) / 360, (296 - 169 * _S6) / 1800, (-2 + 3 * _S6) / 225),
        ((296 + 169 * _S6) / 1800, (88 + 7 * _S6) / 360, (-2 - 3 * _S6) / 225),
        ((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    ),
    ((16 - _S6) / 36, (16 + _S6) / 36, 1 / 9),
    5,
    "HW II §IV.5 Table 5.6",
)
GL4 = ImplicitTableau(
    "gl4",
    (0.5 - _S3 / 6, 0.5 + _S3 / 6),
    ((0.25, 0.25 - _S3 / 6), (0.25 + _S3 / 6, 0.25)),
    (0.5, 0.5),
    4,
    "HW II §IV.5 Table 5.1 (Gauss, s=2)",
)
GL6 = ImplicitTableau(
    "gl6",
    (0.5 - _S15 / 10, 0.5, 0.5 + _S15 / 10),
    (
        (5 / 36, 2 / 9 - _S15 / 15, 5 / 36 - _S15 / 30),
        (5 / 36 + _S15 / 24, 2 / 9, 5 / 36 - _S15 / 24),
        (5 / 36 + _S15 / 30, 2 / 9 + _S15 / 15, 5 / 36),
    ),
    (5 / 18, 4 / 9, 5 / 18),
    6,
    "HW II §IV.5 Table 5.2 (Gauss, s=3)",
)
_G = 1 - _S2 / 2  # Alexander (1977): the L-stable two-stage SDIRK of order 2, γ = 1 − √2/2
SDIRK2 = ImplicitTableau(
    "sdirk2",
    (_G, 1.0),
    ((_G, 0.0), (1 - _G, _G)),
    (1 - _G, _G),
    2,
    "Alexander, SIAM J. Numer. Anal. 14 (1977); HW II §IV.6",
)
# TR-BDF2 as an ESDIRK (Bank et al. 1985; Hosea & Shampine, Appl. Numer. Math. 20 (1996), eq. (2.2)):
# γ = 2 − √2, d = γ/2, w = √2/4.
_GT, _D, _W = 2 - _S2, (2 - _S2) / 2, _S2 / 4
TRBDF2 = ImplicitTableau(
    "trbdf2",
    (0.0, _GT, 1.0),
    ((0.0, 0.0, 0.0), (_D, _D, 0.0), (_W, _W, _D)),
    (_W, _W, _D),
    2,
    "Hosea & Shampine (1996) eq. (2.2)",
)

IMPLICIT_TABLEAUS = {
    t.name: t for t in (IMPLICIT_EULER, IMPLICIT_MIDPOINT, TRAPEZOID, RADAU_IIA3, RADAU_IIA5, GL4, GL6, SDIRK2, TRBDF2)
}
"""The fixed-step implicit Runge–Kutta methods by name (``"implicit_euler"``, ``"radauIIA5"``, ``"gl4"``,
...): each an :class:`ImplicitTableau` with its coefficients and their source."""


def user_jacobian(rhs, t: torch.Tensor, y: torch.Tensor, batch: int) -> torch.Tensor | None:
    """``func.jacobian(t, y)`` when the user's func defines one (``(batch, d, d)``, or ``(n, n)`` for one
    system), as blocks ``(batch, d, d)``; None otherwise (autograd is used)."""
    jac = getattr(rhs.func, "jacobian", None)
    if jac is None or rhs.buffer_shape is None:
        return None
    J = jac(t, y.view(rhs.buffer_shape))
    n = y.numel()
    d = n // batch
    if J.shape == (batch, d, d):
        return J
    if batch == 1 and J.shape == (n, n):
        return J[None]
    raise ValueError(
        f"func.jacobian returned shape {tuple(J.shape)}; expected ({batch}, {d}, {d}) (one block per sample)"
        + (f" or ({n}, {n})" if batch == 1 else "")
    )


def batched_jacobian(f, y: torch.Tensor, batch: int, create_graph: bool = False) -> torch.Tensor:
    """Jacobians ``(batch, d, d)`` of ``f`` (flat ``(batch·d,)`` → flat) for a state made of ``batch``
    independent blocks of size d, by d vector–Jacobian products evaluated together. With ``create_graph``
    the result is differentiable (in y when y is on a graph, and in f's parameters)."""
    n = y.numel()
    d = n // batch
    with torch.enable_grad():
        yg = y if (create_graph and y.requires_grad) else y.detach().requires_grad_(True)
        out = f(yg)
        if not out.requires_grad:  # (f does not depend on y: torchdiffeq's test problems have such a field)
            return torch.zeros(batch, d, d, dtype=y.dtype, device=y.device)
        basis = torch.eye(d, dtype=y.dtype, device=y.device)  # row k: e_k in every block
        grads = basis[:, None, :].expand(d, batch, d).reshape(d, n)
        (rows,) = torch.autograd.grad(
            out, yg, grads, is_grads_batched=True, create_graph=create_graph, allow_unused=True
        )
        if rows is None:
            return torch.zeros(batch, d, d, dtype=y.dtype, device=y.device)
    # rows[k, b*d + q] = ∂f_{b,k} / ∂y_{b,q}
    return rows.view(d, batch, d).transpose(0, 1).contiguous()


class FlatBuffers:
    """Stage buffers as ``RungeKutta`` hands them to the loops (flat rows; small ones pooled), for steppers
    that keep their own stage data (implicit and Rosenbrock methods)."""

    rows: int
    n: int
    dtype: torch.dtype
    device: torch.device
    _pool: dict

    def new_buffer(self, shape: torch.Size | None = None) -> StageBuffer:
        return StageBuffer(self.rows, self.n, self.dtype, self.device, None)

    def acquire(self, shape: torch.Size | None = None) -> StageBuffer:
        pool = self._pool.get(None)
        return pool.pop() if pool else self.new_buffer()

    def release(self, *bufs: StageBuffer) -> None:
        for b in bufs:
            if b is not None and b.K.numel() * b.K.element_size() <= POOL_MAX_BYTES:
                pool = self._pool.setdefault(None, [])
                if len(pool) < 4:
                    pool.append(b)


class _Slow(Exception):
    """Newton's method with a kept (stale) Jacobian contracts too slowly or diverges: recompute it."""


class ImplicitRK(FlatBuffers):
    """An implicit tableau bound to a state size, dtype and device (the fixed-grid loop's stepper).

    Arguments:
        batch: the number of independent blocks in the flat state (1: one dense Jacobian).
        newton_tol: relative tolerance on the Newton update (default: 1e-12 in float64, 1e-6 in float32).
        max_iters: Newton iterations before the step fails with ``NewtonError``.
    """

    #: a Jacobian is kept for the next step when Newton's method converged with it in at most this many
    #: iterations
    REUSE_ITERS = 3

    def __init__(
        self,
        tableau: ImplicitTableau,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        interp: str = "linear",
        batch: int = 1,
        newton_tol: float | None = None,
        max_iters: int = 10,
    ) -> None:
        if n % batch:
            raise ValueError(f"a state of {n} entries cannot be split into batch={batch} equal systems")
        self.tableau = tableau
        self.n, self.dtype, self.device, self.batch = n, dtype, device, batch
        self.d = n // batch
        self.s = tableau.stages
        self.A = torch.tensor(tableau.a, dtype=dtype, device=device)
        self.b = torch.tensor(tableau.b, dtype=dtype, device=device)
        self.c = tableau.c
        self.newton_tol = newton_tol if newton_tol is not None else (1e-12 if dtype == torch.float64 else 1e-6)
        self._explicit_first = tableau.c[0] == 0 and all(v == 0 for v in tableau.a[0])
        self.max_iters = max_iters
        # the loop's view: row 0 = f(t0, y0), row 1 = (y1 − y0)/h, row 2 = f(t1, y1) for cubic interpolation
        self.stages = 2
        self.fsal = False
        self.interp_needs_f1 = interp == "cubic"
        self.rows = 3
        self.f1_index = 2
        self.interp = interp
        self._pool: dict = {}
        self.nfe_newton = 0
        # Jacobian kept across steps, and the last factorisation (step size, Jacobian, LU factors)
        self._kept: tuple | None = None
        self._lu: tuple | None = None
        self.n_jac = 0  # Jacobian evaluations
        self.n_lu = 0  # factorisations

    # --- the step
    def _stage_values(self, rhs, t: float, dt: float, y: torch.Tensor, Z: torch.Tensor, perturb_last: bool, f0=None):
        """f at every stage; an explicit first stage (c = 0, zero row of ``a``: trapezoid, trbdf2) is f(t, y),
        which the loop already evaluated (``f0``), so it is not evaluated again."""
        F = []
        for i in range(self.s):
            if i == 0 and f0 is not None and self._explicit_first and not perturb_last:
                F.append(f0)
                continue
            ti = torch.scalar_tensor(t + self.c[i] * dt, dtype=self.dtype, device=self.device)
            if perturb_last and self.c[i] == 1.0:
                ti = torch.nextafter(ti, torch.scalar_tensor(t, dtype=self.dtype, device=self.device))
            elif perturb_last and self.c[i] == 0.0:  # (just inside the step, as the loop's first evaluation)
                ti = torch.nextafter(ti, torch.scalar_tensor(t + dt, dtype=self.dtype, device=self.device))
            F.append(rhs(ti, y + Z[i]))
        return torch.stack(F)  # (s, n)

    def _jacobian(self, rhs, t: float, y: torch.Tensor, step: tuple[float, float] | None = None) -> torch.Tensor:
        """The Jacobian at (t, y); with ``step=(t0, dt)``, a time at an end of the step is moved just inside it,
        so that a func with a jump at a grid point (``perturb=True``) is never evaluated on the jump."""
        tt = torch.scalar_tensor(t, dtype=self.dtype, device=self.device)
        if step is not None and t in (step[0], step[0] + step[1]):
            inside = step[0] + 0.5 * step[1]
            tt = torch.nextafter(tt, torch.scalar_tensor(inside, dtype=self.dtype, device=self.device))
        J = user_jacobian(rhs, tt, y, self.batch)
        return J.detach() if J is not None else batched_jacobian(lambda v: rhs(tt, v), y, self.batch)  # (B, d, d)

    def _iteration_matrix(self, dt: float, J: torch.Tensor) -> torch.Tensor:
        """``I − h (A ⊗ J)`` per block: (B, s·d, s·d). ``J`` is (B, d, d) or per stage (s, B, d, d)."""
        s, d, B = self.s, self.d, self.batch
        if J.dim() == 3:
            blocks = self.A[None, :, None, :, None] * J[:, None, :, None, :]  # (B, s, d, s, d)
        else:  # stage j's Jacobian multiplies column block j
            blocks = self.A[None, :, None, :, None] * J.permute(1, 0, 2, 3)[:, None, :, :, :].transpose(2, 3)
        M = -dt * blocks.reshape(B, s * d, s * d)
        M.diagonal(dim1=1, dim2=2).add_(1.0)
        return M

    def _solve(self, lu, G: torch.Tensor) -> torch.Tensor:
        """Solve M ΔZ = G for G (s, n) → (s, n) with M factorised per block."""
        s, d, B = self.s, self.d, self.batch
        rhs = G.view(s, B, d).permute(1, 0, 2).reshape(B, s * d, 1)
        sol = torch.linalg.lu_solve(*lu, rhs)
        return sol.view(B, s, d).permute(1, 0, 2).reshape(s, B * d)

    def _newton(self, rhs, t: float, dt: float, y_: torch.Tensor, perturb_last: bool, f0=None):
        """Converged stage increments Z (s, n) and the Jacobian in use; raises NewtonError.

        The Jacobian is kept across steps while Newton's method converges well with it (at most
        ``REUSE_ITERS`` iterations last time, as RADAU5 and scipy's Radau do), and the factorisation of the
        iteration matrix while the step size is unchanged too. When a kept Jacobian makes the iteration slow
        or fail, it is recomputed at the step's start and the iteration restarts; only a fresh Jacobian's
        failure is an error."""
        with torch.no_grad():
            cached = self._kept
            if cached is not None:
                try:
                    return self._iterate(rhs, t, dt, y_, perturb_last, f0, cached[0], stale=True)
                except _Slow:  # (every failure with a kept Jacobian is reported as _Slow)
                    pass
            J = self._jacobian(rhs, t, y_, (t, dt))
            self.n_jac += 1
            try:
                return self._iterate(rhs, t, dt, y_, perturb_last, f0, J, stale=False)
            except NewtonError:
                self._kept = None
                raise

    def _iterate(self, rhs, t, dt, y_, perturb_last, f0, J, stale: bool):
        if self._lu is not None and self._lu[0] == dt and self._lu[1] is J:
            lu = self._lu[2]
        else:
            lu = torch.linalg.lu_factor(self._iteration_matrix(dt, J))
            self.n_lu += 1
            self._lu = (dt, J, lu)
        Z = torch.zeros(self.s, self.n, dtype=self.dtype, device=self.device)
        scale = self.newton_tol * (1.0 + float(y_.abs().max()))
        prev = math.inf
        size = math.inf
        for it in range(1, self.max_iters + 1):
            F = self._stage_values(rhs, t, dt, y_, Z, perturb_last, f0)
            G = Z - dt * (self.A @ F)
            dZ = self._solve(lu, -G)
            Z += dZ
            size = float(dZ.abs().max())
            if not math.isfinite(size):
                if stale:
                    raise _Slow
                raise NewtonError(
                    f"{self.tableau.name}: the stage equations produced NaN/Inf at t={t:.6g} with step "
                    f"{dt:.3g}; reduce step_size"
                )
            if size <= scale:
                # keep this Jacobian for the next step only if it did its job quickly
                self._kept = (J,) if it <= self.REUSE_ITERS else None
                return Z, J
            if size > 0.5 * prev:
                if stale:
                    raise _Slow  # a kept Jacobian no longer fits: recompute it at this step's start
                # slow contraction with a fresh Jacobian: the step's start is too far from the stages' (a fast
                # transient); refresh it at the end-of-step stage and refactor
                J = self._jacobian(rhs, t + self.c[-1] * dt, y_ + Z[-1], (t, dt))
                self.n_jac += 1
                lu = torch.linalg.lu_factor(self._iteration_matrix(dt, J))
                self.n_lu += 1
                self._lu = (dt, J, lu)
            prev = size
        if stale:
            raise _Slow
        raise NewtonError(
            f"{self.tableau.name}: Newton's method did not converge in {self.max_iters} iterations at "
            f"t={t:.6g} (last update {size:.3g} > {scale:.3g}); reduce step_size or raise max_iters"
        )

    def _on_graph(self, rhs, t: float, dt: float, y: torch.Tensor, Z: torch.Tensor, perturb_last: bool, f0=None):
        """One Newton step with the exact iteration matrix at the stages, on the graph: its derivative is the
        implicit-function-theorem derivative of the converged stages."""
        y_ = y.detach()
        with torch.no_grad():
            Js = torch.stack([self._jacobian(rhs, t + self.c[i] * dt, y_ + Z[i], (t, dt)) for i in range(self.s)])
            lu_exact = torch.linalg.lu_factor(self._iteration_matrix(dt, Js))
        Zc = Z.detach()
        F = self._stage_values(rhs, t, dt, y, Zc, perturb_last, f0)
        G = Zc - dt * (self.A @ F)
        return Zc - self._solve(lu_exact, G)

    def step(self, rhs, t: float, dt: float, y: torch.Tensor, buf: StageBuffer, perturb_last: bool = False):
        grad = torch.is_grad_enabled()
        f0 = buf.K[0] if buf.grad else buf.rows[0]
        Z, _ = self._newton(rhs, t, dt, y.detach(), perturb_last, f0.detach())
        if grad:
            Z = self._on_graph(rhs, t, dt, y, Z, perturb_last, f0)
        if self.tableau.stiffly_accurate:
            y1 = y + Z[-1]
        else:
            F = self._stage_values(rhs, t, dt, y if grad else y.detach(), Z, perturb_last, f0 if grad else f0.detach())
            y1 = y + dt * (self.b @ F)
        buf.set(1, (y1 - y) / dt)
        return y1, None

    def interpolate(self, y0: torch.Tensor, dt: float, K: torch.Tensor, thetas) -> torch.Tensor:
        th = np.asarray(thetas, dtype=np.float64)
        if self.interp == "cubic":
            coef = np.stack([th * (1 - th) ** 2, th * th * (3 - 2 * th), th * th * (th - 1)], 1)
            rows = K[[0, 1, 2]]
        else:
            coef, rows = th[:, None], K[1:2]
        c = torch.from_numpy(coef).to(dtype=self.dtype, device=self.device)
        return torch.addmm(y0, c, rows, alpha=dt)


class AdaptiveTRBDF2(ImplicitRK):
    """TR-BDF2 with its embedded third-order companion (Hosea & Shampine 1996, eq. (2.2)–(2.4):
    b̂ = ((1 − w)/3, (3w + 1)/3, d/3)) for error control. The raw estimate h Σ (b − b̂)_i f(Y_i) is filtered by
    (I − h d J)⁻¹ (Shampine's remedy for estimates dominated by stiff components). A Newton failure rejects the
    step (the loop then shrinks it). Steps on the requested output times (``run`` adds them to ``step_t``)."""

    def __init__(
        self,
        n: int,
        dtype: torch.dtype,
        device: torch.device,
        batch: int = 1,
        rtol: float = 1e-6,
        newton_floor: float | None = None,
    ):
        super().__init__(
            TRBDF2,
            n,
            dtype,
            device,
            interp="cubic",
            batch=batch,
            newton_tol=max(1e-3 * float(rtol), 10 * torch.finfo(dtype).eps, newton_floor or 0.0),
            max_iters=8,
        )
        self.tableau = _AdaptiveInfo("adaptive_trbdf2", 3, TRBDF2.c, TRBDF2.stiffly_accurate, TRBDF2.stages)
        self._last_t: float | None = None
        self.b_err = self.b - torch.tensor(((1 - _W) / 3, (3 * _W + 1) / 3, _D / 3), dtype=dtype, device=device)

    def step(self, rhs, t: float, dt: float, y: torch.Tensor, buf: StageBuffer, perturb_last: bool = False):
        grad = torch.is_grad_enabled()
        y_ = y.detach()
        f0 = buf.K[0] if buf.grad else buf.rows[0]
        if t == self._last_t:
            # a retry: the last attempt from here was rejected. Its error estimate was filtered with the
            # Jacobian in use; a kept one may be why it failed, so (as scipy's Radau does) start afresh.
            self._kept = None
        self._last_t = t
        try:
            Z, J = self._newton(rhs, t, dt, y_, perturb_last, f0.detach())
        except NewtonError:
            buf.set(1, torch.zeros_like(y_))
            return y, torch.full_like(y_, math.inf)  # rejected: the loop shrinks the step
        with torch.no_grad():
            F = self._stage_values(rhs, t, dt, y_, Z, perturb_last, f0.detach())
            raw = dt * (self.b_err @ F)
            W = -(dt * _D) * J
            W.diagonal(dim1=1, dim2=2).add_(1.0)
            B, d = self.batch, self.d
            e = torch.linalg.solve(W, raw.view(B, d, 1)).reshape(-1) / dt
        if grad:
            Z = self._on_graph(rhs, t, dt, y, Z, perturb_last, f0)
        y1 = y + Z[-1]
        buf.set(1, (y1 - y) / dt)
        return y1, e


@dataclass(frozen=True)
class _AdaptiveInfo:
    name: str
    order: int  # power of h in the local error estimate (the controller's exponent is 1/order)
    c: tuple
    stiffly_accurate: bool
    stages: int
