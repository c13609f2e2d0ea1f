"""Exact gradients of the per-sample solve in bounded memory (``solve(..., per_sample=True,
gradient="checkpoint")``).

The forward pass is the per-sample loop without a graph; it keeps, per attempt, each sample's start time, step,
start value and whether it accepted. The backward pass walks the attempts in reverse, rebuilds one attempt's
graph at a time from its saved start values (``per_sample.Replay``) and backpropagates the running
adjoint (one row per sample) and the gradients of the outputs that attempt wrote through it. Step sizes and
accept/reject decisions are constants, as in plain backprop through the loop, so the result is backprop's to
rounding, with the memory of one attempt's graph plus one state per attempt instead of every attempt's graph.

Cost: the forward solve's evaluations again, plus one per attempt (the first stage, which the forward loop
carried over from the step before). Attempts where no sample accepted leave the state unchanged and write no
output; they are skipped. With ``compile=True`` the forward runs in the compiled per-sample loop
(``device_loop``, which records the same trace) and each replayed attempt's stages are one compiled function
whose backward autograd runs compiled too.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from .._amp import full_precision
from ..solvers.per_sample import Replay
from .budget import BudgetTrace, reverse_steps
from .common import SolveRecord, direct_gradients, recomputed_backward, vjp

__all__ = ["per_sample_checkpoint_solve"]


class _PerSampleCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        func: Callable,
        forward: Callable,
        method,
        t_out: list,
        backend: str | None,
        record: SolveRecord,
        y0: torch.Tensor,
        *params: torch.Tensor,
    ) -> torch.Tensor:
        trace = BudgetTrace(record.checkpoints)
        with torch.no_grad():
            res, sample_stats = forward(y0.detach(), trace)
        record.result, record.sample_stats = res, sample_stats
        record.stats.checkpoint_bytes += trace.peak_bytes + trace.grid_bytes()
        ctx.func, ctx.method, ctx.t_out, ctx.backend, ctx.stats = func, method, t_out, backend, record.stats
        ctx.trace, ctx.shape = trace, y0.shape
        ctx.m = res.ys.shape[0]
        ctx.forward = forward
        ctx.save_for_backward(y0, *params)
        return res.ys.view(-1, *y0.shape)

    @staticmethod
    @full_precision
    def backward(ctx, grad_ys: torch.Tensor):
        trace, shape = ctx.trace, ctx.shape
        y_start, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # (create_graph=True: a derivative of the gradient)
            g0, gp = recomputed_backward(
                lambda y0: ctx.forward(y0, None)[0].ys.view(-1, *shape)[: ctx.m], y_start, params, grad_ys
            )
            return (None, None, None, None, None, None, g0, *gp)
        wrt = [p for p in params if p.requires_grad]
        B = shape[0]
        g = grad_ys.reshape(grad_ys.shape[0], B, -1)
        m = g.shape[0]
        func, method, t_out = ctx.func, ctx.method, ctx.t_out
        if not trace:
            replay = None
        elif callable(method) and not hasattr(method, "tableau"):  # a factory of the replay (method="auto")
            replay = method(func, shape, t_out, trace)
        else:
            replay = Replay(func, shape, method, t_out, trace, backend=ctx.backend)
        a = torch.zeros_like(g[0])
        p_grads = [torch.zeros_like(p) for p in wrt]
        rows = torch.arange(B, device=g.device)[:, None]
        moved = torch.stack([r[3].any() for r in trace]).tolist() if trace else []

        def advance(i: int, y: torch.Tensor) -> torch.Tensor:
            if not moved[i]:
                return y
            with torch.no_grad():
                return replay(i, y)[0]

        def pull(i: int, y_start: torch.Tensor) -> None:
            nonlocal a
            if not moved[i]:
                return  # (no sample accepted: the state does not move, no output is written, the adjoint passes)
            with torch.enable_grad():
                y = y_start.detach().requires_grad_(True)
                y_next, values, ks, valid = replay(i, y)
                targets, grads = [y_next], [a]
                if values is not None:
                    written = g[ks.clamp(max=m - 1), rows.expand_as(ks)]  # (B, M, d)
                    targets.append(values)
                    keep = valid & (ks < m)  # (a failed solve returns the outputs every sample reached)
                    grads.append(torch.where(keep[..., None], written, torch.zeros_like(written)))
                got = vjp(targets, [y, *wrt], grads)
            a = got[0]
            for j, gp in enumerate(got[1:]):
                if gp is not None:
                    p_grads[j] += gp

        if trace:
            reverse_steps(len(trace), trace.states(), trace.budget or len(trace), advance, pull)
        a = a + g[0]  # (the first output is y0 itself)
        ctx.stats.nfe_backward += replay.calls if replay is not None else 0
        it = iter(p_grads)
        p_out = direct_gradients(params, [next(it) if p.requires_grad else None for p in params])
        return (None, None, None, None, None, None, a.view(shape), *p_out)


def per_sample_checkpoint_solve(
    func: Callable,
    forward: Callable,
    y0: torch.Tensor,
    params: Sequence[torch.Tensor],
    record: SolveRecord,
    *,
    method,
    t_out: list,
    backend: str | None = None,
) -> torch.Tensor:
    """``ys (m, batch, ...)`` from ``forward(y0, trace) -> (result, per-sample statistics)`` (the per-sample loop
    without a graph, filling ``trace``), differentiated by replaying its attempts with ``method`` (a
    ``RungeKutta``, or ``method(func, shape, t_out, trace)`` making the replay) at the output times ``t_out``
    (compiled with ``backend``, where given). The forward's result
    and statistics are left in ``record.result`` and ``record.sample_stats``; the backward adds its cost to
    ``record.stats``."""
    return _PerSampleCheckpoint.apply(func, forward, method, t_out, backend, record, y0, *params)
