"""The cubic spiral of Chen et al.'s demo: dy/dt = (y³) A with A = [[-0.1, 2], [-2, -0.1]]."""

from __future__ import annotations

import torch

from .._api import odeint

SPIRAL_A = ((-0.1, 2.0), (-2.0, -0.1))


def cubic_spiral_field(t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (y**3) @ torch.tensor(SPIRAL_A, dtype=y.dtype, device=y.device)


def cubic_spiral_trajectory(
    n: int = 1000,
    t_max: float = 25.0,
    y0=(2.0, 0.0),
    noise: float = 0.0,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Times ``(n,)`` and states ``(n, 2)`` of the true spiral (solved at rtol 1e-9), optionally noisy."""
    t = torch.linspace(0.0, t_max, n, dtype=torch.float64)
    with torch.no_grad():
        ys = odeint(cubic_spiral_field, torch.tensor(y0, dtype=torch.float64), t, rtol=1e-9, atol=1e-10)
    if noise > 0:
        g = torch.Generator().manual_seed(seed)
        ys = ys + noise * torch.randn(ys.shape, generator=g, dtype=ys.dtype)
    return t.to(dtype), ys.to(dtype)
