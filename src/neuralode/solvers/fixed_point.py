"""Fixed-point and root solvers on batched tensors: Anderson acceleration and Broyden's method.

Both find z with z = f(z) for every sample of a batch at once (the first dimension is the batch; each sample
is solved in its own subspace, the iteration stops when every sample has converged). Convergence is judged by
the relative residual ``‖f(z) − z‖ / (‖f(z)‖ + 1e-9)`` per sample.

- Anderson acceleration (Anderson 1965; Walker & Ni, SIAM J. Numer. Anal. 49(4), 2011): the next iterate mixes
  the last ``m`` images ``f(z_i)`` with weights α that minimise ‖Σ α_i (f(z_i) − z_i)‖ subject to Σ α_i = 1,
  found from the bordered normal equations with a Tikhonov term ``lam`` relative to the residuals' size.
- Broyden's "good" method (Broyden 1965) on g(z) = f(z) − z, with a limited-memory low-rank inverse Jacobian
  that starts from −I (so the first step is a plain fixed-point iteration) and is updated by Sherman–Morrison.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["FixedPointStats", "FixedPointError", "anderson", "broyden", "fixed_point", "SOLVERS"]


class FixedPointError(RuntimeError):
    """A fixed-point solve did not reach its tolerance (``on_failure="raise"``)."""


@dataclass
class FixedPointStats:
    """What a fixed-point solve did.

    Attributes:
        iterations: evaluations of ``f``.
        residual: the largest relative residual ``‖f(z) − z‖ / ‖f(z)‖`` in the batch at the returned iterate.
        converged: whether every sample reached the tolerance.
    """

    iterations: int = 0  # evaluations of f
    residual: float = math.inf  # the largest relative residual in the batch at the returned iterate
    converged: bool = False


def _rel_residual(fz: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    return torch.linalg.vector_norm(fz - z, dim=1) / (torch.linalg.vector_norm(fz, dim=1) + 1e-9)


def _check_args(z0: torch.Tensor, tol: float, max_iter: int) -> None:
    if not torch.is_tensor(z0) or z0.dim() < 1:
        raise TypeError("z0 must be a tensor whose first dimension is the batch")
    if not (tol > 0):
        raise ValueError(f"tol={tol} must be positive")
    if max_iter < 1:
        raise ValueError(f"max_iter={max_iter} must be at least 1")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 contains NaN or Inf; start the fixed-point solve from a finite state")


def _finish(name: str, stats: FixedPointStats, tol: float, on_failure: str) -> None:
    if stats.converged:
        return
    msg = (
        f"{name} did not converge: relative residual {stats.residual:.3g} > tol={tol:g} after "
        f"{stats.iterations} evaluations; raise max_iter, loosen tol, or make the map more contractive "
        "(e.g. Jacobian regularisation)"
    )
    if not math.isfinite(stats.residual):
        msg = f"{name} diverged: the iterate became NaN or Inf after {stats.iterations} evaluations"
    if on_failure == "raise":
        raise FixedPointError(msg)
    if on_failure == "warn":
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


def anderson(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    m: int = 5,
    lam: float = 1e-4,
    beta: float = 1.0,
    tol: float = 1e-4,
    max_iter: int = 50,
    on_failure: str = "warn",
) -> tuple[torch.Tensor, FixedPointStats]:
    """Solve z = f(z) by Anderson acceleration with memory ``m`` and mixing ``beta`` (1: use the images).

    Returns ``(z, stats)``; on non-convergence the best iterate found is returned and a warning is issued
    (``on_failure="warn"``), an error raised (``"raise"``) or nothing said (``"ignore"``).
    """
    _check_args(z0, tol, max_iter)
    shape, bsz = z0.shape, z0.shape[0]
    n = z0[0].numel()
    m = max(2, int(m))
    X = z0.new_zeros(bsz, m, n)
    F = z0.new_zeros(bsz, m, n)
    x = z0.reshape(bsz, n)
    X[:, 0] = x
    F[:, 0] = f(x.view(shape)).reshape(bsz, n)
    stats = FixedPointStats(iterations=1)
    res = _rel_residual(F[:, 0], X[:, 0])
    best, best_res = F[:, 0].clone(), res.clone()
    if float(res.max()) < tol:
        stats.residual, stats.converged = float(res.max()), True
        return best.view(shape), stats
    X[:, 1] = F[:, 0]
    F[:, 1] = f(F[:, 0].view(shape)).reshape(bsz, n)
    stats.iterations = 2
    H = z0.new_zeros(bsz, m + 1, m + 1)
    H[:, 0, 1:] = H[:, 1:, 0] = 1
    rhs = z0.new_zeros(bsz, m + 1, 1)
    rhs[:, 0] = 1
    k = 1
    while True:
        i = k % m
        res = _rel_residual(F[:, i], X[:, i])
        improve = res < best_res
        best = torch.where(improve[:, None], F[:, i], best)
        best_res = torch.where(improve, res, best_res)
        worst = float(best_res.max())
        if worst < tol or not math.isfinite(float(res.max())) or stats.iterations >= max_iter:
            break
        k += 1
        mk = min(k, m)
        G = F[:, :mk] - X[:, :mk]
        GG = torch.bmm(G, G.transpose(1, 2))
        # Tikhonov term relative to the residuals' size, so that it neither dominates tiny residuals near
        # convergence nor vanishes for large ones
        ridge = lam * GG.diagonal(dim1=1, dim2=2).amax(1).clamp_min(torch.finfo(z0.dtype).tiny)
        H[:, 1 : mk + 1, 1 : mk + 1] = GG + ridge[:, None, None] * torch.eye(mk, dtype=z0.dtype, device=z0.device)
        alpha = torch.linalg.solve(H[:, : mk + 1, : mk + 1], rhs[:, : mk + 1])[:, 1 : mk + 1, 0]
        j = k % m
        new = beta * torch.bmm(alpha[:, None], F[:, :mk])[:, 0]
        if beta != 1.0:
            new = new + (1 - beta) * torch.bmm(alpha[:, None], X[:, :mk])[:, 0]
        X[:, j] = new
        F[:, j] = f(new.view(shape)).reshape(bsz, n)
        stats.iterations += 1
    stats.residual = float(best_res.max())
    stats.converged = stats.residual < tol
    _finish("anderson", stats, tol, on_failure)
    return best.view(shape), stats


def broyden(
    f: Callable[[torch.Tensor], torch.Tensor],
    z0: torch.Tensor,
    *,
    memory: int = 30,
    tol: float = 1e-4,
    max_iter: int = 50,
    on_failure: str = "warn",
) -> tuple[torch.Tensor, FixedPointStats]:
    """Solve z = f(z) by Broyden's good method on g(z) = f(z) − z (limited memory ``memory``; the low-rank
    inverse Jacobian restarts from −I when full). Returns ``(z, stats)`` like :func:`anderson`."""
    _check_args(z0, tol, max_iter)
    shape, bsz = z0.shape, z0.shape[0]
    n = z0[0].numel()
    U = z0.new_zeros(bsz, memory, n)
    V = z0.new_zeros(bsz, memory, n)
    used = 0

    def inv_j(w: torch.Tensor) -> torch.Tensor:  # J⁻¹ w = −w + Σ u_i (v_i · w)
        if used == 0:
            return -w
        return -w + torch.bmm(torch.bmm(w[:, None], V[:, :used].transpose(1, 2)), U[:, :used])[:, 0]

    def inv_j_t(w: torch.Tensor) -> torch.Tensor:  # J⁻ᵀ w = −w + Σ v_i (u_i · w)
        if used == 0:
            return -w
        return -w + torch.bmm(torch.bmm(w[:, None], U[:, :used].transpose(1, 2)), V[:, :used])[:, 0]

    z = z0.reshape(bsz, n).clone()
    fz = f(z.view(shape)).reshape(bsz, n)
    g = fz - z
    stats = FixedPointStats(iterations=1)
    res = _rel_residual(fz, z)
    best, best_res = fz.clone(), res.clone()
    while float(best_res.max()) >= tol and stats.iterations < max_iter and math.isfinite(float(res.max())):
        dz = -inv_j(g)
        z_new = z + dz
        fz = f(z_new.view(shape)).reshape(bsz, n)
        stats.iterations += 1
        g_new = fz - z_new
        res = _rel_residual(fz, z_new)
        improve = res < best_res
        best = torch.where(improve[:, None], fz, best)
        best_res = torch.where(improve, res, best_res)
        dg = g_new - g
        jdg = inv_j(dg)
        vt = inv_j_t(dz)  # (Δz)ᵀ J⁻¹
        denom = (vt * dg).sum(1, keepdim=True)
        denom = torch.where(denom.abs() < 1e-12, torch.full_like(denom, 1e-12), denom)
        if used == memory:
            used = 0  # restart from −I
        U[:, used] = (dz - jdg) / denom
        V[:, used] = vt
        used += 1
        z, g = z_new, g_new
    stats.residual = float(best_res.max())
    stats.converged = stats.residual < tol
    _finish("broyden", stats, tol, on_failure)
    return best.view(shape), stats


def fixed_point(f, z0, *, solver: str = "anderson", tol: float = 1e-4, max_iter: int = 50, on_failure="warn", **kwargs):
    """Dispatch to ``anderson`` or ``broyden`` by name."""
    if solver not in SOLVERS:
        raise ValueError(f"solver={solver!r} is not known; choose one of {', '.join(SOLVERS)}")
    return SOLVERS[solver](f, z0, tol=tol, max_iter=max_iter, on_failure=on_failure, **kwargs)


SOLVERS = {"anderson": anderson, "broyden": broyden}
