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
from .solvers.adams import integrate_adams
from .solvers.control import StepController
from .solvers.implicit import IMPLICIT_TABLEAUS, AdaptiveTRBDF2, ImplicitRK
from .solvers.integrate import (
    RHS,
    VMAP_MESSAGE,
    EventGrid,
    EventLocator,
    IntegrationResult,
    block_rms_max,
    integrate_adaptive,
    integrate_fixed,
    is_vmapped,
    warn_uncalled_callbacks,
)
from .solvers.rosenbrock import RODAS4, ROSENBROCK_METHODS, Rosenbrock, Rosenbrock23
from .solvers.runge_kutta import RungeKutta
from .solvers.scipy_wrapper import integrate_scipy
from .solvers.tableaus import TABLEAUS

__all__ = ["Problem", "prepare", "run", "METHODS"]

ADAPTIVE_METHODS = ("dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8")
ROSENBROCK = tuple(ROSENBROCK_METHODS)
FIXED_RK_METHODS = ("euler", "midpoint", "heun2", "heun3", "rk4")
ADAMS_METHODS = ("explicit_adams", "implicit_adams", "fixed_adams")
IMPLICIT_FIXED_METHODS = tuple(IMPLICIT_TABLEAUS)
METHODS = ADAPTIVE_METHODS + ROSENBROCK + FIXED_RK_METHODS + IMPLICIT_FIXED_METHODS + ADAMS_METHODS + ("scipy_solver",)
"""The names ``method=`` accepts (a tuple of str): adaptive explicit (``dopri5`` the default, ``tsit5``, ...),
adaptive stiff (``rodas4``, ``rosenbrock23``, ``adaptive_trbdf2``), fixed-step explicit (``euler``, ``rk4``,
...), fixed-step implicit (``implicit_euler``, ``radauIIA5``, ...), multistep (``explicit_adams``,
``implicit_adams``, ``fixed_adams``) and ``scipy_solver``."""

_COMMON_OPTIONS = {"dtype"}
_ADAPTIVE_OPTIONS = _COMMON_OPTIONS | {
    "first_step",
    "safety",
    "ifactor",
    "dfactor",
    "pcoeff",
    "icoeff",
    "min_step",
    "max_step",
    "max_num_steps",
    "step_t",
    "jump_t",
    "norm",
    "event_tol",
    "compile",
}
_FIXED_OPTIONS = _COMMON_OPTIONS | {"step_size", "grid_constructor", "interp", "perturb", "event_tol"}
_ADAMS_OPTIONS = _FIXED_OPTIONS | {"max_order", "max_iters"}
_IMPLICIT_OPTIONS = _FIXED_OPTIONS | {"jacobian", "newton_tol", "max_iters"}
_SCIPY_OPTIONS = _COMMON_OPTIONS | {"solver", "min_step", "max_step", "first_step"}

#: default cap on attempted steps of an adaptive solve (torchdiffeq's is 2**31 - 1, which can hang)
DEFAULT_MAX_NUM_STEPS = 100_000


