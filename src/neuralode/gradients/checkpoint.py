"""Exact gradients of the discrete solve in bounded memory.

The forward pass runs without a graph and keeps, per accepted step, only its start state (and how its first
and last stages were evaluated). The backward pass walks the steps in reverse, rebuilds one step's graph
at a time from its saved start state, and backpropagates the running adjoint through it. Step sizes are
constants, as they are in plain backprop, so the result equals backprop's to rounding. With ``compile=True``
each rebuilt step is the forward's compiled step, whose backward autograd runs compiled too.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._amp import full_precision
from .._methods import get_method
from .._problem import Problem, run
from ..compiled.cache import backend_of
from ..solvers.auto import stepper_of
from ..solvers.runge_kutta import Segment
from .budget import BudgetTrace, reverse_steps
from .common import SolveRecord, direct_gradients, recomputed_backward, vjp

__all__ = ["checkpoint_solve"]


class _CheckpointSolve(torch.autograd.Function):
    @staticmethod
    def forward(ctx, prob: Problem, record: SolveRecord, y0: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        rhs = prob.rhs()
        trace = BudgetTrace(record.checkpoints)
        with torch.no_grad():
            res = run(prob, rhs, y0=y0.detach(), trace=trace, keep_segments=record.dense, use_event=False)
        record.result = res
        record.nfe = rhs.nfe
        record.stats.checkpoint_bytes += trace.peak_bytes + trace.grid_bytes()
        ctx.prob, ctx.stats, ctx.trace, ctx.method = prob, record.stats, trace, res.method
        ctx.m = res.ys.shape[0]
        ctx.save_for_backward(y0, *params)
        return res.ys

    @staticmethod
    @full_precision
    def backward(ctx, grad_ys: torch.Tensor):
        prob, trace, methods = ctx.prob, ctx.trace, ctx.method
        y_start, *params = ctx.saved_tensors
        if torch.is_grad_enabled():  # (create_graph=True: a derivative of the gradient)

            def again(y0: torch.Tensor) -> torch.Tensor:
                rhs_ = prob.rhs()
                ys = run(prob, rhs_, y0=y0, use_event=False).ys[: ctx.m]
                ctx.stats.nfe_backward += rhs_.nfe
                return ys

            g0, gp = recomputed_backward(again, y_start, params, grad_ys)
            return (None, None, g0, *gp)
        needs = [p.requires_grad for p in params]
        wrt_params = [p for p, r in zip(params, needs) if r]
        t_out = prob.t_out[: ctx.m]
        direction = 1.0 if t_out[-1] >= t_out[0] else -1.0
        rhs = prob.rhs()
        step = _compiled_replay(prob, rhs, methods)
        tt = lambda s: torch.scalar_tensor(s, dtype=rhs.dtype, device=rhs.device)  # noqa: E731
        steps = trace.records
        # the outputs each step reaches (after its start, up to its end)
        outs_of: list[list[int]] = [[] for _ in steps]
        j = ctx.m - 1
        for i in reversed(range(len(steps))):
            while j >= 1 and direction * (t_out[j] - steps[i][0]) > 0:
                outs_of[i].append(j)
                j -= 1

        def step_at(i: int, y: torch.Tensor, with_k: bool) -> tuple:
            """Step ``i`` from ``y``: its end value and, where ``with_k``, its stages for the output interpolant."""
            t0, t1, _, perturb_first, perturb_last = steps[i]
            method = stepper_of(methods, i)
            if step is not None and not (perturb_first or perturb_last):  # all stages in one compiled call
                y1, K, _ = step(tt(t0), tt(t1 - t0), y, rhs.at(t0, y), prob.atol / prob.rtol, 1.0 / prob.rtol)
                rhs.nfe += method.stages - 1
                if with_k and method.interp_needs_f1 and not method.fsal:
                    K = torch.cat([K, rhs.at(t1, y1)[None]])
                return y1, K
            buf = method.new_buffer()
            buf.set(0, rhs.at(t0, y, perturb=int(direction) if perturb_first else 0))
            y1, _ = method.step(rhs, t0, t1 - t0, y, buf, perturb_last=perturb_last)
            if with_k and method.interp_needs_f1 and not method.fsal:
                buf.set(method.f1_index, rhs.at(t1, y1))
            return y1, buf.K

        def advance(i: int, y: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return step_at(i, y, False)[0]

        a = torch.zeros_like(grad_ys[0])
        p_grads = [torch.zeros_like(p) for p in wrt_params]

        def pull(i: int, y_start: torch.Tensor) -> None:
            nonlocal a
            t0, t1 = steps[i][0], steps[i][1]
            outs = outs_of[i]
            inner = [k for k in outs if t_out[k] != t1]
            with torch.enable_grad():
                y = y_start.detach().requires_grad_(True)
                y1, K = step_at(i, y, bool(inner))
                targets, grads = [y1], [a]
                if inner:
                    targets.append(Segment(t0, t1, y, y1, K, stepper_of(methods, i))([t_out[k] for k in inner]))
                    grads.append(grad_ys[inner])
                for k in outs:
                    if t_out[k] == t1:
                        grads[0] = grads[0] + grad_ys[k]
                got = vjp(targets, [y] + wrt_params, grads)
            a = got[0]
            for n, g in enumerate(got[1:]):
                if g is not None:
                    p_grads[n] += g

        if steps:
            reverse_steps(len(steps), trace.states(), trace.budget or len(steps), advance, pull)
        a = a + grad_ys[0]
        ctx.stats.nfe_backward += rhs.nfe
        out_params, it = [], iter(p_grads)
        for r in needs:
            out_params.append(next(it) if r else None)
        return (None, None, a, *direct_gradients(params, out_params))


def _compiled_replay(prob: Problem, rhs, method):
    """With ``compile=True``, the compiled step of the forward solve (``compiled.step``), through which the
    backward rebuilds each step's graph (autograd then runs its compiled backward); None otherwise."""
    opts = prob.options
    if (
        not opts.get("compile")
        or not get_method(prob.method).compiles
        or get_method(prob.method).kind != "explicit"
        or rhs.buffer_shape is None
    ):
        return None
    if not (isinstance(prob.rtol, float) and isinstance(prob.atol, float)):
        return None
    from ..compiled.step import compiled_step

    backend = backend_of(opts["compile"])
    try:
        return compiled_step(rhs.func, method, rhs.buffer_shape, rhs.dtype, rhs.device, backend)
    except Exception:  # pragma: no cover - depends on the platform's compiler (the forward warned already)
        return None


def checkpoint_solve(
    prob: Problem, y0: torch.Tensor, params: Sequence[torch.Tensor], record: SolveRecord
) -> torch.Tensor:
    """Solve ``prob`` with checkpointed gradients. The forward leaves its result and evaluations in ``record``
    (keeping dense output where ``record.dense``); the backward adds its cost to ``record.stats``."""
    return _CheckpointSolve.apply(prob, record, y0, *params)
