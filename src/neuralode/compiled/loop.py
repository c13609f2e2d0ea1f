"""The adaptive loop on the device: several step attempts fused into one compiled call.

``compile=True`` without gradients runs here. One call of the compiled function makes ``unroll`` attempts;
each computes all stages, the error ratio, the accept/reject decision, the next step size (the integral
controller of ``control.StepController`` written with tensor ops), and writes the outputs the accepted step
passes, from the method's continuous extension, straight into the output tensor. Accept/reject never goes to
the host: the Python loop reads two flags (running, failed) once per call. Time and step size are float64
tensors (the eager loop's Python floats), so steps and outputs match the eager solver up to floating-point
reassociation.

The same code serves joint stepping (one group: the whole state shares time and step size) and per-sample
stepping (group = row of a ``(batch, ...)`` state; ``func`` gets a ``(batch,)`` tensor of times).

Dense output costs the loop nothing: each attempt returns its step's continuous-extension coefficients, and
the host evaluates them at the requested times once every group has passed them (one batched evaluation per
call), so steps are never shortened to land on requested times and the compiled graph does not depend on how
many there are.
"""

from __future__ import annotations

import bisect
import functools
import math
import time
import types
from typing import Callable, Sequence

import numpy as np
import torch

from .._errors import Status
from ..solvers.control import _MIN_RATIO, StepController, initial_step, initial_steps
from ..solvers.integrate import IntegrationResult, _l2_norm, _max_steps_message, _underflow_message
from ..solvers.runge_kutta import RungeKutta, combo, interpolate_records, tableau_floats
from .cache import CompileCache
from .small_gemm import backend_for
from .step import _warn_once, fresh_code

__all__ = ["integrate_device_loop", "supports"]

_CACHE = CompileCache("device_loop", 32)
_EPS = float(np.finfo(np.float64).eps)
#: recorded step coefficients kept before the requested times they cover are evaluated (then dropped)
_RECORD_BYTES = 64 * 2**20


