"""Per-sample adaptive stepping: every element of a batch keeps its own time, step size and accept/reject
decision (as torchode does), so one hard sample does not force small steps on the whole batch.

The state is ``(batch, ...)`` with independent samples along dimension 0. ``func`` is called on the whole batch
with ``t`` a ``(batch,)`` tensor of per-sample times. Error control is the RMS norm of each sample's own error
(the joint loop's norm restricted to the sample), the controller the joint loop's integral controller applied
per sample, so that a sample takes exactly the steps it would take if it were solved alone.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .._errors import Status
from ..compiled.cache import CompileCache
from .control import _MIN_RATIO, StepController, initial_steps, rms_rows
from .integrate import STIFF_HINT, IntegrationResult, _max_steps_message
from .runge_kutta import RungeKutta, combo, interpolate_records, tableau_floats

__all__ = ["integrate_per_sample", "Replay", "compiled_attempt", "PerSampleDense", "PerSampleEvents"]


def integrate_per_sample(
    func,
    y0: torch.Tensor,
    t_out: Sequence[float],
    method: RungeKutta,
    ctrl: StepController,
    *,
    rtol: float,
    atol: float,
    first_step: float | None = None,
    max_num_steps: int = 100_000,
    keep_dense: bool = False,
    quadrature=None,
    events: "PerSampleEvents | None" = None,
    trace: list | None = None,
    step_fn=None,
) -> tuple[IntegrationResult, dict]:
    """Integrate a batch with per-sample steps. Returns the result (``ys``: ``(len(t_out), batch, n)``) and
    per-sample statistics (``n_steps``, ``n_rejected``, ``nfe``: tensors of shape ``(batch,)``).

    ``t_out`` is one sequence of times for every sample, or one row per sample (``batch`` rows of equal length,
    all in the same direction): each sample then starts at its own first time and stops at its own last.
    ``keep_dense``: record every attempt's continuous extension; ``res.segments`` is then a
    :class:`PerSampleDense` (``Solution.interpolate``). ``quadrature``: an object told of every attempt,
    ``begin(t, y)`` before its stages and ``end(accept, dt)`` once its acceptance is known (the per-sample
    adjoint integrates its parameter gradients along the accepted steps that way). ``events``: a
    :class:`PerSampleEvents`; each sample stops at its first event (give ``t_out`` an infinite end).
    ``trace``: a list that gets, per attempt, what :class:`Replay` needs to rebuild it (its start times,
    steps, start values, acceptances and end times); not with ``events``. ``step_fn`` (not with
    ``quadrature``): an attempt's stages and error ratio as one function, ``(t, dt, y, k0) -> (y1, K, ratio)``
    (:func:`compiled_attempt`), in place of the eager stages."""
    if trace is not None and events is not None:
        raise ValueError("integrate_per_sample: `trace` and `events` do not go together")
    if ctrl.beta2 != 0:
        raise ValueError("per-sample stepping uses the integral controller: leave `pcoeff` at 0")
    B = y0.shape[0]
    y = y0.reshape(B, -1)
    d = y.shape[1]
    dtype, device = y.dtype, y.device
    shape = y0.shape
    rows = len(t_out) > 0 and isinstance(t_out[0], (list, tuple))
    T_t = torch.tensor(t_out if rows else [list(t_out)], dtype=torch.float64, device=device).expand(B, -1)
    m = T_t.shape[1]
    direction = 1.0 if float(T_t[0, -1]) >= float(T_t[0, 0]) else -1.0
    co = _Coefficients(method, dtype, device)
    S, b_err, W, rows_used = co.S, co.b_err, co.W, co.rows_used
    tab = method.tableau
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    calls = 0

    def f(t64: torch.Tensor, yy: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        nonlocal calls, nfe
        calls += 1
        nfe = nfe + active.long()
        return func(t64.to(dtype), yy.view(shape)).reshape(B, d)

    rms = rms_rows

    t = T_t[:, 0].clone()
    t_end = T_t[:, -1].clone()
    all_active = torch.ones(B, dtype=torch.bool, device=device)
    if step_fn is not None and quadrature is not None:
        raise ValueError("integrate_per_sample: `step_fn` and `quadrature` do not go together")
    K = torch.empty(max(method.rows, S), B, d, dtype=dtype, device=device)
    f0 = f(t, y, all_active)
    K[0] = k0 = f0
    if first_step is None:
        dt = initial_steps(lambda tt, yy: f(tt, yy, all_active), t, y, f0, direction, tab.order, rtol, atol)
    else:
        dt = torch.full_like(t, abs(float(first_step)))
    dt = torch.clamp(dt.detach(), min=ctrl.min_step, max=ctrl.max_step) * direction

    # (one spare row: the interpolated values of (sample, slot) pairs with no output left go there, so that
    # each attempt writes its outputs with one index_put and no boolean indexing)
    out = torch.empty(m + 1, B, d, dtype=dtype, device=device)
    out[0] = y
    next_k = torch.ones(B, dtype=torch.long, device=device)
    T_sorted = (direction * T_t).contiguous()  # rows increasing, for searchsorted
    active = t_end != t  # (a single time: nothing to do)
    if m == 1:
        out[:m] = y
    n_steps = torch.zeros(B, dtype=torch.long, device=device)
    n_rej = torch.zeros(B, dtype=torch.long, device=device)
    nonfinite_last = torch.zeros(B, dtype=torch.bool, device=device)
    tol_shift = atol / rtol
    k_exp = -ctrl.beta1
    status, message, t_fail = Status.SUCCESS, "", None
    attempts = 0
    records: list | None = [] if keep_dense else None
    while bool(active.any()):
        if attempts >= max_num_steps:
            status, t_fail, message = max_steps_failure(active, t, direction, T_t, n_steps, n_rej, max_num_steps)
            break
        attempts += 1
        lands = direction * (t + dt - t_end) >= 0
        dt_try = torch.where(lands, t_end - t, dt)
        dt_try = torch.where(active, dt_try, torch.zeros_like(dt_try))
        h = dt_try.to(dtype)[:, None]
        if quadrature is not None:
            quadrature.begin(t, y)
        if step_fn is not None:
            y1, K, ratio = step_fn(t, dt_try, y, k0)
            calls += S - 1
            nfe = nfe + active.long() * (S - 1)
        else:
            y1 = _stages(f, co, t, y, dt_try, h, K, active, method.fsal)
            with torch.no_grad():  # step-size control is not differentiated (as in the joint loop)
                e = torch.tensordot(b_err, K[:S], dims=1)
                scale = torch.maximum(y.abs(), y1.abs()) + tol_shift
                ratio = dt_try.abs() * rms(e / scale) / rtol
        finite = torch.isfinite(ratio)
        nonfinite_last = torch.where(active, ~finite, nonfinite_last)  # each sample's last attempt was NaN/Inf
        accept = active & finite & (ratio <= 1.0)
        if ctrl.min_step > 0:  # (a step at the floor is accepted whatever its error, as in the joint loop)
            accept = accept | (active & finite & (dt_try.abs() <= ctrl.min_step))
        reject = active & ~accept
        if quadrature is not None:
            quadrature.end(accept, dt_try)
        t1 = torch.where(lands, t_end, t + dt_try)
        # outputs passed by accepted steps: the method's continuous extension, per sample
        if not method.fsal and method.interp_needs_f1:
            if step_fn is None:
                if bool(accept.any()):
                    K[S] = f(t1, y1, accept)
            else:  # (K is the compiled attempt's output: a new tensor, its last row unread where none accepted)
                f1 = f(t1, y1, accept) if bool(accept.any()) else torch.zeros_like(K[0])
                K = torch.cat([K, f1[None]])
        hit = None
        if events is not None:  # samples whose accepted step crosses their event stop there
            hit = events.check(t, dt_try, y, torch.einsum("rp,rbd->bpd", W, K[:rows_used]), t1, y1, accept)
            if bool(hit.any()):
                t1 = torch.where(hit, events.t_event, t1)
                y1 = torch.where(hit[:, None], events.y_event, y1)
            else:
                hit = None
        next_k = write_outputs(
            out,
            next_k,
            accept,
            t1,
            T_sorted,
            direction,
            lambda ks, a=(t, dt_try, y, h, K): _dense_values(co, T_t, *a, ks),
        )
        if trace is not None:  # (start times, steps, start values, accepted, end times): what a replay needs
            trace.append((t, dt_try, y, accept, t1))
        if records is not None:  # (start, step, start value, extension Q (B, degree, d), time after the attempt)
            t_after = torch.where(accept, t1, t)
            records.append((t, dt_try, y, torch.einsum("rp,rbd->bpd", W, K[:rows_used]), t_after))
        y = torch.where(accept[:, None], y1, y)
        t = torch.where(accept, t1, t)
        if step_fn is not None:
            if method.fsal or method.interp_needs_f1:
                k0 = torch.where(accept[:, None], K[S - 1 if method.fsal else S], k0)
            elif bool(accept.any()):
                k0 = torch.where(accept[:, None], f(t, y, accept), k0)
        elif method.fsal:
            K[0] = torch.where(accept[:, None], K[S - 1], K[0])
        else:
            if method.interp_needs_f1:
                K[0] = torch.where(accept[:, None], K[S], K[0])
            elif bool(accept.any()):
                K[0] = torch.where(accept[:, None], f(t, y, accept), K[0])
        r = ratio.clamp(min=_MIN_RATIO)
        grow = torch.where(
            ratio == 0, torch.full_like(r, ctrl.ifactor), (ctrl.safety * r**k_exp).clamp(1.0, ctrl.ifactor)
        )
        shrink = (ctrl.safety * r ** (-1.0 / ctrl.k)).clamp(ctrl.dfactor, 1.0)
        factor = torch.where(accept, grow, torch.where(finite, shrink, torch.full_like(r, ctrl.dfactor)))
        # (the floor min_step holds for finite errors; a non-finite step shrinks below it, to a NONFINITE stop)
        new_dt = (dt_try.abs() * factor).clamp(max=ctrl.max_step)
        if ctrl.min_step > 0:
            new_dt = torch.where(finite, new_dt.clamp(min=ctrl.min_step), new_dt)
        new_dt = new_dt * direction
        dt = torch.where(active, new_dt, dt)
        n_steps += accept.long()
        n_rej += reject.long()
        active = active & ~(accept & lands)
        if hit is not None:
            active = active & ~hit
        stalled = stall_failure(
            active, t, dt, nonfinite_last, T_t, rtol, atol, "then solve without per_sample=True and " + STIFF_HINT
        )
        if stalled is not None:
            status, t_fail, message = stalled
            break
    reached = int(next_k.min()) if status != Status.SUCCESS else m
    res = IntegrationResult(
        out[:reached].reshape(reached, -1), status, message, t_fail, int(n_steps.max()), int(n_rej.max())
    )
    if records is not None:  # (no attempt at all: a single requested time, nothing to interpolate)
        res.segments = PerSampleDense(records, direction, T_t[:, 0], t) if records else []
    stats = {"n_steps": n_steps, "n_rejected": n_rej, "nfe": nfe, "calls": calls}
    return res, stats


def max_steps_failure(active, t, direction: float, T_t, n_steps, n_rej, max_num_steps: int) -> tuple:
    """``(Status.MAX_STEPS, t_fail, message)`` naming the active sample that got least far."""
    worst = int(torch.argmin(torch.where(active, direction * t, torch.full_like(t, math.inf))))
    t_fail = float(t[worst])
    message = _max_steps_message(
        max_num_steps, t_fail, float(T_t[worst, 0]), float(T_t[worst, -1]), int(n_steps[worst]), int(n_rej[worst])
    )
    return Status.MAX_STEPS, t_fail, message + f" (sample {worst} of the batch)"


def stall_failure(active, t, dt, nonfinite_last, T_t, rtol: float, atol: float, stiff_hint: str) -> tuple | None:
    """``(status, t_fail, message)`` where an active sample's step no longer moves its time (its steps kept
    producing NaN/Inf, or an underflow), else None."""
    tiny = active & ((t + dt == t) | (dt.abs() < 4 * np.finfo(np.float64).eps * t.abs()))
    if not bool(tiny.any()):
        return None
    worst = int(tiny.nonzero()[0])
    t_fail = float(t[worst])
    if bool(nonfinite_last[worst]):  # its steps kept producing NaN/Inf until the step size vanished
        message = (
            f"the state of sample {worst} of the batch became NaN or Inf just after t={t_fail:.10g}: every "
            "step from there produced non-finite values (func returned NaN/Inf, or the solution blows up there)"
        )
        if t_fail == float(T_t[worst, 0]):
            message += "; check that sample's y0 and func(t0, y0) for NaN/Inf"
        return Status.NONFINITE, t_fail, message
    message = (
        f"step size underflow at t={t_fail:.10g} for sample {worst} of the batch: its step fell to "
        f"{abs(float(dt[worst])):.3g} (rtol={rtol:g}, atol={atol:g}); the sample's solution may blow up there or its "
        "dynamics are stiff: " + stiff_hint
    )
    return Status.DT_UNDERFLOW, t_fail, message


def write_outputs(out, next_k, accept, t1, T_sorted, direction: float, values_of) -> torch.Tensor:
    """Write every output time an accepted attempt passed, all samples at once: indices ``next_k`` … up to
    ``t1``, values ``values_of(ks)`` (``(batch, M, d)``) into ``out`` (a spare last row takes the writes with
    nowhere to go); returns the new ``next_k``."""
    B, m = next_k.shape[0], out.shape[0] - 1
    upto = torch.searchsorted(T_sorted, (direction * t1)[:, None], right=True)[:, 0]
    count = torch.where(accept, upto - next_k, torch.zeros_like(upto)).clamp(min=0)
    M = int(count.max())
    if not M:
        return next_k
    ks = next_k[:, None] + torch.arange(M, device=next_k.device)
    valid = torch.arange(M, device=next_k.device) < count[:, None]
    out[torch.where(valid, ks, m), torch.arange(B, device=next_k.device)[:, None].expand(B, M)] = values_of(ks)
    return next_k + count


class _Coefficients:
    """A method's tableau as tensors of the state's dtype and device, for the per-sample loop and its replay."""

    def __init__(self, method: RungeKutta, dtype: torch.dtype, device: torch.device) -> None:
        tab = method.tableau
        self.S = tab.stages
        self.A = [torch.tensor(row, dtype=dtype, device=device) for row in tab.a]
        self.c = tab.c
        self.b = torch.tensor(tab.b, dtype=dtype, device=device)
        self.b_err = torch.tensor(tab.b_err, dtype=dtype, device=device)
        self.W = torch.from_numpy(method.W).to(dtype=dtype, device=device)  # (rows, degree)
        self.W64_t = torch.from_numpy(method.W.T.copy()).to(dtype=torch.float64, device=device)  # (degree, rows)
        self.rows_used = method.rows_used


def _stages(f, co: _Coefficients, t, y, dt_try, h, K, active, fsal: bool) -> torch.Tensor:
    """Stages 1 … S−1 of an attempt into ``K`` (``K[0]`` given); returns the attempt's end value."""
    B, d = y.shape
    yi = y
    for i in range(1, co.S):
        # y + h Σⱼ aᵢⱼ Kⱼ, per-sample h: one matrix-vector product over the stages' rows and one addcmul
        yi = torch.addcmul(y, h, torch.mv(K[:i].view(i, -1).t(), co.A[i]).view(B, d))
        K[i] = f(t + co.c[i] * dt_try, yi, active)
    return yi if fsal else y + h * torch.tensordot(co.b, K[: co.S], dims=1)


