"""Input checking and normalisation at the public boundary.

Everything the user passes is checked once here, with messages that name the argument, and turned into
one :class:`Problem`: a flat state, float times, a method and its validated options. The solver core then
sees one tensor and never re-checks.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch

from ._amp import caller_autocast, under_autocast
from ._errors import caller_stacklevel
from ._methods import DEFAULT_MAX_NUM_STEPS, RunContext, get_method, make_controller
from .solvers.integrate import (
    RHS,
    VMAP_MESSAGE,
    EventGrid,
    EventLocator,
    IntegrationResult,
    block_rms_max,
    is_vmapped,
    warn_uncalled_callbacks,
)

__all__ = ["Problem", "prepare", "run"]


def check_method(method: Any, name: str = "method") -> str:
    """``method`` if it names a registered method, else an error naming the argument and the valid names."""
    return get_method(method, name).name


def valid_options(method: str) -> frozenset:
    return get_method(method).options


@dataclasses.dataclass
class Problem:
    """A normalised initial value problem."""

    func: Callable
    y0: torch.Tensor  # flat
    t: torch.Tensor  # as given: 1-D, or (batch, m) for per-sample times
    t_out: list  # floats; per-sample times: one list per sample
    method: str
    options: dict
    rtol: float | torch.Tensor
    atol: float | torch.Tensor
    shapes: list[torch.Size] | None  # tuple state: shapes of the entries; None for a single tensor
    shape: torch.Size  # single-tensor state shape
    norm: Callable | None = None  # on the flat scaled error, returns a 0-d tensor; None: RMS
    event_fn: Callable | None = None

    @property
    def is_tuple(self) -> bool:
        return self.shapes is not None

    def unflatten(self, y: torch.Tensor):
        """Flat state (``(..., N)``) to the user's layout."""
        lead = y.shape[:-1]
        if self.shapes is None:
            return y.view(lead + self.shape)  # (torch.Size concatenation: 0-d shapes too)
        out, i = [], 0
        for s in self.shapes:
            n = math.prod(s)
            out.append(y[..., i : i + n].view(lead + s))
            i += n
        return tuple(out)

    def rhs(self, func: Callable | None = None) -> RHS:
        return RHS(
            self.func if func is None else func,
            self.shape if self.shapes is None else torch.Size([self.y0.numel()]),
            self.y0.dtype,
            self.y0.device,
            unflatten=self.unflatten if self.shapes is not None else None,
        )


def _check_t(t: Any, per_sample: bool = False, shape: torch.Size | None = None) -> tuple[torch.Tensor, list]:
    """``t`` as a tensor and as Python floats. 1-D; with ``per_sample`` also ``(batch, m)``: every sample its own
    times (a list of rows), all rows in the same direction."""
    if not torch.is_tensor(t):
        try:
            t = torch.as_tensor(t, dtype=torch.float64)
        except Exception as exc:  # noqa: BLE001
            raise TypeError(f"`t` must be a 1-D tensor of times, got {type(t).__name__}") from exc
    if t.ndim == 2 and per_sample:
        return t, _check_t_rows(t, shape)
    if t.ndim != 1:
        hint = (
            "; per-sample output times, shape (batch, len), need solve(..., per_sample=True)"
            if t.ndim == 2 and not per_sample
            else ""
        )
        raise ValueError(f"`t` must be 1-D (a sequence of times), got shape {tuple(t.shape)}{hint}")
    if not torch.is_floating_point(t):
        raise TypeError(f"`t` must be a floating point tensor, got dtype {t.dtype}; use e.g. t.double()")
    if len(t) == 0:
        raise ValueError("`t` is empty: give at least the initial time")
    ts = t.detach().tolist()  # exact Python floats for every floating dtype (no float64 copy needed)
    check_times(ts, "t")
    return t, ts