def check_method(method: Any, name: str = "method") -> str:
    """``method`` if it names a method, else an error naming the argument and listing the valid names."""
    if not isinstance(method, str):
        raise TypeError(f"`{name}` must be a method name (a string), got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"unknown {name} {method!r}; valid methods: {', '.join(METHODS)}")
    return method


def valid_options(method: str) -> set[str]:
    check_method(method)
    if method in ADAPTIVE_METHODS:
        return _ADAPTIVE_OPTIONS
    if method in ROSENBROCK:
        return _ADAPTIVE_OPTIONS | {"jacobian"}
    if method in FIXED_RK_METHODS:
        return _FIXED_OPTIONS
    if method in ADAMS_METHODS:
        return _ADAMS_OPTIONS
    if method in IMPLICIT_FIXED_METHODS:
        return _IMPLICIT_OPTIONS
    return _SCIPY_OPTIONS


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
    if method == "scipy_solver" and torch.is_grad_enabled():
        _check_forward_only(func, flat, t)
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
        and (method in ADAPTIVE_METHODS or method in ROSENBROCK)
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


def _check_forward_only(func: Callable, flat: torch.Tensor, t: torch.Tensor) -> None:
    """scipy's solvers give no gradient: rather than a solution that silently drops the gradients of what
    requires grad (a loss with other terms would still train), an error saying what to do."""
    params = func.parameters() if isinstance(func, torch.nn.Module) else ()
    which = [
        name
        for name, needs in (
            ("y0", flat.requires_grad),
            ("t", t.requires_grad),
            ("func's parameters", any(p.requires_grad for p in params)),
        )
        if needs
    ]
    if which:
        raise ValueError(
            f"method='scipy_solver' is forward only: its solution carries no gradient, but {' and '.join(which)} "
            "require grad. Solve under torch.no_grad() (or detach them), or use a neuralode method such as "
            "'dopri5' or 'rodas4' for gradients"
        )


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
    if method in ADAPTIVE_METHODS or method in ROSENBROCK:
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
    if ctor is not None and t_out is prob.t_out:
        g = ctor(prob.func, prob.unflatten(prob.y0), prob.t)
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
    """Run the solver loop for ``prob`` (pieces may be overridden, as the adjoint's backward solve does)."""
    y0 = prob.y0 if y0 is None else y0
    t_out = prob.t_out if t_out is None else t_out
    method = prob.method if method is None else method
    opts = prob.options if options is None else options
    rtol = prob.rtol if rtol is None else rtol
    atol = prob.atol if atol is None else atol
    norm = prob.norm if norm is None else norm
    if method not in ADAPTIVE_METHODS and method not in ROSENBROCK:  # (those call every callback)
        # only the adjoint's backward solve passes callbacks of its own: then the *_adjoint ones are checked
        warn_uncalled_callbacks(prob.func, method, adjoint=callbacks is not None)
    callbacks = prob.func if callbacks is None else callbacks
    event = None
    if prob.event_fn is not None and use_event:
        event = EventLocator(prob.event_fn, rhs, t_out[0], y0, tol=float(opts.get("event_tol", 0.0)))
    if method == "scipy_solver":
        return integrate_scipy(
            rhs,
            y0,
            t_out,
            rtol=rtol,
            atol=atol,
            solver=opts.get("solver", "LSODA"),
            min_step=float(opts.get("min_step", 0.0)),
            max_step=float(opts.get("max_step", math.inf)),
            first_step=opts.get("first_step"),
        )
    if method in ADAPTIVE_METHODS or method in ROSENBROCK:
        order = TABLEAUS[method].order if method in ADAPTIVE_METHODS else ROSENBROCK_METHODS[method].order
        ctrl = make_controller(order, opts)
        step_t = _times(opts.get("step_t"))
        if method == "rosenbrock23":
            rk = Rosenbrock23(rhs.n, rhs.dtype, rhs.device, batch=_jacobian_batch(rhs, opts))
        elif method == "adaptive_trbdf2":
            rt = float(rtol) if isinstance(rtol, float) else float(torch.as_tensor(rtol).min())
            rk = AdaptiveTRBDF2(
                rhs.n,
                rhs.dtype,
                rhs.device,
                batch=_jacobian_batch(rhs, opts),
                rtol=rt,
                newton_floor=_newton_floor(prob),
            )
            step_t = step_t + [float(s) for s in t_out]  # step on the output times (no interpolation there)
        elif method in ROSENBROCK:
            batch = _jacobian_batch(rhs, opts)
            rk = _compiled_rodas(rhs, y0, opts, batch) if opts.get("compile") else None
            if rk is None:
                rk = Rosenbrock(RODAS4, rhs.n, rhs.dtype, rhs.device, batch=batch)
            step_t = step_t + [float(s) for s in t_out]  # step on the output times (no interpolation there)
        else:
            rk = stepper(method, rhs.n, rhs.dtype, rhs.device, "dense")
        max_steps = int(opts.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))
        if max_steps < 1:
            raise ValueError(f"option `max_num_steps` must be a positive integer, got {max_steps}")
        if opts.get("compile") and method in ADAPTIVE_METHODS:
            res = _run_compiled(
                rhs,
                y0,
                t_out,
                rk,
                ctrl,
                opts,
                rtol,
                atol,
                norm,
                step_t,
                keep_segments,
                event,
                trace,
                callbacks,
                max_steps,
            )
            if res is not None:
                return res
        res = integrate_adaptive(
            rhs,
            y0,
            t_out,
            rk,
            ctrl,
            rtol=rtol,
            atol=atol,
            norm=norm,
            first_step=opts.get("first_step"),
            step_t=step_t,
            jump_t=_times(opts.get("jump_t")),
            max_num_steps=max_steps,
            callbacks=callbacks,
            keep_segments=keep_segments,
            event=event,
            t_end=event_t_end,
            trace=trace,
        )
        res.method = rk
        return res
    interp = opts.get("interp", "linear")
    if interp not in ("linear", "cubic"):
        raise ValueError(f"option `interp` must be 'linear' or 'cubic', got {interp!r}")
    if event_t_end is None:
        grid = make_grid(prob, t_out, opts)
    else:
        grid = _event_grid(prob, t_out[0], event_t_end)
    if method in FIXED_RK_METHODS or method in IMPLICIT_FIXED_METHODS:
        if method in IMPLICIT_FIXED_METHODS:
            rk = _implicit_stepper(method, rhs, interp, opts, _newton_floor(prob))
        else:
            rk = stepper(method, rhs.n, rhs.dtype, rhs.device, interp)
        res = integrate_fixed(
            rhs,
            y0,
            t_out,
            rk,
            grid,
            perturb=bool(opts.get("perturb", False)),
            callbacks=callbacks,
            keep_segments=keep_segments,
            event=event,
            trace=trace,
        )
        res.method = rk
        return res
    if trace is not None:
        raise NotImplementedError(
            f"gradient='checkpoint' supports the Runge–Kutta methods, not the multistep {method!r}; "
            "use gradient='backprop' or 'adjoint' with it"
        )
    return integrate_adams(
        rhs,
        y0,
        t_out,
        grid,
        implicit=method != "explicit_adams",
        max_order=opts.get("max_order"),
        max_iters=int(opts.get("max_iters", 4)),
        rtol=rtol,
        atol=atol,
        interp=interp,
        perturb=bool(opts.get("perturb", False)),
        callbacks=callbacks,
        keep_segments=keep_segments,
        event=event,
    )