def _evaluate(func: Callable, shape: torch.Size, per_sample: bool, t64: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``func`` on a flat ``(groups, d)`` state at float64 group times: the samples' own times (per-sample), or
    the one shared time (joint) as a 0-d tensor of the state's dtype."""
    tt = t64.to(y.dtype) if per_sample else t64[0].to(y.dtype)
    return func(tt, y.reshape(shape)).reshape(y.shape)


def supports(method: RungeKutta, ctrl: StepController) -> bool:
    """Methods and controllers the device loop runs: first-same-as-last tableaus (dopri5, tsit5, bosh3, ...)
    and the integral controller."""
    return bool(method.fsal) and ctrl.beta2 == 0 and method.tableau.b_err is not None


def _make_attempts(
    func: Callable,
    method: RungeKutta,
    ctrl: StepController,
    shape: torch.Size,
    per_sample: bool,
    direction: float,
    rtol: float,
    atol: float,
    unroll: int,
    max_num_steps: int,
    transposed: bool,
    dense: bool = True,
    norm_blocks: tuple | None = None,
    starts: bool = False,
):
    tab = method.tableau
    S = tab.stages
    A, c, _, b_err = tableau_floats(tab)
    rows_used = method.rows_used
    Wm = np.asarray(method.W, dtype=np.float64)[:rows_used]  # (rows, degree)
    degree = Wm.shape[1]
    Wl = [[float(v) for v in row] for row in Wm]  # plain floats: constants in the compiled graph
    tol_shift = atol / rtol
    inv_rtol = 1.0 / rtol
    safety, ifactor, dfactor, k = ctrl.safety, ctrl.ifactor, ctrl.dfactor, ctrl.k
    beta1, max_step, min_step = ctrl.beta1, ctrl.max_step, ctrl.min_step
    tr = transposed  # state kept as (d, groups): per-group vectors run along the fast axis (small d)
    gdim = 1 if tr else 0

    def col(v: torch.Tensor) -> torch.Tensor:  # a per-group (G,) vector against the state
        return v[None, :] if tr else v[:, None]

    def rows_of(x: torch.Tensor) -> torch.Tensor:  # the state as (G, d)
        return x.t() if tr else x

    def F(t64: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if tr:
            # in the state's own (d, groups) layout: stages read it along the groups (faster than a strided view)
            return _evaluate(func, shape, per_sample, t64, y.t()).t().contiguous()
        return _evaluate(func, shape, per_sample, t64, y)

    def attempt(t, dt, y, k0, running, failed, n_steps, n_rej, nfe, t_end):
        d = y.shape[1 - gdim]
        active = running & (n_steps + n_rej < max_num_steps)  # a group out of attempts waits for the host
        lands = direction * (t + dt - t_end) >= 0
        dt_try = torch.where(lands, t_end - t, dt)
        dt_try = torch.where(active, dt_try, torch.zeros_like(dt_try))
        h = col(dt_try.to(y.dtype))
        K = [k0]
        yi = y
        for i in range(1, S):
            yi = y + h * combo(A[i][:i], K)
            K.append(F(t + c[i] * dt_try, yi))
        y1 = yi
        e = combo(b_err, K)
        scale = torch.maximum(y.abs(), y1.abs()) + tol_shift
        if norm_blocks is None:
            err = (torch.linalg.vector_norm(e / scale, dim=1 - gdim) / math.sqrt(max(d, 1))).double()
        else:  # joint stepping: the largest RMS over blocks of the state (the adjoint's [y, a, θ] norm)
            scaled = e / scale
            err = (
                torch.stack(
                    [torch.linalg.vector_norm(scaled[:, s0 : s0 + n], dim=1) / math.sqrt(n) for s0, n in norm_blocks]
                )
                .amax(0)
                .double()
            )
        ratio = dt_try.abs() * err * inv_rtol
        finite = torch.isfinite(ratio)
        accept = active & finite & (ratio <= 1.0)
        if min_step > 0:  # (a step at the floor is accepted whatever its error, as in the eager loop)
            accept = accept | (active & finite & (dt_try.abs() <= min_step))
        t1 = torch.where(lands, t_end, t + dt_try)
        # the step's continuous extension, y(t + θh) = y + h Σ_p θ^(p+1) Q_p with Q_p = Σ_r W[r, p] K_r,
        # recorded for the host to evaluate at the requested times once they are passed
        if dense:
            Q = [combo([Wl[r][p] for r in range(rows_used)], K) for p in range(degree)]
            record = (t, dt_try, rows_of(y), [rows_of(q if q is not None else torch.zeros_like(y)) for q in Q])
        elif starts:  # (a checkpointed backward replays the attempts from their starts)
            record = (t, dt_try, rows_of(y))
        else:  # only the end is requested: it is the last step's value
            record = ()
        y = torch.where(col(accept), y1, y)
        t = torch.where(accept, t1, t)
        k0 = torch.where(col(accept), K[S - 1], k0)
        r = ratio.clamp(min=_MIN_RATIO)
        grow = torch.where(ratio == 0, torch.full_like(r, ifactor), (safety * r ** (-beta1)).clamp(1.0, ifactor))
        shrink = (safety * r ** (-1.0 / k)).clamp(dfactor, 1.0)
        factor = torch.where(accept, grow, torch.where(finite, shrink, torch.full_like(r, dfactor)))
        new_dt = (dt_try.abs() * factor).clamp(max=max_step)  # (the floor: as the per-sample loop)
        if min_step > 0:
            new_dt = torch.where(finite, new_dt.clamp(min=min_step), new_dt)
        new_dt = new_dt * direction
        dt = torch.where(active, new_dt, dt)
        n_steps = n_steps + accept.long()
        n_rej = n_rej + (active & ~accept).long()
        nfe = nfe + active.long() * (S - 1)
        running = running & ~(accept & lands)
        tiny = active & running & ((t + dt == t) | (dt.abs() < 4 * _EPS * t.abs()))
        # 1: step-size underflow; 2: the same, reached by rejecting non-finite (NaN/Inf) steps
        failed = torch.where(tiny & (failed == 0), torch.where(finite, 1, 2), failed)
        running = running & ~tiny
        return (t, dt, y, k0, running, failed, n_steps, n_rej, nfe), record + (t,)

    def attempts(t, dt, y, k0, active, failed, n_steps, n_rej, nfe, t_end):
        recs = []
        for _ in range(unroll):
            (t, dt, y, k0, active, failed, n_steps, n_rej, nfe), rec = attempt(
                t, dt, y, k0, active, failed, n_steps, n_rej, nfe, t_end
            )
            recs.append(rec)
        t_after = torch.stack([r[-1] for r in recs])  # time of each group after each attempt
        if dense:
            t0s = torch.stack([r[0] for r in recs])  # (unroll, G) float64
            hs = torch.stack([r[1] for r in recs])
            ys = torch.stack([r[2] for r in recs])  # (unroll, G, d)
            Qs = torch.stack([torch.stack(r[3], 1) for r in recs])  # (unroll, G, degree, d)
            records = (t0s, hs, ys, Qs, t_after)
        elif starts:
            records = (torch.stack([r[0] for r in recs]), torch.stack([r[1] for r in recs]))
            records += (torch.stack([r[2] for r in recs]), t_after)
        else:
            records = ()
        out_of_steps = (active & (n_steps + n_rej >= max_num_steps)).any()
        flags = torch.stack(
            [
                active.any().double(),
                (failed > 0).any().double(),
                out_of_steps.double(),
                # every group has passed this time (one that finished has passed all of its own)
                torch.where(~active & (failed == 0), math.inf, direction * t).min(),
                (direction * t_after).max(),  # no group of these attempts got further
                # the statistics, read with the flags (exact in float64 below 2**53)
                n_steps.max().double(),
                n_rej.max().double(),
                (n_steps + n_rej).max().double(),
            ]
        )
        return (t, dt, y, k0, active, failed, n_steps, n_rej, nfe), records, flags

    return attempts, degree


def integrate_device_loop(
    func: Callable,
    y0: torch.Tensor,
    shape: torch.Size,
    t_out: Sequence[float],
    method: RungeKutta,
    ctrl: StepController,
    *,
    per_sample: bool,
    rtol: float,
    atol: float,
    first_step: float | None,
    max_num_steps: int,
    backend: str = "inductor",
    unroll: int | None = None,
    f0: torch.Tensor | None = None,
    norm_blocks: tuple | None = None,
    trace: list | None = None,
    keep: list | None = None,
) -> tuple[IntegrationResult, dict] | None:
    """Integrate with the compiled device loop. ``y0`` is flat ``(groups, d)``: one group for joint stepping,
    the batch for per-sample stepping. ``f0``, if given, is f(t0, y0) as ``(groups, d)``, evaluated and checked
    by the caller, and not counted in the statistics. Returns the result (``ys``: ``(len(t_out), groups·d)``)
    and per-group statistics, or ``None`` when compilation is unavailable (the caller then runs the eager
    loop). Function evaluations are counted for the groups still stepping; masked attempts after a group is
    done (at most ``unroll - 1`` at the end) are computed but not counted. ``unroll`` (attempts per compiled
    call) is chosen once per func from the cost of its calls and the length of the solve (``_choose_unroll``).
    ``norm_blocks`` ((start, size) pairs, joint stepping only) measures the error as the largest RMS over those
    slices of the state; parts outside every block are not error-controlled. ``trace`` (per-sample stepping)
    gets, per attempt, ``per_sample.integrate_per_sample``'s trace record (start times, steps, start values,
    acceptances, end times) as each compiled call returns, for a checkpointed backward (or anything with an
    ``append``). ``keep`` gets every call's records (start times, steps, start values, continuous-extension
    coefficients, times after), for ``per_sample.PerSampleDense.from_calls`` (dense output)."""
    G, d = y0.shape
    dtype, device = y0.dtype, y0.device
    # per-sample output times: ``t_out`` has one row per group (each its own start and end)
    rows = len(t_out) > 0 and isinstance(t_out[0], (list, tuple))
    T = [float(v) for v in (t_out[0] if rows else t_out)]  # (the first group's, for the direction)
    T_rows = torch.tensor(t_out, dtype=torch.float64, device=device) if rows else None  # (G, m)
    m = len(T)
    direction = 1.0 if T[-1] >= T[0] else -1.0
    transposed = G > 1 and d < 16
    dense_out = m > 2 or keep is not None
    cheap = False  # func's eager calls were timed under _EXPENSIVE_CALL_S (in its first solve)
    if unroll is None:
        known = _UNROLL.get(_unroll_key(func, shape, dtype, device, per_sample), func)
        if known is not None:
            unroll, cheap = known
    # wall time of the prelude's calls of func, which choose ``unroll`` (timed only while it is unknown: on
    # CUDA timing synchronises)
    seconds: list[float] | None = [] if unroll is None else None

    def F(t64: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return _timed(seconds, device, lambda: _evaluate(func, shape, per_sample, t64, y))

    zeros = lambda: torch.zeros(G, dtype=torch.long, device=device)  # noqa: E731
    if m == 1 or T[0] == T[-1]:  # nothing to integrate
        ys = y0[None].expand(m, G, d).reshape(m, -1).clone()
        return IntegrationResult(ys, Status.SUCCESS), {
            "n_steps": zeros(),
            "n_rejected": zeros(),
            "nfe": zeros(),
            "calls": 0,
        }
    if rows:
        t, t_end = T_rows[:, 0].clone(), T_rows[:, -1].clone()
    else:
        t = torch.full((G,), T[0], dtype=torch.float64, device=device)
        t_end = torch.full_like(t, T[-1])
    y = y0
    k0 = F(t, y) if f0 is None else f0
    order = method.tableau.order
    dt = None
    # the compiled starting step: for a cheap func (an expensive one's eager call costs what its compiled one
    # does, and compiling it would stall the second solve for seconds), known from the first solve's timing
    if first_step is None and unroll is not None and cheap and not _NO_DIRECT:
        start = _init_step(
            func, shape, G, d, per_sample, direction, order, rtol, atol, ctrl.max_step, dtype, device, backend
        )
        dt = start(t, y, k0) if start is not None else None  # signed and clamped already
    compiled_start = dt is not None
    if compiled_start or first_step is not None:
        dt = dt if compiled_start else torch.full_like(t, abs(float(first_step)))
    elif per_sample:
        dt = initial_steps(F, t, y, k0, direction, order, rtol, atol)
    else:
        as_time = functools.partial(torch.scalar_tensor, dtype=dtype, device=device)
        dt0, _ = initial_step(  # (one group: a 0-d time)
            lambda tt, yy: _timed(seconds, device, lambda: func(as_time(tt), yy.view(shape)).reshape(yy.shape)),
            T[0],
            y,
            k0,
            direction,
            order,
            rtol,
            atol,
            lambda x: _l2_norm(x.reshape(-1)) / math.sqrt(max(x.numel(), 1)),
        )
        dt = torch.full_like(t, min(abs(dt0), ctrl.max_step) * direction)
    init_nfe = (first_step is None) + (f0 is None)
    if not compiled_start and (first_step is not None or per_sample):
        dt = dt.clamp(max=ctrl.max_step) * direction
    if ctrl.min_step > 0:  # (the floor, as the eager loops start from it)
        dt = direction * dt.abs().clamp(min=ctrl.min_step)
    if unroll is None:
        if seconds:  # the first, cold calls time badly: a few warm ones more, once per func
            for _ in range(3):
                F(t, y)
        span = float((T_rows[:, -1] - T_rows[:, 0]).abs().max()) if rows else abs(T[-1] - T[0])
        span_steps = span / max(float(dt.abs().min()), 1e-300)  # the initial step's guess
        unroll = _choose_unroll(func, shape, dtype, device, seconds, G * d, per_sample, span_steps)
    key = (id(func), id(method.tableau), tuple(shape), G, per_sample, direction, rtol, atol, unroll)
    key += (max_num_steps, transposed, ctrl.safety, ctrl.ifactor, ctrl.dfactor, ctrl.beta1, ctrl.min_step)
    key += (ctrl.max_step, dtype, str(device), backend, dense_out, norm_blocks, trace is not None)
    hit = _CACHE.get(key, func, method.tableau)
    if hit is not None:
        fn, degree = hit
    else:
        attempts, degree = _make_attempts(
            func,
            method,
            ctrl,
            shape,
            per_sample,
            direction,
            rtol,
            atol,
            unroll,
            max_num_steps,
            transposed,
            dense_out,
            norm_blocks,
            starts=trace is not None,
        )
        try:
            fn = torch.compile(
                fresh_code(attempts),
                backend=backend_for(backend, device, cpp_wrapper=True, pointwise_cat=transposed),
                dynamic=False,
                fullgraph=True,
            )
        except Exception as exc:  # pragma: no cover - depends on the platform's compiler
            _warn_once(f"compile=True: torch.compile is unavailable ({type(exc).__name__}); using the eager solver")
            return None
        _CACHE.put(key, (fn, degree), func, method.tableau)
    out = torch.empty(m, G, d, dtype=dtype, device=device)
    out[0] = y
    if transposed:
        y, k0 = y.t().contiguous(), k0.t().contiguous()
    active = torch.ones(G, dtype=torch.bool, device=device)
    failed, n_steps, n_rej = zeros(), zeros(), zeros()
    nfe = torch.full_like(n_steps, init_nfe)
    state = (t, dt, y, k0, active, failed, n_steps, n_rej, nfe)
    dense = _DenseOutput(T_rows if rows else T, direction, out, degree, backend_for(backend, device))
    status, message, t_fail = Status.SUCCESS, "", None
    # calls 0 and 1 go through ``fn`` unless its one compiled entry's guards pass (checked here, without
    # TorchDynamo's frame hook); the later ones take call 1's kind of inputs and skip the check (``DirectCall``)
    direct = None if _NO_DIRECT else DirectCall.of(fn)
    n_calls = 0
    try:
        while True:
            args = (*state, t_end)
            if direct is not None and (n_calls >= 2 or direct.passes(args)):
                state, records, flags = direct(*args)
            else:
                state, records, flags = fn(*args)
                if n_calls < 2:  # Dynamo decided: from call 2 on, direct calls only into the entry both matched
                    direct = DirectCall.of(fn) if n_calls == 1 and not _NO_DIRECT else None
            n_calls += 1
            running, bad, out_of_steps, passed, reach, *most = flags.tolist()  # the loop's one host read per call
            dense.add(records, reach)
            if keep is not None:
                keep.append(records)
            if trace is not None:  # one record per attempt; an attempt accepted where the group's time moved
                t0s, hs, ys, after = records[0], records[1], records[2], records[-1]
                for u in range(t0s.shape[0]):
                    trace.append((t0s[u], hs[u], ys[u], after[u] != t0s[u], after[u]))
            t, dt, y, k0, active, failed, n_steps, n_rej, nfe = state
            if bad:
                worst = int(failed.nonzero()[0])
                t_fail = float(t[worst])
                if int(failed[worst]) == 2:
                    status = Status.NONFINITE
                    message = (
                        f"the state became NaN or Inf just after t={t_fail:.10g}: every step from there produced "
                        "non-finite values (func returned NaN/Inf, or the solution blows up there)"
                    )
                else:
                    status = Status.DT_UNDERFLOW
                    message = _underflow_message(t_fail, float(dt[worst]), ctrl.min_step, rtol, atol)
                if per_sample:
                    message += f" (sample {worst} of the batch)"
                break
            if not running:
                break
            if out_of_steps:
                worst = int(torch.argmin(torch.where(active, direction * t, torch.full_like(t, math.inf))))
                status, t_fail = Status.MAX_STEPS, float(t[worst])
                t0_worst = float(T_rows[worst, 0]) if rows else T[0]
                message = _max_steps_message(
                    max_num_steps, t_fail, t0_worst, float(t_end[worst]), int(n_steps[worst]), int(n_rej[worst])
                )
                if per_sample:
                    message += f" (sample {worst} of the batch)"
                break
            if dense.nbytes > _RECORD_BYTES:  # evaluate what is passed, drop what is no longer needed
                dense.flush(passed)
    except Exception as exc:  # pragma: no cover - a backend that compiles lazily may fail on the first call
        _warn_once(f"compile=True: the compiled loop failed ({type(exc).__name__}: {exc}); using the eager solver")
        return None
    if status == Status.SUCCESS:
        dense.flush(dense.S[-1])
        out[m - 1] = y.t() if transposed else y  # the last step's end value itself
        reached = m
    else:
        reached = dense.flush(passed)
    most_steps, most_rej, most_attempts = (int(v) for v in most)  # after the last call
    res = IntegrationResult(out[:reached].reshape(reached, -1), status, message, t_fail, most_steps, most_rej)
    if G == 1:
        res.next_step = float(dt[0])  # the controller's proposal after the last step (the adjoint starts there)
    # batched calls of func: every attempt evaluates the whole batch, groups that are done included
    calls = init_nfe + (method.stages - 1) * most_attempts
    return res, {"n_steps": n_steps, "n_rejected": n_rej, "nfe": nfe, "calls": calls}


#: every compiled call through TorchDynamo and the starting step eager, bypassing ``DirectCall`` and
#: ``_init_step`` (tests compare the two)
_NO_DIRECT = False


_INIT = CompileCache("initial_step", 64)


def _init_step(
    func, shape, G, d, per_sample, direction, order, rtol, atol, max_step, dtype, device, backend
) -> Callable | None:
    """The starting step size, compiled: ``(t (G,), y (G, d), f0 (G, d)) -> dt (G,)`` float64, signed and
    clamped to ``max_step``. It is ``control.initial_step`` (joint: one group) or ``control.initial_steps``
    (each group its own) with func traced in: one compiled call instead of some fifteen eager operations,
    three host reads and an eager call of func (the tiny MLP solve: ~100 µs of its ~700). ``None`` where
    compilation is unavailable (the eager functions then run)."""
    key = (id(func), tuple(shape), G, d, per_sample, direction, order, rtol, atol, max_step, dtype, str(device))
    key += (backend,)
    hit = _INIT.get(key, func)
    if hit is not None:
        return hit or None  # (False: compiling failed before, the eager starting step runs)

    def init(t: torch.Tensor, y: torch.Tensor, f0: torch.Tensor) -> torch.Tensor:
        def F(tt: torch.Tensor, yy: torch.Tensor) -> torch.Tensor:
            return _evaluate(func, shape, per_sample, tt, yy)

        # joint: control.initial_step's arithmetic (1/rtol folded into the norms); per sample: initial_steps'
        h = initial_steps(F, t, y, f0, direction, order, rtol, atol, fold_rtol=not per_sample)
        return h.clamp(max=max_step) * direction

    try:
        fn = torch.compile(
            fresh_code(init),
            backend=backend_for(backend, device, cpp_wrapper=True),
            dynamic=False,
            fullgraph=True,
        )
    except Exception:  # noqa: BLE001 - depends on the platform's compiler: the eager starting step
        fn = None

    def call(*args) -> torch.Tensor | None:
        """``fn(*args)``, directly into its compiled entry where that entry's guards pass; ``None`` (and the
        eager starting step from then on) if compiling or running it fails."""
        try:
            direct = DirectCall.of(fn)
            if direct is not None and direct.passes(args):
                return direct(*args)
            return fn(*args)
        except Exception:  # noqa: BLE001 - a backend that compiles lazily may fail on the first call
            _INIT.put(key, False, func)
            return None

    _INIT.put(key, call if fn is not None else False, func)
    return call if fn is not None else None


class DirectCall:
    """Calls of a ``torch.compile``'d function without TorchDynamo's per-call work (frame hook, guard
    evaluation, context switches: 40-90 µs a call here, a fifth of a tiny solve): the transformed bytecode of
    its one compiled entry, run as a plain function, which calls the compiled graph directly.

    ``passes(args)`` evaluates that entry's guards on the arguments and the function's closure, as Dynamo
    would (a few µs); the device loop calls directly when they pass, for a solve's first two calls, and without
    the check from the third call on, whose inputs are the previous call's outputs: the same sizes, strides,
    dtypes and devices as the checked second call's, with ``t_end`` and func the same objects and no user code
    run in between. A call whose guards fail goes through Dynamo, which recompiles, and that solve keeps the
    guarded calls. ``of(fn)`` is ``None`` where ``fn`` has no or several compiled entries, under a
    ``torch.compiler.set_stance`` other than the default (Dynamo then decides), or where this PyTorch lacks the
    internals used here."""

    __slots__ = ("call", "guards", "names", "cells")

    def __init__(self, call: Callable, guards, names: tuple, cells: dict) -> None:
        self.call, self.guards, self.names, self.cells = call, guards, names, cells

    @classmethod
    def of(cls, fn: Callable) -> DirectCall | None:
        try:
            from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list
            from torch._dynamo import eval_frame

            if eval_frame._stance.stance != "default":  # e.g. torch.compiler.set_stance("force_eager"): obey it
                return None
            orig = fn._torchdynamo_orig_callable
            code = orig.__code__
            entries = _debug_get_cache_entry_list(code)
            if len(entries) != 1 or entries[0].code.co_freevars != code.co_freevars:
                return None
            call = types.FunctionType(entries[0].code, orig.__globals__, orig.__name__, None, orig.__closure__)
            cells = dict(zip(code.co_freevars, orig.__closure__ or ()))
            return cls(call, entries[0].guard_manager, code.co_varnames[: code.co_argcount], cells)
        except Exception:  # noqa: BLE001 - a PyTorch without these internals: keep the guarded calls
            return None

    def passes(self, args: tuple) -> bool:
        """Would Dynamo run this entry for ``args``? (Its guards see the arguments and the closure by name.)"""
        frame_locals = dict(zip(self.names, args))
        for name, cell in self.cells.items():
            frame_locals[name] = cell.cell_contents
        try:
            return bool(self.guards.check(frame_locals))
        except Exception:  # noqa: BLE001 - let Dynamo decide
            return False

    def __call__(self, *args):
        return self.call(*args)


#: one call of func at least this long (seconds) makes an attempt cost far more than a host round trip, so the
#: loop makes one attempt per call: masked attempts past the end would cost whole evaluations
_EXPENSIVE_CALL_S = 1e-3
#: without a timed call, states this large are taken as expensive
_EXPENSIVE_SIZE = 1 << 17
#: joint stepping with a call of func this short (seconds, eager, as timed): eight attempts per call. The
#: compiled call's own overhead (guards, wrappers: ~100-200 µs here) then outweighs the up to four more masked
#: attempts at the end (van der Pol, batch 256, its func timed at 70-180 µs: 5.3 → 4.5 ms; sixteen attempts
#: gained nothing more and took 80 s to compile)
_CHEAP_CALL_S = 2.5e-4
#: ... and a solve long enough for it to pay: the span over the initial step (which is cautious, so this
#: overestimates the steps; a short solve's masked attempts would cost more than the calls saved)
_LONG_SPAN_STEPS = 100.0
_UNROLL = CompileCache("unroll_choice", 256)


def _timed(seconds: list | None, device: torch.device, call: Callable) -> torch.Tensor:
    if seconds is None:
        return call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    out = call()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds.append(time.perf_counter() - start)
    return out


def _unroll_key(func: Callable, shape, dtype, device, per_sample: bool) -> tuple:
    return (id(func), tuple(shape), dtype, str(device), per_sample)


def _choose_unroll(
    func: Callable,
    shape,
    dtype,
    device,
    seconds: list,
    size: int,
    per_sample: bool = False,
    span_steps: float = math.inf,
) -> int:
    """Attempts per compiled call: 4 (fewer host round trips); 1 where func is expensive; 8 for joint stepping
    with a very cheap func on a long solve; 1 or 2 where the solve is a step or a few (``span_steps``: the span
    over the first step, e.g. the adjoint's backward segments, whose first step is the forward's last), since
    the attempts after the end are computed and thrown away. Chosen once per (func, shape, dtype, device,
    per_sample), so that timing noise near a threshold never compiles a second loop."""
    key = _unroll_key(func, shape, dtype, device, per_sample)
    got = _UNROLL.get(key, func)
    if got is not None:
        return got[0]
    expensive = min(seconds) >= _EXPENSIVE_CALL_S if seconds else size >= _EXPENSIVE_SIZE
    cheap = bool(seconds) and not expensive
    unroll = 1 if expensive or span_steps <= 2.5 else 2 if span_steps <= 8 else 4
    if seconds and not per_sample and min(seconds) < _CHEAP_CALL_S and span_steps >= _LONG_SPAN_STEPS:
        unroll = 8
    _UNROLL.put(key, (unroll, cheap), func)
    return unroll


class _DenseOutput:
    """Requested times evaluated from the recorded steps once every group has passed them."""

    def __init__(
        self, T: list[float] | torch.Tensor, direction: float, out: torch.Tensor, degree: int, backend=None
    ) -> None:
        """``T``: the requested times shared by the groups (a list), or (groups, m), each group its own (float64)."""
        if torch.is_tensor(T):
            D = direction * T
            # requested time k is done once every group has passed its own; a recorded attempt is needed
            # while it reaches the earliest group's time (both increase with k)
            self.S, self.S_first = D.amax(0).tolist(), D.amin(0).tolist()
            self.T = T if T.shape[1] > 2 else None
        else:
            self.S = self.S_first = [direction * v for v in T]  # increasing
            self.T = torch.tensor([T], dtype=torch.float64, device=out.device) if len(T) > 2 else None
        self.backend = backend  # a torch.compile backend for the interpolation, or None
        self.direction = direction
        self.out = out
        self.degree = degree
        self.done = 1  # out[0] is y0
        self.records: list[tuple] = []  # (records, furthest time they reach)
        self.nbytes = 0

    def add(self, records: tuple, reach: float) -> None:
        if len(self.S) <= 2:  # only the end is requested: it is the last step's value, no record needed
            return
        self.records.append((records, reach))
        self.nbytes += records[3].numel() * records[3].element_size()

    def flush(self, passed: float) -> int:
        """Evaluate the requested times up to ``passed`` (direction-adjusted); returns how many are done."""
        hi = bisect.bisect_right(self.S, passed)
        if hi > self.done and self.records:
            self._evaluate(self.done, hi)
            self.done = hi
        # recorded attempts that end before the next requested time are no longer needed
        if self.done < len(self.S):
            nxt = self.S_first[self.done]
            self.records = [r for r in self.records if r[1] >= nxt]
        else:
            self.records = []
        self.nbytes = sum(r[0][3].numel() * r[0][3].element_size() for r in self.records)
        return self.done

    def _evaluate(self, lo: int, hi: int) -> None:
        t0 = torch.cat([r[0][0] for r in self.records])  # (A, G)
        h = torch.cat([r[0][1] for r in self.records])
        ys = torch.cat([r[0][2] for r in self.records])  # (A, G, d)
        Qs = torch.cat([r[0][3] for r in self.records])  # (A, G, degree, d)
        after = torch.cat([r[0][4] for r in self.records])  # (A, G)
        G = t0.shape[1]
        Tq = self.T[:, lo:hi]  # (1 or G, K)
        # for each group, the first attempt whose end reaches the requested time: the accepted step over it
        keys = (self.direction * after).t().contiguous()  # (G, A), non-decreasing
        idx = torch.searchsorted(keys, (self.direction * Tq).expand(G, -1).contiguous())  # (G, K)
        a = idx.t().clamp(max=t0.shape[0] - 1)  # (K, G): the output's own order
        args = (a, t0, h, ys, Qs, Tq.t())
        fn = _interpolator(self.backend)
        if fn is not interpolate_records:
            try:
                self.out[lo:hi] = fn(*args)
                return
            except Exception as exc:  # pragma: no cover - depends on the platform's compiler
                _FAILED_INTERP.add(self.backend)
                _warn_once(f"compile=True: dense output runs uncompiled ({type(exc).__name__}: {exc})")
        self.out[lo:hi] = interpolate_records(*args)


_INTERP = CompileCache("dense_output", 8)
_FAILED_INTERP: set = set()


def _interpolator(backend) -> Callable:
    """``interpolate_records`` compiled once per backend, with dynamic shapes (the numbers of attempts and requested
    times change from call to call); the plain function where there is no backend or compiling failed."""
    if backend is None or backend in _FAILED_INTERP:
        return interpolate_records
    return _INTERP.get_or_make(backend, lambda: torch.compile(interpolate_records, backend=backend, dynamic=True))
