"""Built-in dynamical systems with their true vector fields, and noisy observations of them.

Each :class:`System` knows its vector field as a function of the state and of named physical parameters, so
the same function serves as the ground truth and as the known part ``f_known(y; θ_phys)`` of a hybrid model.

- ``spiral``: dy/dt = y³ A, A = [[-0.1, 2], [-2, -0.1]] (Chen et al.'s demo).
- ``pendulum``: θ'' = -μ θ' - (g/L) sin θ, state (θ, ω).
- ``falling``: a falling object with linear air drag, m v' = m g - γ v, state (height above start x, v)
  with x' = v; closed form v(t) = v∞ + (v0 - v∞) e^{-kt}, k = γ/m, v∞ = g/k.
- ``lotka_volterra``: x' = αx - βxy, y' = δxy - γy.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .._torchdiffeq import odeint

__all__ = ["System", "SYSTEMS", "observe"]


@dataclasses.dataclass(frozen=True)
class System:
    name: str
    dim: int
    params: dict  # true physical parameters
    field: Callable  # field(y, p) with p a dict of tensors/floats; y (..., dim)
    y0: tuple  # default initial state
    t_max: float
    labels: tuple  # names of the state components
    analytic: Callable | None = None  # analytic(t, y0, p) -> (len(t), dim), where a closed form exists

    def true_field(self, t, y):
        return self.field(y, self.params)


def _spiral(y, p):
    A = torch.tensor([[p["a11"], p["a12"]], [p["a21"], p["a22"]]], dtype=y.dtype, device=y.device)
    return (y**3) @ A


def _pendulum(y, p):
    theta, omega = y[..., 0], y[..., 1]
    return torch.stack([omega, -p["mu"] * omega - p["g_over_L"] * torch.sin(theta)], -1)


def _falling(y, p):
    v = y[..., 1]
    return torch.stack([v, p["g"] - p["gamma_over_m"] * v], -1)


def _falling_exact(t, y0, p):
    k, g = p["gamma_over_m"], p["g"]
    v_inf = g / k
    x0, v0 = float(y0[0]), float(y0[1])
    e = torch.exp(-k * t)
    v = v_inf + (v0 - v_inf) * e
    x = x0 + v_inf * t + (v0 - v_inf) * (1 - e) / k
    return torch.stack([x, v], -1)


def _lotka_volterra(y, p):
    x, z = y[..., 0], y[..., 1]
    return torch.stack([p["alpha"] * x - p["beta"] * x * z, p["delta"] * x * z - p["gamma"] * z], -1)


SYSTEMS: dict[str, System] = {
    "spiral": System(
        "spiral", 2, {"a11": -0.1, "a12": 2.0, "a21": -2.0, "a22": -0.1}, _spiral, (2.0, 0.0), 25.0, ("y1", "y2")
    ),
    "pendulum": System(
        "pendulum", 2, {"g_over_L": 9.81, "mu": 0.3}, _pendulum, (1.0, 0.0), 10.0, ("angle", "angular velocity")
    ),
    "falling": System(
        "falling",
        2,
        {"g": 9.81, "gamma_over_m": 0.5},
        _falling,
        (0.0, 0.0),
        10.0,
        ("distance fallen", "velocity"),
        analytic=_falling_exact,
    ),
    "lotka_volterra": System(
        "lotka_volterra",
        2,
        {"alpha": 1.5, "beta": 1.0, "delta": 1.0, "gamma": 3.0},
        _lotka_volterra,
        (1.0, 1.0),
        10.0,
        ("prey", "predator"),
    ),
}


def observe(
    system: System | str,
    n: int = 1000,
    t_max: float | None = None,
    y0=None,
    noise: float = 0.0,
    irregular: bool = False,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Observations of one trajectory.

    Returns:
        ``(t, y_clean, y_noisy)`` with ``t`` of shape ``(n,)`` (sorted uniform random times when
        ``irregular``, else evenly spaced, starting at 0) and states of shape ``(n, dim)``.
    """
    sys_ = SYSTEMS[system] if isinstance(system, str) else system
    g = torch.Generator().manual_seed(seed)
    t_max = sys_.t_max if t_max is None else t_max
    if irregular:
        t = torch.cat(
            [
                torch.zeros(1, dtype=torch.float64),
                torch.sort(torch.rand(n - 1, generator=g, dtype=torch.float64)).values * t_max,
            ]
        )
    else:
        t = torch.linspace(0, t_max, n, dtype=torch.float64)
    y0_t = torch.tensor(sys_.y0 if y0 is None else y0, dtype=torch.float64)
    with torch.no_grad():
        clean = odeint(sys_.true_field, y0_t, t, rtol=1e-10, atol=1e-10)
    noisy = clean + noise * torch.randn(clean.shape, generator=g, dtype=torch.float64)
    return t.to(dtype), clean.to(dtype), noisy.to(dtype)