def _dense_values(co: _Coefficients, T_t, t, dt_try, y, h, K, ks) -> torch.Tensor:
    """The attempt's continuous extension at output times ``T_t[b, ks[b, j]]``: (B, M, d)."""
    m = T_t.shape[1]
    theta = ((T_t.gather(1, ks.clamp(max=m - 1)) - t[:, None]) / torch.where(dt_try == 0, 1.0, dt_try)[:, None]).clamp(
        0.0, 1.0
    )
    # θ, θ², …: a running product (a float power costs an exp and a log per entry)
    coef = torch.cumprod(theta[..., None].expand(-1, -1, co.W64_t.shape[0]), -1) @ co.W64_t  # (B, M, rows)
    interp = torch.einsum("bmr,rbd->bmd", coef.to(y.dtype), K[: co.rows_used])
    return y[:, None] + h[:, None] * interp


class Replay:
    """Attempts of :func:`integrate_per_sample` rebuilt from its ``trace`` records, differentiably in their start
    values (and ``func``'s parameters). ``replay(a)`` returns ``(y_next, values, ks, valid)`` for record ``a``:
    the state after the attempt (the end value where the sample accepted, the start value elsewhere) and the
    outputs the attempt wrote, ``values[b, j]`` at output ``ks[b, j]`` of sample ``b`` where ``valid[b, j]``
    (``values`` is None where it wrote none). The first stage is evaluated afresh at the start (the loop
    carried it over from the step before). Samples that did not accept are stepped with a zero step, so that a
    rejected attempt's NaN/Inf does not reach the gradient through a zero weight. ``backend``: a
    ``torch.compile`` backend for the attempt (its stages and outputs; autograd then runs their compiled
    backward too), or None; ``calls`` counts the batched evaluations of ``func``."""

    def __init__(self, func, shape: torch.Size, method: RungeKutta, t_out, trace: list, backend=None) -> None:
        self.trace = trace
        y = trace[0][2]
        dtype, device = y.dtype, y.device
        self.B = B = shape[0]
        rows = len(t_out) > 0 and isinstance(t_out[0], (list, tuple))
        self.T_t = torch.tensor(t_out if rows else [list(t_out)], dtype=torch.float64, device=device).expand(B, -1)
        d = 1.0 if float(self.T_t[0, -1]) >= float(self.T_t[0, 0]) else -1.0
        T_sorted = (d * self.T_t).contiguous()
        self.S1 = method.tableau.stages + (not method.fsal and method.interp_needs_f1)
        self.calls = 0
        # the outputs each attempt wrote (after its start time, up to its end time, where it accepted), for
        # every attempt at once: one host read
        t = torch.stack([r[0] for r in trace]).t().contiguous()  # (B, attempts)
        t1 = torch.stack([r[4] for r in trace]).t().contiguous()
        accept = torch.stack([r[3] for r in trace]).t()
        self.next_k = torch.searchsorted(T_sorted, d * t, right=True).t()  # (attempts, B)
        upto = torch.searchsorted(T_sorted, d * t1, right=True).t()
        self.count = torch.where(accept.t(), upto - self.next_k, torch.zeros_like(upto)).clamp(min=0)
        self.M = self.count.amax(1).tolist()
        self.fn = _replay_fn(func, method, shape, dtype, device)
        if backend:
            self.fn = _compiled(self.fn, func, method, shape, dtype, device, backend)

    def __call__(self, a: int, y: torch.Tensor) -> tuple:
        """Attempt ``a`` replayed from start values ``y`` (with ``requires_grad`` as the caller wants)."""
        t, dt_try, _, accept, t1 = self.trace[a]
        dt = torch.where(accept, dt_try, torch.zeros_like(dt_try))
        self.calls += self.S1
        M = self.M[a]
        # (padded to a power of two, so that a compiled replay sees few output shapes)
        Mp = 1 << (M - 1).bit_length() if M else 0
        ar = torch.arange(Mp, device=y.device)
        ks = self.next_k[a][:, None] + ar
        y_next, values = self.fn(t, dt, y, accept, t1, self.T_t, ks)
        if not M:
            return y_next, None, None, None
        return y_next, values, ks, ar < self.count[a][:, None]


