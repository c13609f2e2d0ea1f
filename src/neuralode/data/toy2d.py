"""2-D toy distributions for flows, generated in code (the usual benchmark shapes of the flow literature).

``sample_2d(name, n, seed)`` returns an ``(n, 2)`` float tensor, roughly centred and of unit scale.
"""

from __future__ import annotations

import math

import numpy as np
import torch

__all__ = ["TOY_2D", "sample_2d"]


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
