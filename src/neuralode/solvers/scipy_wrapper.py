"""The ``scipy_solver`` method: ``scipy.integrate.solve_ivp`` behind the same interface (forward only).

scipy is imported when this method is used, never by the library otherwise.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch

from .._errors import Status
from .integrate import RHS, IntegrationResult

__all__ = ["integrate_scipy"]


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
