"""``rodas4`` with ``compile=True``: a whole Rosenbrock step in one ``torch.compile``d function.

For stiff batches of small systems (the Robertson benchmark: 256 problems of 3 species) the eager step is a
few hundred tiny tensor operations — the Jacobian by autograd, a batched LAPACK factorisation, six solves, the
user's ``func`` six times — and costs milliseconds whatever the arithmetic. Here one compiled function per
(func, shape, dtype, device, backend) does all of it:

* the Jacobian blocks by forward-mode products (``torch.func.jvp`` under ``vmap``, one tangent per column of a
  block, all blocks at once), or ``func.jacobian(t, y)`` when ``func`` has that hook;
* G = I/(hγ) − J factorised per block. For blocks of at most ``SMALL_D`` unknowns by Gaussian elimination with
  partial pivoting written out in elementwise operations (rows swapped by ``where`` on the pivot test), which
  the compiler fuses into a few loops over the batch instead of one LAPACK call per small matrix; larger
  blocks use ``torch.linalg.lu_factor`` / ``lu_solve``;
* ∂f/∂t by a forward difference, the six stages, the new state, f at the new state (first same as last for
  the adaptive loop, which then needs no evaluation of its own) and the error vector.

Time and step size enter as float64 0-d tensors, so a new step size never recompiles. The adaptive loop
around the step is the eager one (one host read per step, for accept/reject). No gradients: solves that need
a graph use the eager ``Rosenbrock`` (``_problem.run`` decides).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..solvers.rosenbrock import Rosenbrock, RosenbrockTableau
from .cache import CompileCache
from .small_gemm import backend_for
from .step import fresh_code

__all__ = ["CompiledRosenbrock", "small_lu", "small_lu_solve"]

#: blocks up to this size are factorised by the unrolled elimination (traced code grows as d³)
SMALL_D = 8

_CACHE = CompileCache("rosenbrock_step", 64)


def small_lu(A: torch.Tensor) -> tuple[list[torch.Tensor], list[tuple]]:
    """Gaussian elimination with partial pivoting of a batch of small matrices ``A`` ``(B, d, d)``, unrolled in d.

    Returns the rows of U (each ``(B, d)``) and the elimination as a list of operations to replay on a
    right-hand side: ``("swap", k, i, mask)`` (exchange entries k and i where ``mask``) and ``("elim", k, i, l)``
    (entry i −= l · entry k). The pivot of column k ends up largest in magnitude among rows k … d−1: each row
    below is compared with the current pivot row and exchanged with it where larger."""
    d = A.shape[-1]
    rows = [A[:, i, :] for i in range(d)]
    ops: list[tuple] = []
    for k in range(d):
        for i in range(k + 1, d):
            mask = rows[i][:, k].abs() > rows[k][:, k].abs()
            m = mask[:, None]
            rows[k], rows[i] = torch.where(m, rows[i], rows[k]), torch.where(m, rows[k], rows[i])
            ops.append(("swap", k, i, mask))
        for i in range(k + 1, d):
            factor = rows[i][:, k] / rows[k][:, k]
            rows[i] = rows[i] - factor[:, None] * rows[k]
            ops.append(("elim", k, i, factor))
    return rows, ops


def small_lu_solve(fac: tuple[list[torch.Tensor], list[tuple]], b: torch.Tensor) -> torch.Tensor:
    """Solve ``A x = b`` for ``b`` ``(B, d)`` with the factorisation from :func:`small_lu`."""
    U, ops = fac
    d = len(U)
    x = [b[:, i] for i in range(d)]
    for op in ops:
        if op[0] == "swap":
            _, k, i, mask = op
            x[k], x[i] = torch.where(mask, x[i], x[k]), torch.where(mask, x[k], x[i])
        else:
            _, k, i, factor = op
            x[i] = x[i] - factor * x[k]
    for k in range(d - 1, -1, -1):
        s = x[k]
        for j in range(k + 1, d):
            s = s - U[k][:, j] * x[j]
        x[k] = s / U[k][:, k]
    return torch.stack(x, 1)


def _make_step(func: Callable, tab: RosenbrockTableau, shape: torch.Size, batch: int, dtype: torch.dtype):
    n = math.prod(shape)
    d = n // batch
    sqrt_eps = math.sqrt(torch.finfo(dtype).eps)
    jac_hook = getattr(func, "jacobian", None)
    alpha, gammas, A, C, M = tab.alpha, tab.gammas, tab.a, tab.c, tab.m
    err_w = tab.e
    small = d <= SMALL_D

    def f(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return func(t.to(dtype), y.view(shape)).reshape(n)

    def step(t: torch.Tensor, h: torch.Tensor, y: torch.Tensor, f0: torch.Tensor):
        if jac_hook is not None:
            J = jac_hook(t.to(dtype), y.view(shape)).reshape(batch, d, d)
        else:
            # column k of every block at once: the tangent is 1 at entry k of each block
            basis = torch.eye(d, dtype=dtype, device=y.device).repeat(1, batch)  # (d, n)
            cols = torch.func.vmap(lambda v: torch.func.jvp(lambda z: f(t, z), (y,), (v,))[1])(basis)
            J = cols.view(d, batch, d).permute(1, 2, 0)  # J[b, q, k] = ∂f_{b,q} / ∂y_{b,k}
        inv_hg = (1.0 / (h * tab.gamma)).to(dtype)
        G = torch.eye(d, dtype=dtype, device=y.device) * inv_hg - J
        if small:
            fac = small_lu(G)

            def solve(v):
                return small_lu_solve(fac, v.view(batch, d)).reshape(n)

        else:
            LU, piv = torch.linalg.lu_factor(G)

            def solve(v):
                return torch.linalg.lu_solve(LU, piv, v.view(batch, d, 1)).reshape(n)

        delta = sqrt_eps * torch.clamp(t.abs(), min=1.0) * torch.sign(h)
        T = (f(t + delta, y) - f0) / delta.to(dtype)
        hd = h.to(dtype)
        K: list[torch.Tensor] = []
        for i in range(len(alpha)):
            if i == 0:
                fi = f0
            else:
                yi = y
                for j, aij in enumerate(A[i]):
                    if aij:
                        yi = yi + aij * K[j]
                fi = f(t + alpha[i] * h, yi)
            r = fi + (hd * gammas[i]) * T if gammas[i] else fi
            for j, cij in enumerate(C[i]):
                if cij:
                    r = r + (cij / hd) * K[j]
            K.append(solve(r))
        y1 = y
        for mj, kj in zip(M, K):
            if mj:
                y1 = y1 + mj * kj
        err = sum(ej * kj for ej, kj in zip(err_w, K) if ej)
        f1 = f(t + h, y1)
        return y1, err / hd, (y1 - y) / hd, f1

    return step


def compiled_rosenbrock_step(func, tab: RosenbrockTableau, shape, batch: int, dtype, device, backend: str):
    key = (id(func), id(tab), tuple(shape), batch, dtype, str(device), backend)
    hit = _CACHE.get(key, func, tab)
    if hit is not None:
        return hit
    fn = torch.compile(
        fresh_code(_make_step(func, tab, torch.Size(shape), batch, dtype)), backend=backend_for(backend, device)
    )
    return _CACHE.put(key, fn, func, tab)


class CompiledRosenbrock(Rosenbrock):
    """``Rosenbrock`` whose step is one compiled function. To the loop it is first same as last (the step
    returns f at its end), with rows 0 = f(t0, y0), 1 = (y1 − y0)/h, 2 = f(t1, y1) as for the eager stepper."""

    def __init__(
        self,
        tableau: RosenbrockTableau,
        func: Callable,
        shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        batch: int = 1,
        backend: str = "inductor",
    ) -> None:
        super().__init__(tableau, math.prod(shape), dtype, device, batch=batch)
        self.stages = 3
        self.fsal = True
        self.func = func
        self.step_fn = compiled_rosenbrock_step(func, tableau, shape, batch, dtype, device, backend)
        self.evals_per_step = 7 + (getattr(func, "jacobian", None) is None)

    def step(self, rhs, t: float, dt: float, y: torch.Tensor, buf, perturb_last: bool = False):
        if perturb_last:  # a discontinuity at the step's end (jump_t): the eager step knows how to stop short
            y1, e = super().step(rhs, t, dt, y, buf, perturb_last)
            buf.set(2, rhs.at(t + dt, y1, perturb=-1 if dt > 0 else 1))
            return y1, e
        f0 = buf.rows[0]
        tt = torch.tensor(t, dtype=torch.float64, device=self.device)
        hh = torch.tensor(dt, dtype=torch.float64, device=self.device)
        y1, e, slope, f1 = self.step_fn(tt, hh, y, f0)
        rhs.nfe += self.evals_per_step
        buf.set(1, slope)
        buf.set(2, f1)
        return y1, e