def _stage_list(F, A: list, c: list, t, dt, y, K: list) -> torch.Tensor:
    """Stages 1 … S−1 appended to ``K`` (``[K₀]`` given), as plain tensor arithmetic for ``torch.compile``
    (``A``, ``c``: the tableau as Python floats); returns the last stage's input."""
    h = dt.to(y.dtype)[:, None]
    yi = y
    for i in range(1, len(c)):
        acc = combo(A[i][:i], K)
        yi = y if acc is None else y + h * acc
        K.append(F(t + c[i] * dt, yi))
    return yi


def _replay_fn(func, method: RungeKutta, shape: torch.Size, dtype, device):
    """One attempt as a function ``(t, dt, y, accept, t1, T_t, ks) -> (y_next, values at T_t[b, ks[b, j]])``."""
    tab = method.tableau
    A, c, b, _ = tableau_floats(tab)
    needs_f1 = not method.fsal and method.interp_needs_f1
    co = _Coefficients(method, dtype, device)
    B = shape[0]

    def replay_attempt(t, dt, y, accept, t1, T_t, ks):
        def F(t64, yy):
            return func(t64.to(yy.dtype), yy.view(shape)).reshape(B, -1)

        K = [F(t, y)]
        y1 = _stage_list(F, A, c, t, dt, y, K)
        h = dt.to(y.dtype)[:, None]
        if not method.fsal:
            y1 = y + h * combo(b, K)
        if needs_f1:
            K.append(F(t1, y1))
        y_next = torch.where(accept[:, None], y1, y)
        if ks.shape[1] == 0:
            return y_next, None
        return y_next, _dense_values(co, T_t, t, dt, y, h, torch.stack(K[: co.rows_used]), ks)

    return replay_attempt


