"""Regularisers that make learned dynamics cheap to solve (Finlay et al., "How to train your neural ODE",
ICML 2020), accumulated inside the same solve as the state:

- kinetic energy  ∫ ‖f(h, t)‖² dt
- Jacobian Frobenius norm  ∫ ‖∂f/∂h‖²_F dt, by Hutchinson's estimator ‖εᵀ ∂f/∂h‖² with ε ~ N(0, I) drawn once
  per solve (one vector–Jacobian product per evaluation).

``RegularizedField`` turns ``func(t, h)`` into dynamics on the tuple ``(h, acc)`` with ``acc`` of shape
``(batch, 2)``: per sample, the running integrals of the two integrands. ``ODEBlock(regularization=...)``
uses it and exposes the weighted mean of the final integrals as ``reg_loss``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["RegularizedField"]


class RegularizedField(nn.Module):
    """Dynamics on ``(h, acc)``: ``func``'s and, per sample, the integrands of the two regularisers.

    Solving it from ``(h0, zeros(batch, 2))`` gives, besides ``h(t1)``, ``acc[:, 0] = ∫ ‖f‖² dt`` (kinetic
    energy) and ``acc[:, 1] = ∫ ‖εᵀ ∂f/∂h‖² dt`` (Hutchinson's estimate of the Jacobian's squared Frobenius
    norm). ``ODEBlock(regularization=...)`` builds one; use it directly to regularise your own solve.

    Arguments:
        func: the dynamics ``func(t, h) -> dh/dt``, ``h`` of shape ``(batch, ...)``.
        kinetic: accumulate the kinetic energy (else that column stays zero).
        jacobian: accumulate the Jacobian Frobenius norm (else that column stays zero).

    Example:
        >>> import neuralode
        >>> from neuralode.nn import MLPODEFunc
        >>> field = RegularizedField(MLPODEFunc(3, hidden=8))
        >>> h = torch.randn(4, 3); field.sample_noise(h)
        >>> hs, accs = neuralode.odeint(field, (h, torch.zeros(4, 2)), torch.tensor([0.0, 1.0]))
        >>> accs[-1].shape
        torch.Size([4, 2])
    """

    def __init__(self, func: nn.Module, kinetic: bool = True, jacobian: bool = True) -> None:
        super().__init__()
        self.func = func
        self.kinetic, self.jacobian = kinetic, jacobian
        self.eps: torch.Tensor | None = None  # Hutchinson's noise, fixed within a solve

    def sample_noise(self, h: torch.Tensor) -> None:
        """Draw Hutchinson's noise ``ε ~ N(0, I)`` shaped like ``h``, kept fixed for the next solve.

        Arguments:
            h: the state the next solve starts from, ``(batch, ...)``.
        """
        self.eps = torch.randn_like(h)

    def forward(self, t: torch.Tensor, state):
        """The derivative of ``(h, acc)``.

        Arguments:
            t: the time (0-d tensor).
            state: ``(h, acc)`` with ``h`` of shape ``(batch, ...)`` and ``acc`` of shape ``(batch, 2)``.

        Returns:
            ``(dh/dt, dacc/dt)``: ``func(t, h)`` and ``(batch, 2)`` holding ``‖f‖²`` and ``‖εᵀ ∂f/∂h‖²`` per
            sample (zeros for a regulariser that is off), in ``h``'s dtype.
        """
        h, _ = state
        zeros = h.new_zeros(h.shape[0])
        if self.jacobian:
            keep = torch.is_grad_enabled()  # on a training graph: the estimate must be differentiable too
            with torch.enable_grad():
                h_ = h if h.requires_grad else h.detach().requires_grad_(True)
                f = self.func(t, h_)
                eps = self.eps if self.eps is not None and self.eps.shape == h.shape else torch.randn_like(h)
                (vjp,) = torch.autograd.grad(f, h_, eps, create_graph=keep)
            jf = vjp.reshape(h.shape[0], -1).pow(2).sum(1)
        else:
            f = self.func(t, h)
            jf = zeros
        ke = f.reshape(h.shape[0], -1).pow(2).sum(1) if self.kinetic else zeros
        return f, torch.stack([ke, jf], 1)