def _check_t_rows(t: torch.Tensor, shape: torch.Size | None) -> list[list[float]]:
    """Per-sample times ``(batch, m)``: one row per sample of ``y0``, each finite and strictly monotonic, all in
    the same direction."""
    if not torch.is_floating_point(t):
        raise TypeError(f"`t` must be a floating point tensor, got dtype {t.dtype}; use e.g. t.double()")
    if shape is None or len(shape) < 1 or t.shape[0] != shape[0]:
        got = "a tuple state" if shape is None else f"y0 of shape {tuple(shape)}"
        raise ValueError(
            f"per-sample times `t` of shape {tuple(t.shape)} need one row per sample: a tensor y0 of shape "
            f"({t.shape[0]}, ...); got {got}"
        )
    if t.shape[1] == 0:
        raise ValueError("`t` has no times: give at least the initial time of each sample")
    rows = t.detach().tolist()
    for b, row in enumerate(rows):
        check_times(row, f"t[{b}]")
    if t.shape[1] > 1:
        up = [row[1] > row[0] for row in rows]
        if any(u != up[0] for u in up):
            b = up.index(not up[0])
            raise ValueError(
                "the rows of per-sample times `t` must all increase or all decrease; t[0] "
                f"{'increases' if up[0] else 'decreases'} but t[{b}] does not"
            )
    return rows


def check_times(ts: Sequence[float], name: str) -> None:
    """Finite and strictly monotonic, or a ValueError naming the first offending entry."""
    for i, x in enumerate(ts):
        if not math.isfinite(x):
            raise ValueError(f"`{name}` must be finite; {name}[{i}] = {x}")
    if len(ts) > 1:
        sign = 1.0 if ts[1] > ts[0] else -1.0
        for i in range(1, len(ts)):
            if (ts[i] - ts[i - 1]) * sign <= 0:
                raise ValueError(
                    f"`{name}` must be strictly increasing or strictly decreasing; "
                    f"{name}[{i}] = {ts[i]:.17g} follows {name}[{i - 1}] = {ts[i - 1]:.17g}"
                )


def _check_y0(y0: Any) -> tuple[torch.Tensor, list | None, torch.Size]:
    if isinstance(y0, (tuple, list)):
        if len(y0) == 0:
            raise ValueError("`y0` is an empty tuple")
        for i, yi in enumerate(y0):
            if not torch.is_tensor(yi):
                raise TypeError(f"`y0[{i}]` must be a tensor, got {type(yi).__name__}")
            if not torch.is_floating_point(yi):
                raise TypeError(f"`y0[{i}]` must be floating point, got {yi.dtype}")
            if yi.dtype != y0[0].dtype:
                raise TypeError(
                    f"all entries of the tuple `y0` must share a dtype: y0[0] is {y0[0].dtype}, y0[{i}] is {yi.dtype}"
                )
            if yi.device != y0[0].device:
                raise ValueError(
                    f"all entries of the tuple `y0` must be on one device: y0[0] is on "
                    f"{y0[0].device}, y0[{i}] on {yi.device}"
                )
        shapes = [yi.shape for yi in y0]
        flat = torch.cat([yi.reshape(-1) for yi in y0])
        return flat, shapes, torch.Size([flat.numel()])
    if not torch.is_tensor(y0):
        raise TypeError(f"`y0` must be a tensor or a tuple of tensors, got {type(y0).__name__}")
    if not torch.is_floating_point(y0):
        raise TypeError(f"`y0` must be a floating point tensor, got dtype {y0.dtype}; use e.g. y0.float()")
    return y0.reshape(-1), None, y0.shape


