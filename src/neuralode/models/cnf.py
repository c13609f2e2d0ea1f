"""Continuous normalizing flows (Chen et al. 2018, §4; Grathwohl et al. 2019, FFJORD).

A sample moves by dz/dt = f(z, t) from the base distribution at t = 0 to the data at t = T, and its
log-density by the instantaneous change of variables, d log p(z(t))/dt = −tr(∂f/∂z). The trace is exact
(one vector–Jacobian product per dimension, evaluated together; for small D) or Hutchinson's estimate
εᵀ (∂f/∂z) ε with ε Rademacher or Gaussian, drawn once per solve (FFJORD). The built-in MLP computes its
Jacobian–vector products in its own forward pass (forward mode by hand), so the trace needs no nested autograd
call; any other ``net(t, z)`` gets the vector–Jacobian products from autograd.

``regularization={"kinetic": λ_K, "jacobian": λ_J}`` adds Finlay et al.'s (2020, RNODE) penalties
λ_K ∫‖f‖² dt + λ_J ∫‖∂f/∂z‖_F² dt, integrated in the same solve (the Frobenius norm from the trace's own
vector–Jacobian products: exact, or ‖εᵀ ∂f/∂z‖² for Hutchinson, unbiased) and left out of error control;
``reg_loss`` holds the batch mean after each training solve.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .._api import solve
from ..gradients.modes import GradientMode

__all__ = ["ConcatSquashLinear", "PlanarCNFNet", "CNFField", "CNF", "exact_trace", "hutchinson_trace"]


class ConcatSquashLinear(nn.Module):
    """FFJORD's time-dependent layer: ``Linear(x) · σ(a t + b) + c t`` (gates and shifts per output unit).

    Example:
        >>> layer = ConcatSquashLinear(2, 16)
        >>> layer(torch.tensor(0.3), torch.randn(5, 2)).shape
        torch.Size([5, 16])
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_features, out_features)
        self.gate = nn.Linear(1, out_features)
        self.shift = nn.Linear(1, out_features, bias=False)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Apply the layer at time ``t``.

        Arguments:
            t: the time, a number or a 0-d (one-element) tensor.
            x: ``(batch, in_features)``, a floating dtype.

        Returns:
            ``(batch, out_features)`` in ``x``'s dtype.
        """
        tt = torch.as_tensor(t, dtype=x.dtype, device=x.device).reshape(1, 1)
        return self.linear(x) * torch.sigmoid(self.gate(tt)) + self.shift(tt)

    def forward_tangents(self, tt: torch.Tensor, x: torch.Tensor, v: torch.Tensor):
        """The layer and its directional derivatives: ``x`` (batch, in), ``v`` (batch, k, in) → (batch, out),
        (batch, k, out). The layer is affine in x, so a tangent goes through the weight and the gate only."""
        s = torch.sigmoid(self.gate(tt))
        w = self.linear.weight
        return torch.addmm(self.linear.bias, x, w.t()) * s + self.shift(tt), torch.matmul(v, w.t()) * s


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, layers: int) -> None:
        super().__init__()
        sizes = [dim] + [hidden] * layers + [dim]
        self.layers = nn.ModuleList(ConcatSquashLinear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            z = layer(t, z)
            if i < len(self.layers) - 1:
                z = torch.tanh(z)
        return z

    def forward_tangents(self, t: torch.Tensor, z: torch.Tensor, v: torch.Tensor):
        """f(t, z) and the Jacobian–vector products (∂f/∂z) vₖ in one forward pass (forward-mode by hand):
        ``v`` is (batch, k, D), the result (batch, D), (batch, k, D). No nested autograd call, so a solve's
        backward pass differentiates it once instead of twice."""
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device).reshape(1, 1)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            z, v = layer.forward_tangents(tt, z, v)
            if i < last:
                z = torch.tanh(z)
                v = v * (1 - z * z).unsqueeze(1)  # tanh' = 1 − tanh²
        return z, v


class PlanarCNFNet(nn.Module):
    """The planar CNF of Chen et al. (2018, §4.1): f(z, t) = Σₘ uₘ(t) tanh(wₘ(t)ᵀz + bₘ(t)), the continuous
    counterpart of a planar flow with ``width`` layers. The paper generates uₘ, wₘ, bₘ with a hypernetwork of
    t; here each is affine in t (θ(t) = θ₀ + t θ₁), which keeps the parameter count at 2·(2D + 1)·width, the
    same order as a planar flow's (2D + 1)·K. Carries its own Jacobian–vector products like the built-in MLP."""

    def __init__(self, dim: int, width: int) -> None:
        super().__init__()
        self.dim, self.width = dim, width
        # rows: [w (D) | b (1) | u (D)] per unit, at t = 0 and its slope in t
        self.theta0 = nn.Parameter(torch.empty(width, 2 * dim + 1))
        self.theta1 = nn.Parameter(torch.zeros(width, 2 * dim + 1))
        with torch.no_grad():
            self.theta0[:, :dim].normal_(0.0, 1.0 / math.sqrt(dim))
            self.theta0[:, dim].uniform_(-1.0, 1.0)
            self.theta0[:, dim + 1 :].normal_(0.0, 0.1 / math.sqrt(width))

    def _params(self, t, z: torch.Tensor):
        tt = torch.as_tensor(t, dtype=z.dtype, device=z.device)
        theta = self.theta0 + tt * self.theta1
        d = self.dim
        return theta[:, :d], theta[:, d], theta[:, d + 1 :]  # W (M, D), b (M,), U (M, D)

    def forward(self, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """``dz/dt = Σₘ uₘ(t) tanh(wₘ(t)ᵀz + bₘ(t))``.

        Arguments:
            t: the time, a number or a 0-d tensor.
            z: ``(batch, dim)``.

        Returns:
            ``(batch, dim)`` in ``z``'s dtype.
        """
        w, b, u = self._params(t, z)
        return torch.tanh(torch.addmm(b, z, w.t())) @ u

    def forward_tangents(self, t: torch.Tensor, z: torch.Tensor, v: torch.Tensor):
        """f(t, z) (batch, D) and (∂f/∂z) vₖ (batch, k, D) for ``v`` (batch, k, D), in one pass."""
        w, b, u = self._params(t, z)
        h = torch.tanh(torch.addmm(b, z, w.t()))
        return h @ u, (torch.matmul(v, w.t()) * (1 - h * h).unsqueeze(1)) @ u


def _jacobian_rows(f: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """All rows of ∂f/∂z per sample, ``(D, batch, D)``: D vector–Jacobian products evaluated together."""
    d = z.shape[1]
    basis = torch.eye(d, dtype=z.dtype, device=z.device)[:, None, :].expand(d, *z.shape)
    (rows,) = torch.autograd.grad(f, z, basis, create_graph=create_graph, retain_graph=True, is_grads_batched=True)
    return rows


def exact_trace(f: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """tr(∂f/∂z) per sample for ``f, z`` of shape (batch, D): D vector–Jacobian products evaluated together."""
    return _jacobian_rows(f, z, create_graph).diagonal(dim1=0, dim2=2).sum(-1)  # rows[k, b, k] summed over k


def hutchinson_trace(f: torch.Tensor, z: torch.Tensor, eps: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """εᵀ (∂f/∂z) ε per sample: an unbiased estimate of the trace when E[ε εᵀ] = I."""
    (vjp,) = torch.autograd.grad(f, z, eps, create_graph=create_graph, retain_graph=True)
    return (vjp * eps).reshape(z.shape[0], -1).sum(1)


class CNFField(nn.Module):
    """Dynamics on ``(z, log p)``: ``(f(t, z), −tr ∂f/∂z)``."""

    def __init__(self, net: nn.Module, trace: str = "exact", noise: str = "rademacher") -> None:
        super().__init__()
        if trace not in ("exact", "hutchinson"):
            raise ValueError(f"trace={trace!r} must be 'exact' or 'hutchinson'")
        if noise not in ("rademacher", "gaussian"):
            raise ValueError(f"noise={noise!r} must be 'rademacher' or 'gaussian'")
        self.net, self.trace, self.noise = net, trace, noise
        self.eps: torch.Tensor | None = None

    def sample_noise(self, z: torch.Tensor) -> None:
        if self.noise == "gaussian":
            self.eps = torch.randn_like(z)
        else:
            self.eps = torch.randint(0, 2, z.shape, device=z.device).to(z.dtype) * 2 - 1

    def forward(self, t: torch.Tensor, state):
        z = state[0]
        regularize = len(state) > 2  # (z, log p, [∫‖f‖², ∫‖∂f/∂z‖_F²])
        if hasattr(self.net, "forward_tangents") and z.dim() == 2:
            return self._forward_mode(t, z, regularize)
        keep = torch.is_grad_enabled()
        with torch.enable_grad():
            z_ = z if z.requires_grad else z.detach().requires_grad_(True)
            f = self.net(t, z_)
            if self.trace == "exact":
                rows = _jacobian_rows(f, z_, create_graph=keep)
                tr = rows.diagonal(dim1=0, dim2=2).sum(-1)
                frob = rows.pow(2).sum((0, 2)) if regularize else None
            else:
                if self.eps is None or self.eps.shape != z.shape:
                    self.sample_noise(z)
                (vjp,) = torch.autograd.grad(f, z_, self.eps, create_graph=keep, retain_graph=True)
                tr = (vjp * self.eps).reshape(z.shape[0], -1).sum(1)
                frob = vjp.pow(2).reshape(z.shape[0], -1).sum(1) if regularize else None
        if not regularize:
            return f, -tr
        kinetic = f.pow(2).reshape(z.shape[0], -1).sum(1)
        return f, -tr, torch.stack([kinetic, frob], 1)

    def _forward_mode(self, t, z: torch.Tensor, regularize: bool):
        """For nets that carry their own Jacobian–vector products (the built-in MLP): the exact trace from the
        D columns (∂f/∂z) eᵢ, or Hutchinson's εᵀ(∂f/∂z)ε from one product; ‖(∂f/∂z)ε‖² (unbiased for the
        squared Frobenius norm) or the full sum of squares for the regulariser."""
        b, d = z.shape
        if self.trace == "exact":
            v = torch.eye(d, dtype=z.dtype, device=z.device).expand(b, d, d)
        else:
            if self.eps is None or self.eps.shape != z.shape:
                self.sample_noise(z)
            v = self.eps.unsqueeze(1)
        f, jv = self.net.forward_tangents(t, z, v)
        if self.trace == "exact":
            tr = jv.diagonal(dim1=1, dim2=2).sum(-1)  # jv[b, i, j] = ∂f_j/∂z_i
        else:
            tr = (jv[:, 0] * self.eps).sum(1)
        if not regularize:
            return f, -tr
        frob = jv.pow(2).sum((1, 2))
        return f, -tr, torch.stack([f.pow(2).sum(1), frob], 1)


def _flow_rms(e) -> torch.Tensor:
    """RMS over (z, log p) of an error tuple: regulariser integrals do not steer the step size."""
    n = e[0].numel() + e[1].numel()
    return torch.sqrt((e[0].pow(2).sum() + e[1].pow(2).sum()) / n)


class CNF(nn.Module):
    """A continuous normalizing flow on R^D with a standard normal base at t = 0 and data at t = T.

    Arguments:
        dim: D. ``net``: the dynamics ``net(t, z)`` (default: concat-squash MLP, ``hidden`` × ``layers``).
        trace: ``"exact"`` or ``"hutchinson"`` (``noise``: ``"rademacher"`` or ``"gaussian"``).
        T, method, rtol, atol, gradient: the solve (``gradient``: "backprop", "adjoint" or "checkpoint", or a
            ``neuralode.Backprop``/``Adjoint``/``Checkpoint`` object).
        regularization: ``{"kinetic": λ_K, "jacobian": λ_J}`` (RNODE); ``reg_loss`` then holds the penalty
            after each training solve, to be added to the loss.

    Raises:
        ValueError: an unknown ``regularization`` key.

    Example:
        >>> flow = CNF(2, hidden=16, layers=2)
        >>> x = torch.randn(8, 2)
        >>> flow.log_prob(x).shape, flow.sample(5).shape
        (torch.Size([8]), torch.Size([5, 2]))
    """

    def __init__(
        self,
        dim: int,
        hidden: int = 64,
        layers: int = 3,
        *,
        net: nn.Module | None = None,
        trace: str = "exact",
        noise: str = "rademacher",
        T: float = 1.0,
        method: str = "dopri5",
        rtol: float = 1e-5,
        atol: float = 1e-5,
        gradient: str | GradientMode = "adjoint",
        regularization: dict | None = None,
    ) -> None:
        super().__init__()
        reg = dict(regularization or {})
        unknown = set(reg) - {"kinetic", "jacobian"}
        if unknown:
            raise ValueError(f"regularization keys must be 'kinetic' and/or 'jacobian', got {sorted(unknown)}")
        self.reg_weights = (float(reg.get("kinetic", 0.0)), float(reg.get("jacobian", 0.0)))
        self.reg_loss: torch.Tensor | None = None
        self.dim = dim
        self.field = CNFField(net if net is not None else _MLP(dim, hidden, layers), trace, noise)
        self.T, self.method, self.rtol, self.atol, self.gradient = T, method, rtol, atol, gradient
        self.stats = None

    def base_log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Log-density of the standard normal base N(0, I) on R^D.

        Arguments:
            z: ``(batch, D)``.

        Returns:
            ``(batch,)`` in ``z``'s dtype.
        """
        return -0.5 * (z**2).sum(1) - 0.5 * self.dim * math.log(2 * math.pi)

    def _flow(self, z: torch.Tensor, t0: float, t1: float, ts=None):
        self.field.sample_noise(z)
        logp = z.new_zeros(z.shape[0])
        t = torch.tensor([t0, t1] if ts is None else ts, dtype=z.dtype, device=z.device)
        params = [p for p in self.field.parameters() if p.requires_grad]
        regularize = any(self.reg_weights) and self.training and torch.is_grad_enabled()
        state = (z, logp, z.new_zeros(z.shape[0], 2)) if regularize else (z, logp)
        sol = solve(
            self.field,
            state,
            t,
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            gradient=self.gradient,
            params=None if getattr(self.gradient, "params", None) is not None else params,
            dense=False,
            options={"norm": _flow_rms} if regularize else None,
        )
        self.stats = sol.stats
        self.reg_loss = None
        if regularize:
            integrals = sol.ys[2][-1].abs().mean(0)  # |·|: the integral runs backwards when t1 < t0
            w = torch.tensor(self.reg_weights, dtype=z.dtype, device=z.device)
            self.reg_loss = (w * integrals).sum()
            return sol.ys[0], sol.ys[1]
        return sol.ys

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) per sample: flow x back to the base (T → 0) carrying ∫ tr(∂f/∂z) dt."""
        zs, dlogp = self._flow(x, self.T, 0.0)
        # d(Δ)/dt = −tr, Δ(T) = 0  ⇒  Δ(0) = ∫_0^T tr dt, and log p(x) = log p0(z(0)) − ∫_0^T tr dt
        return self.base_log_prob(zs[-1]) - dlogp[-1]

    def inverse(self, x: torch.Tensor) -> torch.Tensor:
        """z(0) for data x (no trace needed, but computed: one code path)."""
        return self._flow(x, self.T, 0.0)[0][-1]

    def forward_transport(self, z: torch.Tensor, ts=None) -> torch.Tensor:
        """Push base samples forward: z(T), or the states at ``ts`` (from 0 to T) as ``(len(ts), n, D)``."""
        zs, _ = self._flow(z, 0.0, self.T, ts)
        return zs if ts is not None else zs[-1]

    def sample_with_log_prob(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples x = z(T) and log q(x), in one forward solve (density matching trains on both)."""
        p = next(self.parameters())
        z0 = torch.randn(n, self.dim, dtype=p.dtype, device=p.device)
        zs, dlogp = self._flow(z0, 0.0, self.T)
        # d(Δ)/dt = −tr with Δ(0) = 0: log q(z(T)) = log p0(z0) + Δ(T)
        return zs[-1], self.base_log_prob(z0) + dlogp[-1]

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Draw ``n`` samples: base samples pushed from t = 0 to T.

        Arguments:
            n: number of samples.
            generator: the random generator of the base samples (default: torch's global one).

        Returns:
            ``(n, D)`` in the parameters' dtype and on their device.
        """
        p = next(self.parameters())
        z = torch.randn(n, self.dim, generator=generator, dtype=p.dtype).to(p.device)
        return self.forward_transport(z)
