"""The ODE block: h(t1) = h(t0) + ∫ f(h, t) dt, a drop-in replacement for a stack of residual blocks."""

from __future__ import annotations

import dataclasses
from typing import Sequence

import torch
from torch import nn

from .._api import solve
from .._methods import get_method
from .._problem import check_method
from ..gradients.common import SolveStats
from ..gradients.modes import Backprop, GradientMode, resolve_gradient
from .regularizers import RegularizedField

__all__ = ["ODEBlock"]


def _state_rms(e) -> torch.Tensor:
    """RMS of the state's part of a (state, accumulators) error tuple."""
    x = e[0]
    return torch.linalg.vector_norm(x) / x.numel() ** 0.5


class ODEBlock(nn.Module):
    """Integrate ``func`` from ``t[0]`` to ``t[-1]`` and return the final state.

    Arguments:
        func: the dynamics, ``func(t, h) -> dh/dt`` (an ``nn.Module``: its parameters are trained).
        t: the integration times (default ``[0, 1]``); with more than two, ``return_all=True`` returns the
            state at each.
        method, rtol, atol, options: the solver (the paper's ODE-Net used dopri5 at rtol = atol = 1e-3).
        gradient: ``"adjoint"`` (constant memory, the paper's choice), ``"backprop"`` or ``"checkpoint"``; or
            a gradient-mode object, e.g. ``neuralode.Adjoint(rtol=1e-4, seminorm=True)`` (its ``params``
            default to ``func``'s parameters).
        adjoint_options: options of the adjoint's backward solve (e.g. ``{"norm": "seminorm"}``).
        regularization: ``{"kinetic": w, "jacobian": w}``: accumulate the kinetic energy and/or the Jacobian
            Frobenius norm (Hutchinson) inside the solve during training; ``reg_loss`` is their weighted sum
            (mean over the batch), to be added to the training loss.
        compile: fuse each step with ``torch.compile`` (``solve(compile=...)``): inference, backprop training
            and both solves of the adjoint (its backward one eagerly on CPU for an expensive func).
        augment_dim: extra zero features (or channels) appended along dimension 1 before solving (augmented
            neural ODEs, Dupont et al. 2019), so that the flow can realise maps a plain ODE cannot.
        per_sample: adaptive methods: every sample takes its own steps (``solve(per_sample=True)``; backprop
            or adjoint gradients), so that a hard input does not force small steps on the batch; ``func``
            receives one time per sample (the ``Concat*`` layers accept that).
        return_all: return the state at every time of ``t`` (shape ``(len(t), *h.shape)``) instead of the
            last one only.

    After a forward pass ``nfe_forward`` holds its function evaluations; after the backward pass
    ``nfe_backward`` holds the backward pass's.

    Raises:
        ValueError: an unknown ``method``, ``gradient`` or ``regularization`` key, a negative
            ``augment_dim``, ``regularization`` combined with ``per_sample=True``, or ``adjoint_options``
            together with a gradient-mode object that sets them or is not the adjoint.
        TypeError: ``gradient`` is neither one of the strings nor a gradient-mode object.

    Example:
        >>> from neuralode.nn import MLPODEFunc
        >>> block = ODEBlock(MLPODEFunc(4, 32))
        >>> out = block(torch.randn(8, 4))
        >>> out.shape, block.nfe_forward > 0
        (torch.Size([8, 4]), True)
    """

    def __init__(
        self,
        func: nn.Module,
        t: Sequence[float] | torch.Tensor = (0.0, 1.0),
        *,
        method: str = "dopri5",
        rtol: float = 1e-3,
        atol: float = 1e-3,
        options: dict | None = None,
        gradient: str | GradientMode = "adjoint",
        adjoint_options: dict | None = None,
        return_all: bool = False,
        augment_dim: int = 0,
        regularization: dict | None = None,
        compile: bool | str = False,
        per_sample: bool = False,
    ) -> None:
        super().__init__()
        check_method(method)  # (when the block is built, not at its first forward pass)
        resolve_gradient(gradient, adjoint_options=adjoint_options)  # (checked when the block is built)
        #: fuse each solver step with torch.compile where supported (see ``solve(compile=...)``)
        self.compile = compile
        reg = dict(regularization or {})
        unknown = set(reg) - {"kinetic", "jacobian"}
        if unknown:
            raise ValueError(f"regularization keys {sorted(unknown)} are not known; use 'kinetic' and/or 'jacobian'")
        #: weights of the regularisers (``nn.regularizers``); ``reg_loss`` holds their weighted value after a
        #: training forward pass
        self.regularization = reg
        self.reg_field = RegularizedField(func, kinetic="kinetic" in reg, jacobian="jacobian" in reg) if reg else None
        if reg and per_sample:
            raise ValueError("regularization does not combine with per_sample=True (tuple states); use one of them")
        self.per_sample = per_sample
        self.reg_loss: torch.Tensor | None = None
        if augment_dim < 0:
            raise ValueError(f"augment_dim={augment_dim} must be 0 or positive")
        #: augmented neural ODE (Dupont et al. 2019): zeros appended along dimension 1 before the solve; the
        #: output keeps them (func must map the augmented shape to itself)
        self.augment_dim = augment_dim
        self.func = func
        # (the times in the dtype given: a float64 tensor keeps float64 times; numbers take the default dtype)
        t = torch.as_tensor(t)
        t = t if t.is_floating_point() else t.to(torch.get_default_dtype())
        self.register_buffer("t", t.detach().clone(), persistent=False)
        self.method, self.rtol, self.atol = method, rtol, atol
        self.options = dict(options or {})
        #: the gradient mode: a string, or a ``neuralode.Backprop``/``Adjoint``/``Checkpoint`` object
        self.gradient = gradient
        self.adjoint_options = adjoint_options
        self.return_all = return_all
        self.stats: SolveStats | None = None
        self.sample_stats: dict | None = None

    @property
    def nfe_forward(self) -> int:
        """Evaluations of ``func`` in the last forward pass (0 before the first)."""
        return 0 if self.stats is None else self.stats.nfe

    @property
    def nfe_backward(self) -> int:
        """Evaluations of ``func`` (each with a vector–Jacobian product) in the last backward pass (0 before)."""
        return 0 if self.stats is None else self.stats.nfe_backward

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Solve from ``h`` at ``t[0]`` to ``t[-1]``.

        Arguments:
            h: the input, ``(batch, ...)``: features ``(batch, dim)`` or images ``(batch, channels, H, W)``, a
                floating dtype (the solve runs in it; the times are cast to it).

        Returns:
            the state at ``t[-1]``, shaped like ``h`` (with ``augment_dim`` more entries along dimension 1);
            with ``return_all=True`` the states at every time of ``t``, ``(len(t), *shape)``. Sets
            ``stats``, ``sample_stats`` (``per_sample=True``) and, when regularising in training, ``reg_loss``.

        Raises:
            SolverError: the solve failed (e.g. :class:`~neuralode.MaxStepsError`).
        """
        if self.augment_dim:
            pad = h.new_zeros(h.shape[0], self.augment_dim, *h.shape[2:])
            h = torch.cat([h, pad], 1)
        params = [p for p in self.func.parameters() if p.requires_grad]
        self.reg_loss = None
        if self.reg_field is not None and self.training and torch.is_grad_enabled():
            return self._regularized(h, params)
        sol = solve(
            self.func,
            h,
            self.t.to(h.dtype),
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            options=self.options,
            gradient=self._mode(params),
            dense=False,
            compile=self.compile,
            per_sample=self.per_sample,
        )
        self.stats = sol.stats
        #: per-sample steps, rejections and evaluations of the last forward pass (``per_sample=True``)
        self.sample_stats = getattr(sol, "sample_stats", None)
        return sol.ys if self.return_all else sol.ys[-1]

    def _regularized(self, h: torch.Tensor, params: list) -> torch.Tensor:
        field = self.reg_field
        field.sample_noise(h)
        acc0 = h.new_zeros(h.shape[0], 2)
        options = dict(self.options)
        if "norm" not in options and get_method(self.method).adaptive:
            # error control on the state only: the accumulated integrals follow it and would otherwise force
            # many more steps
            options["norm"] = _state_rms
        sol = solve(
            field,
            (h, acc0),
            self.t.to(h.dtype),
            method=self.method,
            rtol=self.rtol,
            atol=self.atol,
            options=options,
            gradient=self._mode(params),
            dense=False,
        )
        self.stats = sol.stats
        hs, accs = sol.ys
        acc = accs[-1]
        self.reg_loss = (
            self.regularization.get("kinetic", 0.0) * acc[:, 0].mean()
            + self.regularization.get("jacobian", 0.0) * acc[:, 1].mean()
        )
        return hs if self.return_all else hs[-1]

    def _mode(self, params: list) -> GradientMode:
        """The gradient mode of a solve, differentiating ``params`` unless the mode names its own."""
        mode = resolve_gradient(self.gradient, adjoint_options=self.adjoint_options)
        if not isinstance(mode, Backprop) and mode.params is None:
            mode = dataclasses.replace(mode, params=params)
        return mode

    def extra_repr(self) -> str:
        """The settings shown by ``print(block)``: times, method, tolerances, gradient mode."""
        return (
            f"t={self.t.tolist()}, method={self.method!r}, rtol={self.rtol}, atol={self.atol}, "
            f"gradient={self.gradient!r}" + (", per_sample=True" if self.per_sample else "")
        )