def _attempt_fn(func, method: RungeKutta, shape: torch.Size, rtol: float, atol: float):
    """An attempt of the per-sample loop as one function ``(t, dt, y, k0) -> (y1, K, ratio)``: the stages
    (``K`` stacked, ``K[0] = k0``), the end value and each sample's error ratio (not differentiated), as the
    eager loop computes them."""
    tab = method.tableau
    A, c, b, b_err = tableau_floats(tab)
    fsal = method.fsal
    B, d = shape[0], math.prod(shape[1:])
    tol_shift, inv_rtol, inv_sqrt_d = atol / rtol, 1.0 / rtol, 1.0 / math.sqrt(max(d, 1))

    def attempt(t, dt, y, k0):
        K = [k0]
        y1 = _stage_list(lambda tt, yy: func(tt.to(y.dtype), yy.view(shape)).reshape(B, d), A, c, t, dt, y, K)
        if not fsal:
            y1 = y + dt.to(y.dtype)[:, None] * combo(b, K)
        with torch.no_grad():
            e = combo(b_err, K)
            scale = torch.maximum(y.abs(), y1.abs()) + tol_shift
            ratio = dt.abs() * (torch.linalg.vector_norm(e / scale, dim=1) * inv_sqrt_d).double() * inv_rtol
        return y1, torch.stack(K), ratio

    return attempt


