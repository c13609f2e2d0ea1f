"""Numerical references shared by the tests."""

import torch


def central_differences(f, x: torch.Tensor, eps: float) -> torch.Tensor:
    """``(f(x + eps e_i) - f(x - eps e_i)) / (2 eps)`` for every entry ``i`` of ``x``: the derivative of the
    scalar ``f`` by central differences (in ``x``'s dtype; float64 for a reference), shaped like ``x``."""
    out = torch.empty_like(x)
    with torch.no_grad():
        for i in range(x.numel()):
            e = torch.zeros_like(x).view(-1)
            e[i] = eps
            e = e.view_as(x)
            out.view(-1)[i] = (f(x + e) - f(x - e)) / (2 * eps)
    return out
