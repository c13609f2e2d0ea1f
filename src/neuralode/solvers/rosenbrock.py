"""An adaptive Rosenbrock method for stiff problems: the L-stable Rosenbrock pair of order 2(3) of Shampine &
Reichelt, "The MATLAB ODE Suite", SIAM J. Sci. Comput. 18(1), 1997, §3 (MATLAB's ode23s).

With W = I − h d J (d = 1/(2 + √2), J = ∂f/∂y at the step's start, T = ∂f/∂t):

    k1 = W⁻¹ (f(t, y) + h d T)
    k2 = W⁻¹ (f(t + h/2, y + h k1/2) − k1) + k1
    y1 = y + h k2
    k3 = W⁻¹ (f(t + h, y1) − e32 (k2 − f(t + h/2, ...)) − 2 (k1 − f(t, y)) + h d T),   e32 = 6 + √2
    error ≈ h (k1 − 2 k2 + k3) / 6

No nonlinear iteration: one LU factorisation and three solves per step. f(t + h, y1) is the next step's
f(t, y) (first same as last). T is a forward difference in t (one evaluation). Jacobians are per sample for a
``(batch, ...)`` state (``jacobian="batched"``) or of the whole state (``"dense"``), from autograd; under
autograd they are built on the graph, so backprop and checkpointed gradients are those of the discrete solve.
The stepper has the interface of ``RungeKutta`` that the adaptive loop uses (dense output: the pair's own
continuous extension).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from .implicit import FlatBuffers, batched_jacobian, user_jacobian
from .runge_kutta import StageBuffer

__all__ = ["Rosenbrock23", "Rosenbrock", "RosenbrockTableau", "RODAS4", "ROSENBROCK_METHODS"]

_D = 1.0 / (2.0 + math.sqrt(2.0))
_E32 = 6.0 + math.sqrt(2.0)


@dataclass(frozen=True)
class _Info:
    name: str
    order: int  # the power of h in the local error estimate (the controller's exponent is 1/order)
    source: str


ROSENBROCK_METHODS = {
    "rosenbrock23": _Info("rosenbrock23", 3, "Shampine & Reichelt (1997), §3"),
    "rodas4": _Info("rodas4", 4, "Hairer & Wanner, Solving ODEs II (1996), §VI.4, RODAS"),
    # (an ESDIRK, not a Rosenbrock method; listed here with the other adaptive stiff methods)
    "adaptive_trbdf2": _Info("adaptive_trbdf2", 3, "Hosea & Shampine (1996)"),
}
"""The adaptive stiff methods by name (``"rodas4"``, ``"rosenbrock23"``, ``"adaptive_trbdf2"``): each with
its ``order`` (the power of h in the local error estimate) and ``source``."""


@dataclass(frozen=True)
class RosenbrockTableau:
    """A Rosenbrock method in Hairer & Wanner's transformed form (ODEs II, §IV.7 (7.25)): with
    G = I/(h γ) − J,

        G K_i = f(t + α_i h, y + Σ_{j<i} a_ij K_j) + Σ_{j<i} (c_ij / h) K_j + h γ_i ∂f/∂t
        y1 = y + Σ m_j K_j,      error = Σ e_j K_j

    ``a``, ``c`` are strictly lower triangular (row i holds i entries)."""

    name: str
    gamma: float
    alpha: tuple[float, ...]
    gammas: tuple[float, ...]
    a: tuple[tuple[float, ...], ...]
    c: tuple[tuple[float, ...], ...]
    m: tuple[float, ...]
    e: tuple[float, ...]
    order: int  # power of h in the local error estimate


class _RosenbrockBase(FlatBuffers):
    """What every Rosenbrock step starts with: the Jacobian at (t, y) (on the graph only when something upstream
    needs gradients: y or func's parameters, both of which make f(t, y) require grad), the LU factors of
    I/(h γ) − J per block, and ∂f/∂t by a forward difference (one evaluation)."""

    batch: int
    d: int
    #: keep ``jac_norm`` = max over blocks of ‖J‖_∞ at each step's start (``method="auto"`` reads it)
    track_norm = False
    jac_norm: torch.Tensor | None = None

    def _solve(self, lu, v: torch.Tensor) -> torch.Tensor:
        B, d = self.batch, self.d
        return torch.linalg.lu_solve(*lu, v.reshape(B, d, 1)).reshape(B * d)

    def _linearise(self, rhs, t: float, h: float, y: torch.Tensor, buf: StageBuffer, gamma: float):
        f0 = buf.K[0] if buf.grad else buf.rows[0]
        grad = buf.grad and (y.requires_grad or f0.requires_grad)
        t0 = self._time(t)
        J = user_jacobian(rhs, t0, y, self.batch)
        if J is None:
            J = batched_jacobian(lambda v: rhs(t0, v), y, self.batch, create_graph=grad)
        if self.track_norm:
            self.jac_norm = J.detach().abs().sum(-1).amax()
        G = -J
        G.diagonal(dim1=1, dim2=2).add_(1.0 / (h * gamma))
        lu = torch.linalg.lu_factor(G)
        delta = math.copysign(math.sqrt(torch.finfo(self.dtype).eps) * max(1.0, abs(t)), h)
        T = (rhs(self._time(t + delta), y) - f0) / delta
        return f0, t0, lu, T

    def _time(self, s: float) -> torch.Tensor:
        return torch.scalar_tensor(s, dtype=self.dtype, device=self.device)


# RODAS (Hairer & Wanner 1996, §VI.4; the coefficients of their code RODAS): order 4 with an embedded order-3
# solution, stiffly accurate, 6 stages.
RODAS4 = RosenbrockTableau(
    name="rodas4",
    gamma=0.25,
    alpha=(0.0, 0.386, 0.21, 0.63, 1.0, 1.0),
    gammas=(0.25, -0.1043, 0.1035, -0.3620000000000023e-01, 0.0, 0.0),
    a=(
        (),
        (0.1544e01,),
        (0.9466785280815826, 0.2557011698983284),
        (0.3314825187068521e01, 0.2896124015972201e01, 0.9986419139977817),
        (0.1221224509226641e01, 0.6019134481288629e01, 0.1253708332932087e02, -0.6878860361058950),
        (0.1221224509226641e01, 0.6019134481288629e01, 0.1253708332932087e02, -0.6878860361058950, 1.0),
    ),
    c=(
        (),
        (-0.56688e01,),
        (-0.2430093356833875e01, -0.2063599157091915),
        (-0.1073529058151375, -0.9594562251023355e01, -0.2047028614809616e02),
        (0.7496443313967647e01, -0.1024680431464352e02, -0.3399990352819905e02, 0.1170890893206160e02),
        (
            0.8083246795921522e01,
            -0.7981132988064893e01,
            -0.3152159432874371e02,
            0.1631930543123136e02,
            -0.6058818238834054e01,
        ),
    ),
    m=(0.1221224509226641e01, 0.6019134481288629e01, 0.1253708332932087e02, -0.6878860361058950, 1.0, 1.0),
    e=(0.0, 0.0, 0.0, 0.0, 0.0, 1.0),
    order=4,
)


def rosenbrock_stages(tab: RosenbrockTableau, y, f0, T, h, stage_f, solve) -> list[torch.Tensor]:
    """The stages K_i of one step of ``tab`` (the transformed form above): ``h`` the step, a float or a
    ``(batch, 1)`` tensor of per-sample steps; ``f0 = f(t, y)``; ``T = ∂f/∂t``; ``stage_f(i, y_i)`` evaluates f at
    stage i's time; ``solve(v)`` applies G⁻¹."""
    K: list[torch.Tensor] = []
    for i in range(len(tab.alpha)):
        if i == 0:
            fi = f0
        else:
            yi = y
            for j, aij in enumerate(tab.a[i]):
                if aij:
                    yi = yi + aij * K[j]
            fi = stage_f(i, yi)
        rhs_i = fi + (h * tab.gammas[i]) * T if tab.gammas[i] else fi
        for j, cij in enumerate(tab.c[i]):
            if cij:
                rhs_i = rhs_i + (cij / h) * K[j]
        K.append(solve(rhs_i))
    return K


class Rosenbrock(_RosenbrockBase):
    """A ``RosenbrockTableau`` bound to a state size, dtype and device (the adaptive loop's stepper).

    Output times are stepped on (``run`` adds them to ``step_t``), so requested values are step ends; cubic
    Hermite interpolation serves only dense output and events.
    """

    def __init__(
        self, tableau: RosenbrockTableau, n: int, dtype: torch.dtype, device: torch.device, batch: int = 1
    ) -> None:
        if n % batch:
            raise ValueError(f"a state of {n} entries cannot be split into batch={batch} equal systems")
        self.tab = tableau
        self.tableau = ROSENBROCK_METHODS[tableau.name]
        self.n, self.dtype, self.device, self.batch = n, dtype, device, batch
        self.d = n // batch
        # the loop's view: row 0 = f(t0, y0), row 1 = (y1 − y0)/h, row 2 = f(t1, y1) (also the next f0)
        self.stages = 2
        self.fsal = False
        self.rows = 3
        self.f1_index = 2
        self.interp_needs_f1 = True
        self._pool: dict = {}

    def step(self, rhs, t: float, dt: float, y: torch.Tensor, buf: StageBuffer, perturb_last: bool = False):
        tab, h, tt = self.tab, dt, self._time
        f0, t0, lu, T = self._linearise(rhs, t, h, y, buf, tab.gamma)

        def stage_f(i: int, yi: torch.Tensor) -> torch.Tensor:
            ti = tt(t + tab.alpha[i] * h)
            if perturb_last and tab.alpha[i] == 1.0:
                ti = torch.nextafter(ti, t0)
            return rhs(ti, yi)

        K = rosenbrock_stages(tab, y, f0, T, h, stage_f, lambda v: self._solve(lu, v))
        y1 = y
        for mj, kj in zip(tab.m, K):
            if mj:
                y1 = y1 + mj * kj
        err = sum(ej * kj for ej, kj in zip(tab.e, K) if ej)
        buf.set(1, (y1 - y) / h)
        e = err / h  # the loop's convention: local error = h · e
        return y1, e.detach() if buf.grad else e

    def interpolate(self, y0: torch.Tensor, dt: float, K: torch.Tensor, thetas) -> torch.Tensor:
        th = np.asarray(thetas, dtype=np.float64)
        coef = np.stack([th * (1 - th) ** 2, th * th * (3 - 2 * th), th * th * (th - 1)], 1)
        c = torch.from_numpy(coef).to(dtype=self.dtype, device=self.device)
        return torch.addmm(y0, c, K[[0, 1, 2]], alpha=dt)


class Rosenbrock23(_RosenbrockBase):
    """The ode23s pair bound to a state size, dtype and device."""

    def __init__(self, n: int, dtype: torch.dtype, device: torch.device, batch: int = 1) -> None:
        if n % batch:
            raise ValueError(f"a state of {n} entries cannot be split into batch={batch} equal systems")
        self.tableau = ROSENBROCK_METHODS["rosenbrock23"]
        self.n, self.dtype, self.device, self.batch = n, dtype, device, batch
        self.d = n // batch
        # the loop's view: row 0 = f(t0, y0), row 1 = k2 = (y1 − y0)/h, row 2 = f(t1, y1) (first same as
        # last), row 3 = k1 (for the continuous extension)
        self.stages = 3
        self.fsal = True
        self.rows = 4
        self.f1_index = 2
        self.interp_needs_f1 = True
        self._pool: dict = {}

    def step(self, rhs, t: float, dt: float, y: torch.Tensor, buf: StageBuffer, perturb_last: bool = False):
        h, tt = dt, self._time
        # W = I − h d J = h d (I/(h d) − J): W⁻¹ v = G⁻¹ v / (h d) with G factorised by _linearise
        f0, t0, lu, T = self._linearise(rhs, t, h, y, buf, _D)
        inv_hd = 1.0 / (h * _D)
        hdT = (h * _D) * T
        k1 = self._solve(lu, f0 + hdT) * inv_hd
        f1 = rhs(tt(t + 0.5 * h), y + (0.5 * h) * k1)
        k2 = self._solve(lu, f1 - k1) * inv_hd + k1
        y1 = y + h * k2
        t1 = tt(t + h)
        if perturb_last:
            t1 = torch.nextafter(t1, t0)
        f2 = rhs(t1, y1)
        k3 = self._solve(lu, f2 - _E32 * (k2 - f1) - 2.0 * (k1 - f0) + hdT) * inv_hd
        buf.set(1, k2)
        buf.set(2, f2)
        buf.set(3, k1)
        e = (k1 - 2.0 * k2 + k3) / 6.0
        return y1, e.detach() if buf.grad else e

    def interpolate(self, y0: torch.Tensor, dt: float, K: torch.Tensor, thetas) -> torch.Tensor:
        """The pair's own continuous extension (Shampine & Reichelt 1997, §3), built from k1 and k2 rather than
        from f, so that it stays bounded across steps much longer than the fast time scales:
        y(t0 + θh) = y0 + h [θ(1 − θ) k1 + θ(θ − 2d) k2] / (1 − 2d)."""
        th = np.asarray(thetas, dtype=np.float64)
        coef = np.stack([th * (th - 2 * _D), th * (1 - th)], 1) / (1 - 2 * _D)
        c = torch.from_numpy(coef).to(dtype=self.dtype, device=self.device)
        return torch.addmm(y0, c, K[[1, 3]], alpha=dt)