def compiled_attempt(func, method: RungeKutta, shape: torch.Size, dtype, device, backend: str, rtol, atol):
    """:func:`_attempt_fn` through ``torch.compile`` (cached per func and tolerances), for
    ``integrate_per_sample(step_fn=...)``; the eager function where compiling fails (with a one-line
    warning)."""
    fn = _attempt_fn(func, method, shape, rtol, atol)
    return _compiled(fn, func, method, shape, dtype, device, backend, ("attempt", rtol, atol))


_REPLAY_CACHE = CompileCache("per_sample_step", 32)


def _compiled(fn, func, method: RungeKutta, shape: torch.Size, dtype, device, backend: str, kind: tuple = ("replay",)):
    """``fn`` (``_replay_fn``'s or ``_attempt_fn``'s) through ``torch.compile``, cached per func; the eager
    ``fn`` where compiling fails (with a one-line warning)."""
    from ..compiled.small_gemm import backend_for
    from ..compiled.step import _warn_once, fresh_code

    key = (id(func), id(method.tableau), tuple(shape), dtype, str(device), backend, kind)
    hit = _REPLAY_CACHE.get(key, func, method.tableau)
    if hit is not None:
        compiled = hit
    else:
        compiled = torch.compile(fresh_code(fn), backend=backend_for(backend, device), dynamic=False)
        _REPLAY_CACHE.put(key, compiled, func, method.tableau)

    def call(*args):
        try:
            return compiled(*args)
        except Exception as exc:  # pragma: no cover - depends on the platform's compiler
            _warn_once(f"compile=True: the per-sample steps run eagerly ({type(exc).__name__}: {exc})")
            _REPLAY_CACHE.pop(key, None)
            return fn(*args)

    return call


