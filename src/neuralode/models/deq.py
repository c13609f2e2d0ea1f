"""Deep equilibrium models (Bai, Kolter & Koltun 2019): a layer whose output is the fixed point z* = f(z*, x).

The forward pass finds z* with a fixed-point solver and builds no graph through its iterations. The backward
pass uses the implicit function theorem: with J = ∂f/∂z at z*, the gradient reaching z* is the solution g of
g = dL/dz* + Jᵀ g, found by the same solver from vector–Jacobian products of one application of f. Memory
therefore does not depend on the number of iterations. Optional Jacobian regularisation (Bai, Koltun & Kolter
2021) adds the Hutchinson estimate of ‖J‖²_F / dim to the training loss, which keeps f contractive and the
solves short.
"""

from __future__ import annotations

import torch
from torch import nn

from ..solvers.fixed_point import FixedPointStats, fixed_point

__all__ = ["DEQBlock", "DEQConvCell"]


class DEQBlock(nn.Module):
    """Output z* with z* = func(z*, x), differentiated implicitly.

    Arguments:
        func: ``func(z, x) -> z`` (an ``nn.Module`` whose parameters are trained); z has the shape of x
            unless ``state_shape`` maps x's shape to z's.
        solver: ``"anderson"`` or ``"broyden"`` (both batched; see ``neuralode.solvers.fixed_point``).
        tol, max_iter: forward solve (relative residual per sample).
        backward_tol, backward_max_iter: the adjoint linear system's solve (default: the forward values).
        jac_reg: weight of the Jacobian regulariser; after a training forward pass ``extra_loss`` holds it.
        on_failure: ``"warn"`` (default), ``"raise"`` or ``"ignore"`` when a solve misses its tolerance.
        solver_options: passed to the solver (e.g. ``{"m": 6}`` for Anderson).

        state_shape: a function from x's shape to z's (default: z is shaped like x).

    After a forward pass ``stats`` holds the solve's iterations and residual and ``nfe_forward`` the number of
    evaluations of func; after backward, ``nfe_backward`` the number of vector–Jacobian products.

    Raises:
        ValueError: an unknown ``on_failure`` (an unknown ``solver`` at the first forward pass).

    Example:
        >>> class Cell(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.lin = torch.nn.Linear(4, 4)
        ...     def forward(self, z, x):
        ...         return torch.tanh(0.5 * self.lin(z) + x)
        >>> block = DEQBlock(Cell(), tol=1e-4)
        >>> z = block(torch.randn(3, 4))
        >>> z.shape, block.stats.converged
        (torch.Size([3, 4]), True)
    """

    def __init__(
        self,
        func: nn.Module,
        *,
        solver: str = "anderson",
        tol: float = 1e-3,
        max_iter: int = 30,
        backward_tol: float | None = None,
        backward_max_iter: int | None = None,
        jac_reg: float = 0.0,
        on_failure: str = "warn",
        solver_options: dict | None = None,
        state_shape=None,
    ) -> None:
        super().__init__()
        if on_failure not in ("warn", "raise", "ignore"):
            raise ValueError(f"on_failure={on_failure!r} must be 'warn', 'raise' or 'ignore'")
        self.func = func
        self.solver, self.tol, self.max_iter = solver, tol, max_iter
        self.backward_tol = tol if backward_tol is None else backward_tol
        self.backward_max_iter = max_iter if backward_max_iter is None else backward_max_iter
        self.jac_reg = jac_reg
        self.on_failure = on_failure
        self.solver_options = dict(solver_options or {})
        self.state_shape = state_shape
        self.stats: FixedPointStats | None = None
        self.backward_stats: FixedPointStats | None = None
        self.extra_loss: torch.Tensor | None = None

    @property
    def nfe_forward(self) -> int:
        """Evaluations of ``func`` in the last forward solve (0 before the first)."""
        return 0 if self.stats is None else self.stats.iterations

    @property
    def nfe_backward(self) -> int:
        """Vector–Jacobian products in the last backward solve (0 before it, or without gradients)."""
        return 0 if self.backward_stats is None else self.backward_stats.iterations

    def _solve(self, f, z0, tol, max_iter):
        return fixed_point(
            f, z0, solver=self.solver, tol=tol, max_iter=max_iter, on_failure=self.on_failure, **self.solver_options
        )

    def forward(self, x: torch.Tensor, z0: torch.Tensor | None = None) -> torch.Tensor:
        """Find ``z* = func(z*, x)``.

        Arguments:
            x: the input injected at every iteration, ``(batch, ...)``.
            z0: the starting iterate (default: zeros shaped like z).

        Returns:
            ``z*`` (``(batch, ...)``, x's dtype), differentiable with respect to ``x`` and ``func``'s
            parameters by the implicit function theorem. Sets ``stats`` (and ``extra_loss`` when
            ``jac_reg > 0`` in training).

        Raises:
            FixedPointError: the solve missed ``tol`` and ``on_failure="raise"``.
        """
        if z0 is None:
            shape = x.shape if self.state_shape is None else self.state_shape(x.shape)
            z0 = x.new_zeros(shape)
        self.backward_stats = None
        with torch.no_grad():
            z_star, self.stats = self._solve(lambda z: self.func(z, x), z0, self.tol, self.max_iter)
        self.extra_loss = None
        if not torch.is_grad_enabled():
            return z_star
        # one application of f at the fixed point carries the gradient to x and the parameters; the hook
        # replaces the incoming gradient by the solution of g = grad + Jᵀ g
        z = self.func(z_star, x)
        zr = z_star.detach().requires_grad_(True)
        with torch.enable_grad():
            fr = self.func(zr, x)
        if self.jac_reg > 0 and self.training:
            eps = torch.randn_like(fr)
            (vjp,) = torch.autograd.grad(fr, zr, eps, create_graph=True)
            self.extra_loss = self.jac_reg * vjp.pow(2).sum() / eps[0].numel() / eps.shape[0]
        if z.requires_grad:
            block = self

            def implicit_grad(grad: torch.Tensor) -> torch.Tensor:
                def adjoint_map(g: torch.Tensor) -> torch.Tensor:
                    (jt_g,) = torch.autograd.grad(fr, zr, g, retain_graph=True)
                    return jt_g + grad

                g, block.backward_stats = block._solve(adjoint_map, grad, block.backward_tol, block.backward_max_iter)
                return g

            z.register_hook(implicit_grad)
        return z

    def extra_repr(self) -> str:
        """The settings shown by ``print(block)``: solver, tolerance, iteration limit, regulariser weight."""
        return f"solver={self.solver!r}, tol={self.tol}, max_iter={self.max_iter}, jac_reg={self.jac_reg}"


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(min(32, c), c)


class DEQConvCell(nn.Module):
    """f(z, x) = GN(ReLU(x + conv(ReLU(GN(conv(z)))))) — a residual-style cell with input injection x.
    The second convolution starts small, so that f starts contractive in z (the GroupNorm after the first
    convolution makes the map insensitive to that convolution's scale)."""

    def __init__(self, channels: int = 64, init_std: float = 0.01) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.norm1 = _norm(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, 1, 1)
        self.norm2 = _norm(channels)
        nn.init.normal_(self.conv2.weight, std=init_std)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(torch.relu(self.norm1(self.conv1(z))))
        return self.norm2(torch.relu(x + out))
