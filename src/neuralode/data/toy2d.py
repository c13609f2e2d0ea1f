"""2-D toy distributions for flows, generated in code (the usual benchmark shapes of the flow literature).

``sample_2d(name, n, seed)`` returns an ``(n, 2)`` float tensor, roughly centred and of unit scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TOY_2D", "sample_2d", "log_density_2d", "entropy_2d"]


def _eight_gaussians(rng, n):
    k = rng.integers(0, 8, n)
    ang = 2 * math.pi * k / 8
    centers = np.stack([np.cos(ang), np.sin(ang)], 1) * 2.0
    return (centers + 0.1 * rng.standard_normal((n, 2))) / 1.414


def _checkerboard(rng, n):
    x1 = rng.uniform(-2, 2, n)
    x2 = rng.uniform(0, 1, n) + rng.integers(0, 2, n) * 2 - 2
    x2 = x2 + (np.floor(x1) % 2)
    return np.stack([x1, x2], 1)


def _two_spirals(rng, n):
    t = np.sqrt(rng.uniform(0, 1, n)) * 3 * math.pi
    sign = rng.integers(0, 2, n) * 2 - 1
    x = np.stack([-np.cos(t) * t, np.sin(t) * t], 1) * sign[:, None]
    return x / 3 + 0.1 * rng.standard_normal((n, 2))


def _moons(rng, n):
    k = rng.integers(0, 2, n)
    t = rng.uniform(0, math.pi, n)
    upper = np.stack([np.cos(t), np.sin(t)], 1)
    lower = np.stack([1 - np.cos(t), 0.5 - np.sin(t)], 1)
    x = np.where(k[:, None] == 0, upper, lower) + 0.05 * rng.standard_normal((n, 2))
    return (x - np.array([0.5, 0.25])) * 1.5


def _pinwheel(rng, n, arms=5):
    k = rng.integers(0, arms, n)
    r = rng.standard_normal(n) * 0.3 + 1.0
    w = rng.standard_normal(n) * 0.05
    ang = 2 * math.pi * k / arms + 0.25 * np.exp(r)
    pts = np.stack([r, w], 1)
    rot = np.stack([np.stack([np.cos(ang), -np.sin(ang)], 1), np.stack([np.sin(ang), np.cos(ang)], 1)], 1)
    return np.einsum("nij,nj->ni", rot, pts) * 1.5


def _rings(rng, n):
    radii = np.array([0.5, 1.0, 1.5, 2.0])
    r = radii[rng.integers(0, 4, n)]
    t = rng.uniform(0, 2 * math.pi, n)
    return np.stack([np.cos(t), np.sin(t)], 1) * r[:, None] + 0.05 * rng.standard_normal((n, 2))


def _circles(rng, n):
    r = np.where(rng.integers(0, 2, n) == 0, 1.0, 2.0)
    t = rng.uniform(0, 2 * math.pi, n)
    return np.stack([np.cos(t), np.sin(t)], 1) * r[:, None] + 0.08 * rng.standard_normal((n, 2))


def _swissroll(rng, n):
    t = 1.5 * math.pi * (1 + 2 * rng.uniform(0, 1, n))
    x = np.stack([t * np.cos(t), t * np.sin(t)], 1) / 5.0
    return x + 0.1 * rng.standard_normal((n, 2))


TOY_2D = {
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "2spirals": _two_spirals,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "rings": _rings,
    "circles": _circles,
    "swissroll": _swissroll,
}


def sample_2d(name: str, n: int, seed: int | None = 0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    if name not in TOY_2D:
        raise ValueError(f"dataset {name!r} is not known; choose one of {', '.join(TOY_2D)}")
    if n < 1:
        raise ValueError(f"n={n} must be positive")
    rng = np.random.default_rng(seed)
    return torch.as_tensor(TOY_2D[name](rng, n), dtype=dtype)


def _log_normal_2d(x: torch.Tensor, centers: torch.Tensor, sigma: float) -> torch.Tensor:
    """log N(x; c, σ² I) for every pair: ``(n, m)``."""
    d2 = torch.cdist(x, centers) ** 2
    return -0.5 * d2 / sigma**2 - math.log(2 * math.pi * sigma**2)


def log_density_2d(name: str, x: torch.Tensor, n_quad: int = 1000) -> torch.Tensor:
    """The true log-density of a built-in dataset at ``x`` (n, 2), float64: closed form for 8gaussians (a
    mixture of Gaussians) and circles (a ring convolved with a Gaussian: the angular integral is a Bessel
    function, exp(−(|x| − r)²/2σ²) I₀e(r|x|/σ²) / 2πσ²), and for moons the curve integral by the midpoint rule
    on ``n_quad`` points per half-circle. Other datasets raise ValueError."""
    x = x.to(torch.float64)
    if name == "8gaussians":
        ang = 2 * math.pi * torch.arange(8, dtype=torch.float64) / 8
        centers = torch.stack([ang.cos(), ang.sin()], 1) * 2.0 / 1.414
        return torch.logsumexp(_log_normal_2d(x, centers, 0.1 / 1.414), 1) - math.log(8)
    if name == "circles":
        s2 = 0.08**2
        rho = x.norm(dim=1)
        terms = [
            -0.5 * (rho - r) ** 2 / s2 + torch.special.i0e(r * rho / s2).log() - math.log(2 * math.pi * s2)
            for r in (1.0, 2.0)
        ]
        return torch.logsumexp(torch.stack(terms, 1), 1) - math.log(2)
    if name == "moons":
        t = (torch.arange(n_quad, dtype=torch.float64) + 0.5) * math.pi / n_quad
        upper = torch.stack([t.cos(), t.sin()], 1)
        lower = torch.stack([1 - t.cos(), 0.5 - t.sin()], 1)
        centers = (torch.cat([upper, lower]) - torch.tensor([0.5, 0.25], dtype=torch.float64)) * 1.5
        log_terms = []
        for i in range(0, len(x), 2048):  # (chunk, 2 n_quad) at a time
            log_terms.append(torch.logsumexp(_log_normal_2d(x[i : i + 2048], centers, 0.075), 1))
        return torch.cat(log_terms) - math.log(2 * n_quad)
    raise ValueError(f"the true density of {name!r} is not implemented; it is for 8gaussians, circles and moons")


def entropy_2d(name: str, n: int = 20_000, seed: int = 12345) -> tuple[float, float]:
    """The differential entropy H = −E log p(x) of a built-in dataset (nats), by Monte Carlo over ``n`` fresh
    samples with the true density; returns (H, standard error). No model's expected held-out NLL can be
    below it (cross-entropy ≥ entropy), so it bounds how far any reference run can get."""
    lp = log_density_2d(name, sample_2d(name, n, seed=seed, dtype=torch.float64))
    return float(-lp.mean()), float(lp.std() / math.sqrt(n))
