"""Unnormalised 2-D target densities p̃(z) = exp(−U(z)) for density matching: the four energy functions of
Rezende & Mohamed, "Variational inference with normalizing flows" (ICML 2015), Table 1."""

from __future__ import annotations

import math

import torch

__all__ = ["POTENTIALS", "log_target"]


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
    return -POTENTIALS[name](z)
