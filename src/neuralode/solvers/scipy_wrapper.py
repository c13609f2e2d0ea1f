"""The ``scipy_solver`` method: ``scipy.integrate.solve_ivp`` behind the same interface (forward only).

scipy is imported when this method is used, never by the library otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .._errors import Status
from .integrate import RHS, IntegrationResult

__all__ = ["integrate_scipy", "forward_only"]


class _ForwardOnly(torch.autograd.Function):
    """The identity on scipy's solution, tied to what required grad: the solution is usable as torchdiffeq's
    is (values, without a graph through the solver), and a gradient that reaches it raises instead of being
    dropped without a word (a loss with other terms would otherwise train on a partial gradient)."""

    @staticmethod
    def forward(ctx, which: str, ys: torch.Tensor, *inputs: torch.Tensor) -> torch.Tensor:
        ctx.which = which
        return ys.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        raise RuntimeError(
            f"method='scipy_solver' is forward only: its solution carries no gradient for {ctx.which}. Solve "
            "under torch.no_grad() (or detach them), or use a neuralode method such as 'dopri5' or 'rodas4' for "
            "gradients"
        )


def forward_only(ys: torch.Tensor, func, y0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``ys`` as :class:`_ForwardOnly` returns it where ``y0``, ``t`` or ``func``'s parameters require grad (and
    grad mode is on); ``ys`` itself otherwise."""
    params = [p for p in func.parameters() if p.requires_grad] if isinstance(func, torch.nn.Module) else []
    named = (
        ("y0", [y0] if y0.requires_grad else []),
        ("t", [t] if t.requires_grad else []),
        ("func's parameters", params),
    )
    which = [name for name, ts in named if ts]
    if not which or not torch.is_grad_enabled():
        return ys
    return _ForwardOnly.apply(" and ".join(which), ys, *[x for _, ts in named for x in ts])


def integrate_scipy(
    rhs: RHS,
    y0: torch.Tensor,
    t_out: Sequence[float],
    *,
    rtol: Any,
    atol: Any,
    solver: str = "LSODA",
    min_step: float = 0.0,
    max_step: float = math.inf,
    first_step: float | None = None,
) -> IntegrationResult:
    try:
        from scipy.integrate import solve_ivp
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("method='scipy_solver' needs scipy: pip install scipy") from exc
    dtype, device = y0.dtype, y0.device

    def fun(t, y):
        with torch.no_grad():
            out = rhs(torch.tensor(t, dtype=dtype, device=device), torch.as_tensor(y, dtype=dtype, device=device))
        return out.detach().cpu().double().numpy()

    as_np = lambda x: x.detach().cpu().double().numpy() if torch.is_tensor(x) else x  # noqa: E731
    kwargs = dict(method=solver, rtol=as_np(rtol), atol=as_np(atol), max_step=max_step, min_step=min_step)
    if first_step is not None:
        kwargs["first_step"] = first_step
    if solver not in ("LSODA",):
        kwargs.pop("min_step")
    if len(t_out) == 1:
        return IntegrationResult(y0[None].detach(), Status.SUCCESS)
    sol = solve_ivp(fun, (t_out[0], t_out[-1]), y0.detach().cpu().double().numpy(), t_eval=list(t_out), **kwargs)
    ys = torch.as_tensor(sol.y.T, dtype=dtype, device=device)
    if not sol.success:
        return IntegrationResult(
            ys,
            Status.DT_UNDERFLOW,
            f"scipy's {solver} failed: {sol.message}",
            float(sol.t[-1]) if len(sol.t) else t_out[0],
        )
    return IntegrationResult(ys, Status.SUCCESS)  # nfe is counted by rhs; scipy does not report steps