class PerSampleDense:
    """Dense output of a per-sample solve: every attempted step's continuous extension, per sample.

    ``records`` holds per attempt (start times (B,), steps (B,), start values (B, d), the extension's
    coefficients Q (B, degree, d) with y(t0 + θh) = y0 + Σ_p h θ^(p+1) Q_p, times after the attempt (B,)); a
    rejected or finished sample's time does not move, so for each sample the times after the attempts never
    decrease and the first attempt whose end reaches a time is the accepted step over it. Evaluated by the
    compiled loop's ``runge_kutta.interpolate_records``, which reads its records the same way."""

    def __init__(self, records: list, direction: float, start, stop) -> None:
        self.t0 = torch.stack([r[0] for r in records])  # (A, B) float64
        self.h = torch.stack([r[1] for r in records])
        self.y = torch.stack([r[2] for r in records])  # (A, B, d)
        self.Q = torch.stack([r[3] for r in records])  # (A, B, degree, d)
        self.after = torch.stack([r[4] for r in records])  # (A, B)
        self.direction = direction
        self.start, self.stop = start.clone(), stop.clone()  # each sample's solved interval

    @classmethod
    def from_calls(cls, calls: list, direction: float, start: torch.Tensor) -> "PerSampleDense":
        """From the compiled loop's records (``compiled.loop.integrate_device_loop(keep=...)``: per call, stacks
        over its attempts); each group's solved interval runs from ``start`` to its time after the last."""
        self = cls.__new__(cls)
        self.t0, self.h, self.y, self.Q, self.after = (torch.cat([c[i] for c in calls]) for i in range(5))
        self.direction = direction
        self.start, self.stop = start.clone(), self.after[-1].clone()
        return self

    def __call__(self, t_new) -> torch.Tensor:
        """The solution at ``t_new`` ((K,) for every sample, or (B, K) each its own) as (K, B, d)."""
        B = self.t0.shape[1]
        dev = self.t0.device
        T = torch.as_tensor(t_new, dtype=torch.float64).detach().to(dev)
        T = T.reshape(1, -1).expand(B, -1) if T.ndim <= 1 else T
        if T.ndim != 2 or T.shape[0] != B:
            raise ValueError(
                f"`t_new` must be 1-D (times for every sample) or of shape ({B}, K) (each sample its own), got "
                f"shape {tuple(torch.as_tensor(t_new).shape)}"
            )
        lo, hi = torch.minimum(self.start, self.stop), torch.maximum(self.start, self.stop)
        outside = (T < lo[:, None]) | (T > hi[:, None]) | ~torch.isfinite(T)
        if bool(outside.any()):
            b, k = (int(v) for v in outside.nonzero()[0])
            whose = f" for sample {b}, outside its" if B > 1 else ", outside the"
            raise ValueError(f"`t_new` holds {float(T[b, k])}{whose} solved interval [{float(lo[b])}, {float(hi[b])}]")
        d = self.direction
        keys = (d * self.after).t().contiguous()  # (B, A), non-decreasing
        a = torch.searchsorted(keys, (d * T).contiguous()).clamp(max=self.t0.shape[0] - 1).t()  # (K, B)
        return interpolate_records(a, self.t0, self.h, self.y, self.Q, T.t())