_STEPPERS: dict = {}


def stepper(method: str, n: int, dtype: torch.dtype, device: torch.device, interp: str) -> RungeKutta:
    """A bound stepper, cached: its coefficient tensors are made once per (method, size, dtype, device)."""
    key = (method, n, dtype, device, interp)
    rk = _STEPPERS.get(key)
    if rk is None:
        if len(_STEPPERS) > 256:
            _STEPPERS.clear()
        rk = _STEPPERS[key] = RungeKutta(TABLEAUS[method], n, dtype, device, interp=interp)
    return rk


def make_controller(order: int, opts: dict) -> StepController:
    """The step-size controller configured by a solve's options."""
    return StepController(
        order,
        safety=opts.get("safety", 0.9),
        ifactor=opts.get("ifactor", 10.0),
        dfactor=opts.get("dfactor", 0.2),
        pcoeff=opts.get("pcoeff", 0.0),
        icoeff=opts.get("icoeff", 1.0),
        min_step=float(opts.get("min_step", 0.0)),
        max_step=float(opts.get("max_step", math.inf)),
    )


def _run_compiled(
    rhs, y0, t_out, rk, ctrl, opts, rtol, atol, norm, step_t, keep_segments, event, trace, callbacks, max_steps
):
    """The compiled path (``options["compile"]``: True or a ``torch.compile`` backend name), or None with a
    one-line warning when this solve needs something it does not do yet."""
    from .solvers.compiled import _warn_once, integrate_compiled
    from .solvers.device_loop import integrate_device_loop
    from .solvers.device_loop import supports as device_loop_supports

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
    backend = opts["compile"] if isinstance(opts["compile"], str) else "inductor"
    if not torch.is_grad_enabled() and device_loop_supports(rk, ctrl):
        records: list | None = [] if trace is not None else None  # (checkpointed gradients: the attempts)
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
                from .solvers.per_sample import PerSampleDense

                start = torch.tensor([float(t_out[0])], dtype=torch.float64, device=y0.device)
                direction = 1.0 if float(t_out[-1]) >= float(t_out[0]) else -1.0
                res.segments = PerSampleDense.from_calls(kept, direction, start) if kept else []
            if trace is not None and records:  # the accepted attempts as the loop's trace records
                t0s = torch.stack([r[0][0] for r in records]).tolist()
                ends = torch.stack([r[4][0] for r in records]).tolist()
                ok = torch.stack([r[3][0] for r in records]).tolist()
                trace.extend((a, b, r[2][0], False, False) for a, b, r, k in zip(t0s, ends, records, ok) if k)
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


