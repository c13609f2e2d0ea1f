"""Exact gradients of a reversible solve in memory that does not grow with the steps (``gradient="reversible"``).

The forward pass keeps no graph and no intermediate state: only the scheme's final state and the grid of
accepted steps (two numbers per step). The backward pass walks the steps from the last, undoes each one
(``scheme.back``) to get its start state, rebuilds that one step's graph and backpropagates the running
adjoint of the scheme's whole state through it; at the end it pulls the adjoint through the scheme's start
(``scheme.init``). This is the backward pass of Kidger, Foster, Li & Lyons (2021, Algorithm 2 of
arXiv:2105.13493) for reversible Heun, and of McCallum & Foster (2024, arXiv:2410.11648) for the coupled
Runge–Kutta scheme. The result is the gradient of the discrete solve (backprop's) up to the round-off of
undoing the steps; the step sizes are constants, as in backprop.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._amp import full_precision
from .._problem import Problem, run
from .common import SolveRecord, direct_gradients, first_order_only, vjp

__all__ = ["reversible_solve"]


class _ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, record: SolveRecord, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        rhs = prob.rhs()
        with torch.no_grad():
            res = run(prob, rhs, y0=y0.detach(), keep_segments=record.dense, use_event=False)
        record.result, record.nfe = res, rhs.nfe
        state = res.final_state
        record.stats.checkpoint_bytes += sum(s.numel() * s.element_size() for s in state) + 16 * len(res.grid)
        ctx.prob, ctx.stats, ctx.scheme = prob, record.stats, res.method
        ctx.state, ctx.grid, ctx.out_steps, ctx.t0 = state, res.grid, res.out_steps, float(prob.t_out[0])
        ctx.save_for_backward(y0, *params)
        return res.ys

    @staticmethod
    @full_precision
    def backward(ctx, grad_ys: torch.Tensor):
        first_order_only("reversible")
        y0, *params = ctx.saved_tensors
        params: Sequence[torch.Tensor]
        needs = [p.requires_grad for p in params]
        wrt = [p for p, r in zip(params, needs) if r]
        scheme, grid, rhs = ctx.scheme, ctx.grid, ctx.prob.rhs()
        out_at = {n: k + 1 for k, n in enumerate(ctx.out_steps) if k + 1 < grad_ys.shape[0]}
        state = ctx.state
        adj = [torch.zeros_like(s) for s in state]
        p_grads = [torch.zeros_like(p) for p in wrt]

        def pull(fn, inputs: list) -> list:
            """Backpropagate ``adj`` through ``fn(*inputs)`` (a tuple like the state); the inputs' adjoints."""
            with torch.enable_grad():
                xs = [x.detach().requires_grad_(True) for x in inputs]
                got = vjp(list(fn(*xs)), xs + wrt, adj)
            for j, g in enumerate(got[len(xs) :]):
                if g is not None:
                    p_grads[j] += g
            return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, got[: len(xs)])]

        for i in reversed(range(len(grid))):
            k = out_at.get(i + 1)
            if k is not None:
                adj[0] = adj[0] + grad_ys[k]
            t, h = grid[i]
            with torch.no_grad():
                state = scheme.back(rhs, t + h, h, state)
            adj = pull(lambda *s, t=t, h=h: scheme.step(rhs, t, h, tuple(s))[0], list(state))
        _check_reversal(state[0], y0, ctx.prob.rtol, ctx.prob.atol, ctx.prob.method)
        adj = pull(lambda y: scheme.init(rhs, ctx.t0, y), [y0])
        a0 = adj[0] + grad_ys[0]
        ctx.stats.nfe_backward += rhs.nfe
        it = iter(p_grads)
        out_params = direct_gradients(params, [next(it) if r else None for r in needs])
        return (None, None, a0, *out_params)


def _check_reversal(y_back: torch.Tensor, y0: torch.Tensor, rtol, atol, method: str) -> None:
    """Warn where undoing the steps did not come back to y0 to within the solve's tolerance: round-off grows
    in the reversal (a contracting flow undone, or a scheme outside its stability region), and the gradients
    computed along the rebuilt states are then off too."""
    import warnings

    with torch.no_grad():
        rt = float(torch.as_tensor(rtol).max())
        scale = y0.detach().abs() + torch.as_tensor(atol, dtype=y0.dtype, device=y0.device) / rt
        rel = float(((y_back - y0.detach()) / scale).square().mean().sqrt())
    if not rel <= rt:  # (NaN included)
        warnings.warn(
            f"gradient='reversible': undoing the steps of {method!r} came back to y0 only to {rel:.3g} (relative; "
            f"rtol is {rt:.3g}): the reversal amplifies round-off here (dissipative or stiff dynamics, or steps "
            "outside the scheme's stability region), and the gradients may be off as much. Use "
            "gradient='checkpoint' with checkpoints=N for an exact gradient in bounded memory",
            RuntimeWarning,
            stacklevel=3,
        )


def reversible_solve(
    prob: Problem, y0: torch.Tensor, params: Sequence[torch.Tensor], record: SolveRecord
) -> torch.Tensor:
    """Solve ``prob`` (a reversible method) with gradients by reversing its steps; the forward leaves its result
    and evaluations in ``record``, the backward adds its cost to ``record.stats``."""
    return _ReversibleSolve.apply(prob, record, y0, *params)
