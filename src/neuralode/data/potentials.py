"""Unnormalised 2-D target densities p̃(z) = exp(−U(z)) for density matching: the four energy functions of
Rezende & Mohamed, "Variational inference with normalizing flows" (ICML 2015), Table 1.

U2–U4 do not decay along z1 (their mass is infinite on R²), so a reverse-KL fit could lower its loss without
bound by spreading out. As in the paper's figures, which show [-4, 4]², every target here is confined to
|z1| ≤ 4 by a wall that leaves the density unchanged inside and decays like a Gaussian of width 0.05 outside;
then log Z is finite (:func:`log_normalizer`, by quadrature) and KL(q ‖ p) itself can be reported.
"""

from __future__ import annotations

import math

import torch

__all__ = ["POTENTIALS", "log_target", "log_normalizer"]

WALL_AT, WALL_WIDTH = 4.0, 0.05


def _w1(z):
    return torch.sin(2 * math.pi * z[:, 0] / 4)


def _w2(z):
    return 3 * torch.exp(-0.5 * ((z[:, 0] - 1) / 0.6) ** 2)


def _w3(z):
    return 3 * torch.sigmoid((z[:, 0] - 1) / 0.3)


def _u1(z):
    r = z.norm(dim=1)
    return 0.5 * ((r - 2) / 0.4) ** 2 - torch.logaddexp(
        -0.5 * ((z[:, 0] - 2) / 0.6) ** 2, -0.5 * ((z[:, 0] + 2) / 0.6) ** 2
    )


def _u2(z):
    return 0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2


def _u3(z):
    return -torch.logaddexp(-0.5 * ((z[:, 1] - _w1(z)) / 0.35) ** 2, -0.5 * ((z[:, 1] - _w1(z) + _w2(z)) / 0.35) ** 2)


def _u4(z):
    return -torch.logaddexp(-0.5 * ((z[:, 1] - _w1(z)) / 0.4) ** 2, -0.5 * ((z[:, 1] - _w1(z) + _w3(z)) / 0.35) ** 2)


POTENTIALS = {"U1": _u1, "U2": _u2, "U3": _u3, "U4": _u4}


def log_target(name: str, z: torch.Tensor) -> torch.Tensor:
    """log p̃(z) = −U(z), unnormalised."""
    if name not in POTENTIALS:
        raise ValueError(f"target {name!r} is not known; choose one of {', '.join(POTENTIALS)}")
    wall = 0.5 * (torch.relu(z[:, 0].abs() - WALL_AT) / WALL_WIDTH) ** 2
    return -POTENTIALS[name](z) - wall


_LOG_Z: dict = {}


def log_normalizer(name: str, n: int = 1601) -> float:
    """log Z = log ∫ p̃(z) dz by the trapezoid rule on an n × n grid over [-6, 6]² in float64 (the targets'
    mass lies inside |z1| ≤ 4.3 and |z2| ≤ 5); cached."""
    key = (name, n)
    if key not in _LOG_Z:
        xs = torch.linspace(-6.0, 6.0, n, dtype=torch.float64)
        w = torch.full((n,), float(xs[1] - xs[0]), dtype=torch.float64)
        w[0] = w[-1] = w[0] / 2  # trapezoid weights
        X, Y = torch.meshgrid(xs, xs, indexing="ij")
        lp = log_target(name, torch.stack([X.reshape(-1), Y.reshape(-1)], 1)).reshape(n, n)
        _LOG_Z[key] = float(torch.logsumexp(lp + w.log()[:, None] + w.log()[None, :], (0, 1)))
    return _LOG_Z[key]