def _compiled_rodas(rhs: RHS, y0: torch.Tensor, opts: dict, batch: int):
    """rodas4's compiled stepper, or None (with a one-line warning) where the solve needs what it lacks."""
    from .solvers.compiled import _warn_once
    from .solvers.rosenbrock_compiled import CompiledRosenbrock

    params = getattr(rhs.func, "parameters", None)
    needs_graph = torch.is_grad_enabled() and (
        y0.requires_grad or (callable(params) and any(p.requires_grad for p in params()))
    )
    why = None
    if rhs.buffer_shape is None:
        why = "tuple states"
    elif rhs.into is not None or needs_graph:
        why = "gradients (the compiled Rosenbrock step is for solves without a graph)"
    if why is not None:
        _warn_once(f"compile=True for rodas4 does not support {why} yet; using the eager solver")
        return None
    backend = opts["compile"] if isinstance(opts["compile"], str) else "inductor"
    return CompiledRosenbrock(RODAS4, rhs.func, rhs.buffer_shape, rhs.dtype, rhs.device, batch=batch, backend=backend)


def _jacobian_batch(rhs: RHS, opts: dict) -> int:
    """Blocks of the Jacobian: per sample (``jacobian="batched"``, the default for a tensor state of two or
    more dimensions: dimension 0 holds independent systems) or the whole state (``"dense"``: 1 block)."""
    shape = rhs.buffer_shape
    default = "batched" if shape is not None and len(shape) >= 2 else "dense"
    kind = opts.get("jacobian", default)
    if kind not in ("batched", "dense"):
        raise ValueError(f"option `jacobian` must be 'batched' or 'dense', got {kind!r}")
    if kind == "batched" and (shape is None or len(shape) < 2):
        raise ValueError(
            "option jacobian='batched' needs a tensor state of shape (batch, ...): dimension 0 "
            "holds independent systems; use jacobian='dense' otherwise"
        )
    return shape[0] if kind == "batched" else 1


def _newton_floor(prob: Problem) -> float | None:
    """The smallest relative Newton update a func evaluated in half precision can resolve (an eighth of its
    epsilon: 1e-3 for bfloat16), or None for a func in the state's own dtype."""
    low = getattr(prob.func, "eval_dtype", None)
    return None if low is None else torch.finfo(low).eps / 8


def _implicit_stepper(method: str, rhs: RHS, interp: str, opts: dict, newton_floor: float | None) -> ImplicitRK:
    """An implicit stepper with its Jacobian blocks (see ``_jacobian_batch``)."""
    batch = _jacobian_batch(rhs, opts)
    max_iters = int(opts.get("max_iters", 10))
    if max_iters < 1:
        raise ValueError(f"option `max_iters` must be a positive integer, got {max_iters}")
    return ImplicitRK(
        IMPLICIT_TABLEAUS[method],
        rhs.n,
        rhs.dtype,
        rhs.device,
        interp,
        batch=batch,
        newton_tol=opts.get("newton_tol", newton_floor),
        max_iters=max_iters,
    )


def _event_grid(prob: Problem, t0: float, t_end: float) -> EventGrid:
    h = prob.options.get("step_size")
    if h is None:
        raise ValueError("events with a fixed-grid method need options['step_size']")
    return EventGrid(t0, float(h), 1.0 if t_end >= t0 else -1.0, DEFAULT_MAX_NUM_STEPS)


def _times(x: Any) -> list[float]:
    if x is None:
        return []
    if torch.is_tensor(x):
        return x.detach().double().reshape(-1).tolist()
    return [float(v) for v in x]
