"""The planar normalizing flow of Rezende & Mohamed (2015, §4.1), the discrete baseline for density matching.

f(z) = z + û h(wᵀz + b) with h = tanh and û = u + (m(wᵀu) − wᵀu) w/‖w‖², m(x) = −1 + softplus(x), which keeps
every layer invertible (wᵀû ≥ −1); log |det ∂f/∂z| = log |1 + ûᵀ h'(wᵀz + b) w|.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["PlanarFlow"]


class PlanarFlow(nn.Module):
    """``K`` planar layers on R^D with a standard normal base; ``sample_with_log_prob(n)`` gives samples and their
    log-density under the flow."""

    def __init__(self, dim: int = 2, K: int = 8) -> None:
        super().__init__()
        self.dim = dim
        self.u = nn.Parameter(0.1 * torch.randn(K, dim))
        self.w = nn.Parameter(0.1 * torch.randn(K, dim))
        self.b = nn.Parameter(torch.zeros(K))

    def _u_hat(self, k: int) -> torch.Tensor:
        u, w = self.u[k], self.w[k]
        wu = (w * u).sum()
        return u + (-1 + F.softplus(wu) - wu) * w / (w * w).sum().clamp_min(1e-12)

    def transform(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f_K ∘ … ∘ f_1)(z) and Σ log |det| per sample."""
        logdet = z.new_zeros(z.shape[0])
        for k in range(self.u.shape[0]):
            u, w, b = self._u_hat(k), self.w[k], self.b[k]
            a = z @ w + b
            z = z + u * torch.tanh(a)[:, None]
            psi = (1 - torch.tanh(a) ** 2)[:, None] * w
            logdet = logdet + torch.log((1 + psi @ u).abs() + 1e-12)
        return z, logdet

    def sample_with_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw ``n`` samples and their log-density under the flow (density matching trains on both).

        Arguments:
            n: number of samples.

        Returns:
            ``(x, log_q)``: samples ``(n, dim)`` and ``log q(x)`` ``(n,)``, in the parameters' dtype.

        Example:
            >>> x, log_q = PlanarFlow(dim=2, K=4).sample_with_log_prob(16)
            >>> x.shape, log_q.shape
            (torch.Size([16, 2]), torch.Size([16]))
        """
        p = self.u
        z0 = torch.randn(n, self.dim, dtype=p.dtype, device=p.device)
        base = -0.5 * (z0**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)
        x, logdet = self.transform(z0)
        return x, base - logdet
