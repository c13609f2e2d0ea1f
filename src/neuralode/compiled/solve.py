"""``compile=True`` for an explicit adaptive method: the device loop (no graph needed) or the fused step
(``compiled.step``), whichever applies, else None so that the eager loop runs."""

from __future__ import annotations

import torch

from ..solvers.control import StepController
from ..solvers.integrate import IntegrationResult
from ..solvers.per_sample import PerSampleDense
from ..solvers.runge_kutta import RungeKutta
from .cache import backend_of
from .loop import integrate_device_loop
from .loop import supports as device_loop_supports
from .step import _warn_once, integrate_compiled

__all__ = ["run_compiled"]


class _AcceptedSteps:
    """Takes the compiled loop's per-attempt records as it goes and hands the accepted ones on to a joint
    trace (a checkpointed gradient's), so that a budget of kept states holds during the forward too."""

    def __init__(self, trace) -> None:
        self.trace = trace

    def append(self, record: tuple) -> None:
        t0, _, y, accepted, t_after = record
        if bool(accepted[0]):
            self.trace.append((float(t0[0]), float(t_after[0]), y[0], False, False))

    def clear(self) -> None:
        self.trace.clear()


def run_compiled(ctx, rk: RungeKutta, ctrl: StepController, step_t: list, max_steps: int) -> IntegrationResult | None:
    """The compiled path (``options["compile"]``: True or a ``torch.compile`` backend name) of an explicit
    adaptive method, or None with a one-line warning when this solve needs something it does not do yet."""
    rhs, y0, t_out, opts, rtol, atol = ctx.rhs, ctx.y0, ctx.t_out, ctx.opts, ctx.rtol, ctx.atol
    norm, keep_segments, event, trace, callbacks = ctx.norm, ctx.keep_segments, ctx.event, ctx.trace, ctx.callbacks

    why = None
    if rhs.buffer_shape is None:
        why = "tuple states"
    elif not (isinstance(rtol, float) and isinstance(atol, float)):
        why = "tensor tolerances"
    elif norm is not None or step_t or opts.get("jump_t") or event is not None:
        why = "norms, step_t/jump_t or events"
    elif any(getattr(callbacks, n, None) for n in ("callback_step", "callback_accept_step", "callback_reject_step")):
        why = "callbacks"
    if why is not None:
        _warn_once(f"compile=True does not support {why} yet; using the eager solver")
        return None
    backend = backend_of(opts["compile"])
    if not torch.is_grad_enabled() and device_loop_supports(rk, ctrl):
        records = _AcceptedSteps(trace) if trace is not None else None  # (checkpointed gradients)
        kept: list | None = [] if keep_segments else None  # (dense output: every attempt's extension)
        got = integrate_device_loop(
            rhs.func,
            y0.reshape(1, -1),
            rhs.buffer_shape,
            t_out,
            rk,
            ctrl,
            per_sample=False,
            rtol=rtol,
            atol=atol,
            first_step=opts.get("first_step"),
            max_num_steps=max_steps,
            backend=backend,
            f0=rhs.at(float(t_out[0]), y0).reshape(1, -1),
            trace=records,
            keep=kept,
        )
        if got is not None:
            res, counts = got
            if kept is not None:
                start = torch.tensor([float(t_out[0])], dtype=torch.float64, device=y0.device)
                direction = 1.0 if float(t_out[-1]) >= float(t_out[0]) else -1.0
                res.segments = PerSampleDense.from_calls(kept, direction, start) if kept else []
            rhs.nfe += int(counts["nfe"][0])
            res.method = rk
            return res
    res = integrate_compiled(
        rhs,
        y0,
        t_out,
        rk,
        ctrl,
        rtol=rtol,
        atol=atol,
        first_step=opts.get("first_step"),
        max_num_steps=max_steps,
        backend=backend,
        trace=trace,
        keep_segments=keep_segments,
    )
    if res is not None:
        res.method = rk
    return res