class PerSampleEvents:
    """Each sample's first zero crossing of ``event_fn(t (batch,), y (batch, ...))``, whose output has the
    samples along dimension 0 (``(batch,)`` or ``(batch, k)``: several event functions, each made positive at
    the start, the event when the smallest reaches zero, as in the joint solver). Found by the Illinois method
    on the crossing step's continuous extension, all crossing samples at once. Row ``b`` of ``event_fn``'s
    output must depend on sample ``b`` only."""

    MAX_ITERS = 200

    def __init__(self, event_fn, shape: torch.Size, t0: torch.Tensor, y0: torch.Tensor, tol: float = 0.0) -> None:
        self.event_fn, self.shape, self.tol = event_fn, shape, tol
        B = shape[0]
        with torch.no_grad():
            g0 = self._raw(t0, y0)
        self.sign0 = torch.sign(g0)
        zero = (self.sign0 == 0).any(1)
        if bool(zero.any()):
            b = int(zero.nonzero()[0])
            raise ValueError(
                f"`event_fn` is exactly zero at the initial time t0={float(t0[b])} for sample {b}; start away from "
                "the event"
            )
        self.found = torch.zeros(B, dtype=torch.bool, device=y0.device)
        self.t_event = torch.full((B,), math.nan, dtype=torch.float64, device=y0.device)
        self.y_event = torch.zeros_like(y0)

    def _raw(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        B = self.shape[0]
        g = self.event_fn(t.to(y.dtype), y.view(self.shape))
        if not torch.is_tensor(g):
            raise TypeError(f"`event_fn` must return a tensor, got {type(g).__name__}")
        if g.ndim == 0 or g.shape[0] != B:
            raise ValueError(
                f"with per_sample=True, `event_fn` must return one row per sample, shape ({B},) or ({B}, k); got "
                f"shape {tuple(g.shape)}"
            )
        return g.reshape(B, -1)

    def value(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return (self._raw(t, y) * self.sign0).min(1).values.double()

    def check(self, t, h, y, Q, t1, y1, accept) -> torch.Tensor:
        """The samples whose accepted step ``t → t + h`` (extension ``y + Σ_p h θ^(p+1) Q_p``) crosses their
        event; their event times and states go to ``t_event`` and ``y_event``."""
        g1 = self.value(t1, y1)
        hit = accept & (g1 <= 0) & ~self.found
        if not bool(hit.any()):
            return hit
        hd = h.to(y.dtype)[:, None]

        def at(theta: torch.Tensor) -> torch.Tensor:  # the extension at θ ∈ [0, 1], every sample
            th = torch.cumprod(theta[:, None].expand(-1, Q.shape[1]), -1).to(y.dtype)  # θ, θ², …
            return y + hd * torch.einsum("bp,bpd->bd", th, Q)

        a, b = torch.zeros_like(h), torch.ones_like(h)  # bracket in θ, g(a) > 0 >= g(b)
        ga, gb = self.value(t, y), g1
        side = torch.zeros_like(h)
        span = h.abs()
        tol = self.tol if self.tol > 0 else None
        for _ in range(self.MAX_ITERS):
            width = (b - a) * span
            limit = tol if tol is not None else 4 * np.finfo(np.float64).eps * torch.maximum(t.abs(), t1.abs())
            todo = hit & (gb != 0) & (width > limit)
            if not bool(todo.any()):
                break
            m = torch.where(ga != gb, b - gb * (b - a) / (gb - ga), 0.5 * (a + b))
            m = torch.where((m > a) & (m < b), m, 0.5 * (a + b))
            gm = self.value(t + m * h, at(m))
            right = todo & (gm > 0)  # the root lies in [m, b]
            left = todo & ~(gm > 0)
            gb = torch.where(right & (side == -1), 0.5 * gb, gb)  # Illinois: halve the stale end's value
            ga = torch.where(left & (side == 1), 0.5 * ga, ga)
            a, ga = torch.where(right, m, a), torch.where(right, gm, ga)
            b, gb = torch.where(left, m, b), torch.where(left, gm, gb)
            side = torch.where(right, -1.0, torch.where(left, 1.0, side))
        t_ev = torch.where(b == 1, t1, t + b * h)
        y_ev = torch.where((b == 1)[:, None], y1, at(b))
        self.t_event = torch.where(hit, t_ev, self.t_event)
        self.y_event = torch.where(hit[:, None], y_ev, self.y_event)
        self.found = self.found | hit
        return hit
