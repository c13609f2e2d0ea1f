"""A compiled adaptive step: all stages, the error estimate and the error norm fused by ``torch.compile``.

The Python loop stays as it is (one host read per step: the error ratio, for accept/reject); time and step size
enter the compiled function as 0-d tensors, so a new step size never recompiles. Compiled steps are cached per
(func, method, shape, dtype, device, backend). This path serves solves with a graph (backprop through the
compiled step; checkpointed gradients rebuild each recorded step through it too); solves without gradients,
the checkpoint's forward solve included, run in ``compiled.loop``. Tensor states and scalar tolerances only; anything
else, or a failure to compile, falls back to the eager path with a one-line warning.
"""

from __future__ import annotations

import math
import types
from typing import Callable, Sequence

import torch

from .._errors import Status
from ..solvers.control import StepController, initial_step
from ..solvers.integrate import IntegrationResult, Outputs, _max_steps_message, _underflow, _underflow_message
from ..solvers.runge_kutta import RungeKutta, Segment, tableau_floats
from .cache import _WARNED, CompileCache, warn_fallback
from .small_gemm import backend_for

__all__ = ["integrate_compiled", "compiled_step"]

_CACHE = CompileCache("fused_step", 64)
_WARNED = _WARNED  # (the set of messages already warned about; tests reset it)
_SERIAL = 0


def _make_step(func: Callable, method: RungeKutta, shape: torch.Size, dtype: torch.dtype, device: torch.device):
    tab = method.tableau
    S = tab.stages
    A, c, b, b_err = tableau_floats(tab)
    fsal = method.fsal

    def step(t: torch.Tensor, dt: torch.Tensor, y: torch.Tensor, k0: torch.Tensor, tol_shift: float, inv_rtol: float):
        K = [k0]
        yi = y
        for i in range(1, S):
            acc = A[i][0] * K[0]
            for j in range(1, i):
                if A[i][j] != 0.0:
                    acc = acc + A[i][j] * K[j]
            yi = y + dt * acc
            K.append(func(t + c[i] * dt, yi.view(shape)).reshape(y.shape))
        if fsal:
            y1 = yi
        else:
            acc = b[0] * K[0]
            for j in range(1, S):
                if b[j] != 0.0:
                    acc = acc + b[j] * K[j]
            y1 = y + dt * acc
        e = b_err[0] * K[0]
        for j in range(1, S):
            if b_err[j] != 0.0:
                e = e + b_err[j] * K[j]
        scale = torch.maximum(y.abs(), y1.abs()) + tol_shift
        with torch.no_grad():  # step-size control is not differentiated
            ratio = dt.abs() * torch.linalg.vector_norm(e / scale) / math.sqrt(y.numel()) * inv_rtol
        return y1, torch.stack(K), ratio

    return step


def fresh_code(fn: Callable) -> Callable:
    """``fn`` with a code object of its own. torch.compile keeps its cache (and counts recompilations, up to
    ``recompile_limit``, after which it silently runs eagerly) per code object; every closure made by one
    factory shares that object, so each compiled solver gets its own copy."""
    global _SERIAL
    _SERIAL += 1
    name = f"{fn.__name__}_{_SERIAL}"
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def compiled_step(func, method: RungeKutta, shape, dtype, device, backend: str):
    key = (id(func), id(method.tableau), tuple(shape), dtype, str(device), backend)
    hit = _CACHE.get(key, func, method.tableau)
    if hit is not None:
        return hit
    step = fresh_code(_make_step(func, method, torch.Size(shape), dtype, device))
    fn = torch.compile(step, backend=backend_for(backend, device), dynamic=False)
    return _CACHE.put(key, fn, func, method.tableau)