def _check_tol(name: str, tol: Any, y0: torch.Tensor, shapes, shape) -> float | torch.Tensor:
    if isinstance(tol, (tuple, list)) and shapes is not None:
        if len(tol) != len(shapes):
            raise ValueError(f"`{name}` has {len(tol)} entries but the tuple `y0` has {len(shapes)}")
        parts = [
            torch.as_tensor(x, dtype=y0.dtype, device=y0.device).expand(s).reshape(-1) for x, s in zip(tol, shapes)
        ]
        tol = torch.cat(parts)
    if torch.is_tensor(tol):
        tol = tol.detach().to(device=y0.device, dtype=y0.dtype)
        if tol.numel() == 1:
            tol = float(tol)
        else:
            target = shape if shapes is None else torch.Size([y0.numel()])
            try:
                tol = tol.expand(target).reshape(-1).contiguous()
            except RuntimeError as exc:
                raise ValueError(
                    f"`{name}` of shape {tuple(tol.shape)} does not broadcast to the state's shape {tuple(target)}"
                ) from exc
            if bool((tol < 0).any()) or not bool(torch.isfinite(tol).all()):
                raise ValueError(f"`{name}` must be finite and non-negative")
            return tol
    if isinstance(tol, (str, bytes, bool)):  # (float("1e-6") would parse; a typo should not)
        raise TypeError(f"`{name}` must be a float or a tensor, got {type(tol).__name__} {tol!r}; e.g. {name}=1e-6")
    try:
        tol = float(tol)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"`{name}` must be a float or a tensor, got {type(tol).__name__}") from exc
    if not (tol >= 0 and math.isfinite(tol)):
        raise ValueError(f"`{name}` must be finite and non-negative, got {tol}")
    return tol


_RTOL_WARNED: set = set()


def warn_unresolvable_rtol(rtol: Any, dtype: torch.dtype) -> None:
    """Warn once per dtype when ``rtol`` asks for more than ``dtype`` resolves (its unit roundoff, half the
    machine epsilon): rounding then dominates the error estimate, and the solve takes many more steps (float32
    at rtol 1e-12: ~24k evaluations of an oscillator that rtol 1e-7 solves in ~600) for no gain in accuracy."""
    if dtype in _RTOL_WARNED or dtype.is_complex or not dtype.is_floating_point:
        return
    try:
        r = (
            float(rtol.min())
            if torch.is_tensor(rtol)
            else min(float(x) for x in rtol)
            if isinstance(rtol, (tuple, list))
            else float(rtol)
        )
    except (TypeError, ValueError, RuntimeError):
        return  # (the tolerance checks say what is wrong)
    u = torch.finfo(dtype).eps / 2
    if 0 < r < u:
        _RTOL_WARNED.add(dtype)
        warnings.warn(
            f"rtol={r:g} is below what {dtype} resolves (unit roundoff {u:.2g}): rounding errors then dominate "
            f"the error estimate and the solve takes far more steps for no gain in accuracy. Pass rtol >= {u:.1g}, "
            "or a state of a wider dtype (e.g. y0.double()).",
            stacklevel=caller_stacklevel(),
        )


def prepare(
    func: Callable,
    y0: Any,
    t: Any,
    rtol: Any,
    atol: Any,
    method: str | None,
    options: dict | None,
    event_fn: Callable | None = None,
    per_sample: bool = False,
) -> Problem:
    if not callable(func):
        raise TypeError(f"`func` must be callable as func(t, y), got {type(func).__name__}")
    flat, shapes, shape = _check_y0(y0)
    if is_vmapped(flat) or (torch.is_tensor(t) and is_vmapped(t)):
        raise RuntimeError(VMAP_MESSAGE)
    amp_dtype = caller_autocast(flat.device.type)
    if amp_dtype is not None:  # func under the caller's autocast, the solver in the state's dtype (_amp)
        func = under_autocast(func, flat.device.type, amp_dtype, flat.dtype)
    t, t_list = _check_t(t, per_sample, shape if shapes is None else None)
    method = "dopri5" if method is None else check_method(method)
    options = check_options(options, "options")
    unknown = set(options) - valid_options(method)
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; valid options: {sorted(valid_options(method))}"
        )
    if "dtype" in options and options["dtype"] not in (torch.float32, torch.float64):
        raise ValueError(
            f"option `dtype` (the dtype of times) must be torch.float32 or torch.float64, got {options['dtype']!r}"
        )
    check_option_values(method, options)
    rtol_ = _check_tol("rtol", rtol, flat, shapes, shape)
    warn_unresolvable_rtol(rtol_, flat.dtype)
    atol_ = _check_tol("atol", atol, flat, shapes, shape)
    if (
        isinstance(rtol_, float)
        and isinstance(atol_, float)
        and rtol_ == 0
        and atol_ == 0
        and get_method(method).adaptive
        and method != "scipy_solver"
    ):
        raise ValueError("`rtol` and `atol` are both zero: no step could ever be accepted")
    t_out = (
        t_list
        if options.get("dtype", torch.float64) == torch.float64
        else torch.tensor(t_list, dtype=options["dtype"]).double().tolist()
    )
    prob = Problem(func, flat, t, t_out, method, options, rtol_, atol_, shapes, shape, event_fn=event_fn)
    prob.norm = _make_norm(options.get("norm"), prob)
    return prob


