"""Exact gradients of a reversible solve in memory that does not grow with the steps (``gradient="reversible"``).

The forward pass keeps no graph and no intermediate state: only the scheme's final state and, per attempt, the
start times, steps and which rows moved (a few numbers per row). The backward pass walks the attempts from the
last, undoes each one (``scheme.back``) to get its start state, rebuilds that one step's graph and
backpropagates the running adjoint of the scheme's whole state through it; at the end it pulls the adjoint
through the scheme's start (``scheme.init``). This is the backward pass of Kidger, Foster, Li & Lyons (2021,
Algorithm 2 of arXiv:2105.13493) for reversible Heun, and of McCallum & Foster (2024, arXiv:2410.11648) for
the coupled Runge–Kutta scheme. The result is the gradient of the discrete solve (backprop's) up to the
round-off of undoing the steps; step sizes and accept/reject decisions are constants, as in backprop. Joint
and per-sample solves share it: a joint solve is one row.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._amp import full_precision
from .common import SolveRecord, direct_gradients, recomputed_backward, vjp

__all__ = ["reversible_solve"]


class _ReversibleSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, forward: Callable, field: Callable, info: dict, record: SolveRecord, y0, *params):
        run = forward(y0.detach())
        state = run.final_state
        kept = sum(s.numel() * s.element_size() for s in state)
        record.stats.checkpoint_bytes += kept + run.records.nbytes()
        ctx.field, ctx.info, ctx.stats = field, info, record.stats
        ctx.state, ctx.records, ctx.scheme, ctx.forward = state, run.records, run.scheme, forward
        ctx.save_for_backward(y0, *params)
        return run.ys

    @staticmethod
    @full_precision
    def backward(ctx, grad_ys: torch.Tensor):
        y0, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # (create_graph=True: a derivative of the gradient)
            g0, gp = recomputed_backward(lambda y: ctx.forward(y).ys[: grad_ys.shape[0]], y0, params, grad_ys)
            return (None, None, None, None, g0, *gp)
        needs = [p.requires_grad for p in params]
        wrt = [p for p, r in zip(params, needs) if r]
        scheme, info = ctx.scheme, ctx.info
        F, evals = ctx.field()
        state = ctx.state
        adj = [torch.zeros_like(s) for s in state]
        p_grads = [torch.zeros_like(p) for p in wrt]
        m = grad_ys.shape[0]
        rows = torch.arange(y0.shape[0], device=y0.device)

        def pull(fn, inputs: list) -> list:
            """Backpropagate ``adj`` through ``fn(*inputs)`` (a tuple like the state); the inputs' adjoints."""
            with torch.enable_grad():
                xs = [x.detach().requires_grad_(True) for x in inputs]
                got = vjp(list(fn(*xs)), xs + wrt, adj)
            for j, g in enumerate(got[len(xs) :]):
                if g is not None:
                    p_grads[j] += g
            return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, got[: len(xs)])]

        def take(t, h, moved, s):
            new, _ = scheme.step(F, t, h, s)
            mv = moved[:, None]
            return tuple(torch.where(mv, a, b) for a, b in zip(new, s))

        for t, h, moved, wrote in reversed(ctx.records):
            out = (wrote >= 0) & (wrote < m)
            if bool(out.any()):
                g = torch.zeros_like(adj[0])
                g[out] = grad_ys[wrote[out], rows[out]]
                adj[0] = adj[0] + g
            with torch.no_grad():
                back = scheme.back(F, t, h, state)
                mv = moved[:, None]
                state = tuple(torch.where(mv, a, b) for a, b in zip(back, state))
            adj = pull(lambda *s, t=t, h=h, moved=moved: take(t, h, moved, s), list(state))
        _check_reversal(state[0], y0, info["rtol"], info["atol"], info["method"])
        adj = pull(lambda y: scheme.init(F, info["t0"], y), [y0])
        a0 = adj[0] + grad_ys[0]
        ctx.stats.nfe_backward += evals()
        it = iter(p_grads)
        out_params = direct_gradients(params, [next(it) if r else None for r in needs])
        return (None, None, None, None, a0, *out_params)


def _check_reversal(y_back: torch.Tensor, y0: torch.Tensor, rtol, atol, method: str) -> None:
    """Warn where undoing the steps did not come back to y0 to within the solve's tolerance: round-off grows
    in the reversal (a contracting flow undone, or a scheme outside its stability region), and the gradients
    computed along the rebuilt states are then off too. Each row (sample) is measured on its own."""
    import warnings

    with torch.no_grad():
        rt = float(torch.as_tensor(rtol).max())
        scale = y0.detach().abs() + torch.as_tensor(atol, dtype=y0.dtype, device=y0.device) / rt
        rel = ((y_back - y0.detach()) / scale).square().mean(1).sqrt()
        worst = float(torch.nan_to_num(rel, nan=float("inf")).max())
    if not worst <= rt:
        shown = "NaN or Inf" if worst == float("inf") else f"{worst:.3g}"
        warnings.warn(
            f"gradient='reversible': undoing the steps of {method!r} came back to y0 only to {shown} (relative; "
            f"rtol is {rt:.3g}): the reversal amplifies round-off here (dissipative or stiff dynamics, or steps "
            "outside the scheme's stability region), and the gradients may be off as much. Use "
            "gradient='checkpoint' with checkpoints=N for an exact gradient in bounded memory",
            RuntimeWarning,
            stacklevel=3,
        )


def reversible_solve(
    forward: Callable,
    field: Callable,
    y0: torch.Tensor,
    params: Sequence[torch.Tensor],
    record: SolveRecord,
    *,
    t0: torch.Tensor,
    rtol,
    atol,
    method: str,
) -> torch.Tensor:
    """``ys (m, batch, d)`` of ``forward(y0) -> ReversibleRun`` (the reversible loop without a graph, from
    ``y0`` (batch, d)), differentiated by undoing its steps. ``field() -> (F, evals)``: a fresh evaluation of
    the field with its own count, for the backward pass; ``t0`` (batch,) the start times."""
    info = dict(t0=t0, rtol=rtol, atol=atol, method=method)
    return _ReversibleSolve.apply(forward, field, info, record, y0, *params)