def integrate_compiled(
    rhs,
    y0: torch.Tensor,
    t_out: Sequence[float],
    method: RungeKutta,
    ctrl: StepController,
    *,
    rtol: float,
    atol: float,
    first_step: float | None,
    max_num_steps: int,
    backend: str = "inductor",
    trace: list | None = None,
    keep_segments: bool = False,
) -> IntegrationResult | None:
    """The adaptive loop around a compiled step; ``None`` when compilation is unavailable (the caller then runs
    the eager loop)."""
    shape = rhs.buffer_shape
    try:
        step = compiled_step(rhs.func, method, shape, rhs.dtype, rhs.device, backend)
    except Exception as exc:  # pragma: no cover - depends on the platform's compiler
        _warn_once(f"compile=True: torch.compile is unavailable ({type(exc).__name__}); using the eager solver")
        return None
    t = float(t_out[0])
    t_end = float(t_out[-1])
    direction = 1.0 if t_end >= t else -1.0
    out = Outputs(t_out, direction, y0, keep_segments, None)
    if t_end == t:
        return IntegrationResult(out.result(), Status.SUCCESS, segments=out.segments)
    dtype, device = rhs.dtype, rhs.device
    tt = lambda s: torch.scalar_tensor(s, dtype=dtype, device=device)  # noqa: E731
    y = y0
    f0 = rhs.at(t, y)
    if first_step is None:
        with torch.no_grad():
            dt, _ = initial_step(
                rhs.at,
                t,
                y,
                f0,
                direction,
                method.tableau.order,
                rtol,
                atol,
                lambda x: float(torch.linalg.vector_norm(x)) / math.sqrt(max(rhs.n, 1)),
            )
    else:
        dt = direction * abs(float(first_step))
    dt = math.copysign(min(max(abs(dt), ctrl.min_step), ctrl.max_step), direction)
    tol_shift, inv_rtol = atol / rtol, 1.0 / rtol
    n_steps = n_rej = 0
    status, message, t_fail = Status.SUCCESS, "", None
    k0 = f0
    try:
        while True:
            if n_steps + n_rej >= max_num_steps:
                status, t_fail = Status.MAX_STEPS, t
                message = _max_steps_message(max_num_steps, t, float(t_out[0]), t_end, n_steps, n_rej)
                break
            if _underflow(t, dt, ctrl.min_step):
                status, t_fail = Status.DT_UNDERFLOW, t
                message = _underflow_message(t, dt, ctrl.min_step, rtol, atol)
                break
            lands = direction * (t + dt - t_end) >= 0
            dt_try = t_end - t if lands else dt
            y1, K, ratio_t = step(tt(t), tt(dt_try), y, k0, tol_shift, inv_rtol)
            ratio = float(ratio_t)  # the loop's one host read per step
            rhs.nfe += method.stages - 1
            # (a step at options['min_step'] is accepted whatever its error, as in the eager loop)
            if ratio <= 1.0 or (abs(dt_try) <= ctrl.min_step and math.isfinite(ratio)):
                t1 = t_end if lands else t + dt_try
                n_steps += 1
                if trace is not None:  # checkpointed gradients: enough to recompute this step exactly
                    trace.append((t, t1, y, False, False))
                rows = K if method.fsal else torch.cat([K, rhs.at(t1, y1)[None]]) if method.interp_needs_f1 else K
                done = out.add(Segment(t, t1, y, y1, rows, method))
                dt = ctrl.next_step(dt_try, ratio, True)
                if done or lands:
                    break
                k0 = K[-1] if method.fsal else (rows[-1] if method.interp_needs_f1 else rhs.at(t1, y1))
                y, t = y1, t1
            else:
                n_rej += 1
                dt = dt_try * ctrl.dfactor if not math.isfinite(ratio) else ctrl.next_step(dt_try, ratio, False)
    except Exception as exc:  # pragma: no cover - a backend that compiles lazily may fail on the first call
        _warn_once(f"compile=True: the compiled step failed ({type(exc).__name__}: {exc}); using the eager solver")
        return None
    res = IntegrationResult(out.result(), status, message, t_fail, n_steps, n_rej, out.segments)
    res.next_step = dt
    return res


_warn_once = warn_fallback