def check_options(options: Any, name: str) -> dict:
    """A copy of ``options`` (None: empty), which must be a mapping with string keys."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise TypeError(
            f"`{name}` must be a dict of option names to values (e.g. {name}=dict(first_step=0.1)), "
            f"got {type(options).__name__}"
        )
    bad = [k for k in options if not isinstance(k, str)]
    if bad:
        raise TypeError(f"the keys of `{name}` must be option names (strings), got {bad[0]!r}")
    return dict(options)


#: values the string options take (scipy_solver's `solver`: the methods of scipy.integrate.solve_ivp)
_CHOICES = {
    "interp": ("linear", "cubic"),
    "jacobian": ("batched", "dense"),
    "solver": ("RK45", "RK23", "DOP853", "Radau", "BDF", "LSODA"),
}


def check_option_values(method: str, options: dict, name: str = "options") -> None:
    """Every option's value, checked before the solve starts (not halfway through it, or a backward pass),
    with a message naming the option."""

    def fail(key: str, expected: str) -> None:
        raise ValueError(f"{name}[{key!r}] must be {expected}, got {options[key]!r}")

    def number(key: str) -> float | None:
        v = options.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not (isinstance(v, (int, float)) or (torch.is_tensor(v) and v.numel() == 1)):
            raise TypeError(f"{name}[{key!r}] must be a number, got {type(v).__name__}")
        return float(v)

    for key, allowed in _CHOICES.items():
        if key in options and options[key] not in allowed:
            fail(key, "one of " + ", ".join(repr(a) for a in allowed))
    first = number("first_step")
    if first is not None and not (first > 0 and math.isfinite(first)):
        fail("first_step", "a positive finite step size (the direction of integration follows t)")
    step = number("step_size")
    if step is not None and not (step > 0 and math.isfinite(step)):
        fail("step_size", "a positive finite step size (the direction of integration follows t)")
    for key in ("newton_tol", "event_tol", "min_step"):
        v = number(key)
        if v is not None and not (v >= 0 and math.isfinite(v)):
            fail(key, "a non-negative finite number")
    v = number("max_step")
    if v is not None and not v > 0:
        fail("max_step", "a positive number (math.inf for no limit)")
    for key in ("max_num_steps", "max_order", "max_iters"):
        v = options.get(key)
        if v is None:
            continue
        try:
            ok = not isinstance(v, bool) and float(v).is_integer() and v >= 1
        except (TypeError, ValueError, OverflowError, RuntimeError):
            ok = False
        if not ok:
            hint = " (it bounds the attempted steps; a solve that needs more raises MaxStepsError)"
            fail(key, "a positive integer" + (hint if key == "max_num_steps" else ""))
    if "perturb" in options and not isinstance(options["perturb"], bool):
        fail("perturb", "True or False")
    if "grid_constructor" in options and not callable(options["grid_constructor"]):
        fail("grid_constructor", "a callable grid_constructor(func, y0, t) returning the grid")
    if "compile" in options and not isinstance(options["compile"], (bool, str)):
        fail("compile", "True, False or a torch.compile backend name")
    if "safety" in valid_options(method):
        make_controller(1, options)  # safety, ifactor, dfactor, pcoeff, icoeff, min_step <= max_step


def _make_norm(norm: Any, prob: Problem) -> Callable | None:
    if norm is None:
        if prob.shapes is None or len(prob.shapes) == 1:
            return None
        # torchdiffeq's default for tuples: the largest of the entries' RMS norms
        return block_rms_max([math.prod(s) for s in prob.shapes], prob.y0.device)
    if isinstance(norm, str):
        raise ValueError(
            f"option `norm` must be a callable here, got the string {norm!r} "
            "('seminorm' is an adjoint option: adjoint_options=dict(norm='seminorm'))"
        )
    if not callable(norm):
        raise TypeError(f"option `norm` must be callable on the (scaled) error, got {type(norm).__name__}")

    def user(x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(norm(prob.unflatten(x)))

    return user


def make_grid(prob: Problem, t_out: Sequence[float], opts: dict) -> list[float]:
    step_size, ctor = opts.get("step_size"), opts.get("grid_constructor")
    if step_size is not None and ctor is not None:
        raise ValueError("options `step_size` and `grid_constructor` are mutually exclusive; give one of them")
    t0, t1 = t_out[0], t_out[-1]
    if step_size is not None:
        h = float(step_size)
        if not (h > 0 and math.isfinite(h)):
            raise ValueError(f"option `step_size` must be a positive number, got {step_size!r}")
        d = 1.0 if t1 >= t0 else -1.0
        n = max(1, math.ceil(abs(t1 - t0) / h - 1e-12))
        grid = [t0 + d * h * i for i in range(n)] + [t1]
        return grid
    if ctor is not None:
        # (the adjoint's backward solve asks for each interval, from its end to its start, as torchdiffeq does)
        t_arg = prob.t if t_out is prob.t_out else torch.tensor([t0, t1], dtype=prob.t.dtype, device=prob.t.device)
        g = ctor(prob.func, prob.unflatten(prob.y0), t_arg)
        g = _check_t(g)[1]
        if g[0] != t0 or g[-1] != t1:
            raise ValueError(
                f"`grid_constructor` must return a grid from t[0]={t0} to t[-1]={t1}; got one from {g[0]} to {g[-1]}"
            )
        return g
    return list(t_out)


def run(
    prob: Problem,
    rhs: RHS,
    *,
    keep_segments: bool = False,
    callbacks: Any = None,
    event_t_end: float | None = None,
    y0: torch.Tensor | None = None,
    t_out: Sequence[float] | None = None,
    norm: Callable | None = None,
    rtol: Any = None,
    atol: Any = None,
    method: str | None = None,
    options: dict | None = None,
    trace: list | None = None,
    use_event: bool = True,
) -> IntegrationResult:
    """Run the solver loop for ``prob`` (pieces may be overridden, as the adjoint's backward solve does): the
    registry entry of the method runs it."""
    y0 = prob.y0 if y0 is None else y0
    t_out = prob.t_out if t_out is None else t_out
    entry = get_method(prob.method if method is None else method)
    opts = prob.options if options is None else options
    if not entry.calls_callbacks:
        # only the adjoint's backward solve passes callbacks of its own: then the *_adjoint ones are checked
        warn_uncalled_callbacks(prob.func, entry.name, adjoint=callbacks is not None)
    event = None
    if prob.event_fn is not None and use_event:
        event = EventLocator(prob.event_fn, rhs, t_out[0], y0, tol=float(opts.get("event_tol", 0.0)))
    ctx = RunContext(
        prob=prob,
        rhs=rhs,
        y0=y0,
        t_out=t_out,
        rtol=prob.rtol if rtol is None else rtol,
        atol=prob.atol if atol is None else atol,
        norm=prob.norm if norm is None else norm,
        opts=opts,
        callbacks=prob.func if callbacks is None else callbacks,
        keep_segments=keep_segments,
        event=event,
        event_t_end=event_t_end,
        trace=trace,
    )
    if "step_size" in entry.options:  # fixed-step methods: the grid
        ctx.grid = make_grid(prob, t_out, opts) if event_t_end is None else _event_grid(prob, t_out[0], event_t_end)
    return entry.run(ctx)


def _event_grid(prob: Problem, t0: float, t_end: float) -> EventGrid:
    h = prob.options.get("step_size")
    if h is None:
        raise ValueError("events with a fixed-grid method need options['step_size']")
    return EventGrid(t0, float(h), 1.0 if t_end >= t0 else -1.0, DEFAULT_MAX_NUM_STEPS)
