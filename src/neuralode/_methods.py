"""The method registry: every name ``method=`` accepts is one :class:`Method` entry.

An entry knows its order, the options it takes, which paths it supports (per-sample stepping, the compiled
loop, checkpointed gradients) and how to run one solve; ``_problem.run`` looks the name up and calls it, so a
new method is one entry. :func:`register_method` adds an explicit Runge–Kutta method from its
:class:`~neuralode.solvers.tableaus.ButcherTableau`; it then runs wherever a built-in explicit method does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any, Callable

import torch

from ._errors import Status
from .compiled.cache import backend_of
from .solvers.adams import integrate_adams
from .solvers.control import StepController
from .solvers.implicit import IMPLICIT_TABLEAUS, AdaptiveTRBDF2, ImplicitRK, ImplicitTableau
from .solvers.integrate import RHS, IntegrationResult, _max_steps_message, integrate_adaptive, integrate_fixed
from .solvers.rosenbrock import RODAS4, ROSENBROCK_METHODS, Rosenbrock, Rosenbrock23, RosenbrockTableau
from .solvers.runge_kutta import RungeKutta
from .solvers.scipy_wrapper import forward_only, integrate_scipy
from .solvers.tableaus import TABLEAUS, ButcherTableau

__all__ = ["Method", "METHODS", "register_method", "get_method", "method_names", "stepper", "make_controller"]

#: default cap on attempted steps of an adaptive solve (torchdiffeq's is 2**31 - 1, which can hang)
DEFAULT_MAX_NUM_STEPS = 100_000

_COMMON_OPTIONS = frozenset({"dtype"})
ADAPTIVE_OPTIONS = _COMMON_OPTIONS | {
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
FIXED_OPTIONS = _COMMON_OPTIONS | {"step_size", "grid_constructor", "interp", "perturb", "event_tol"}
_ADAMS_OPTIONS = FIXED_OPTIONS | {"max_order", "max_iters"}
_IMPLICIT_OPTIONS = FIXED_OPTIONS | {"jacobian", "newton_tol", "max_iters"}
_SCIPY_OPTIONS = _COMMON_OPTIONS | {"solver", "min_step", "max_step", "first_step"}


@dataclasses.dataclass
class RunContext:
    """What one run of the loop needs besides the method: set by ``_problem.run``."""

    prob: Any  # the Problem
    rhs: RHS
    y0: torch.Tensor
    t_out: Sequence[float]
    rtol: Any
    atol: Any
    norm: Callable | None
    opts: dict
    callbacks: Any
    keep_segments: bool
    event: Any  # an EventLocator or None
    event_t_end: float | None
    trace: list | None
    grid: list[float] | Any | None = None  # fixed-step methods: the step grid (or an EventGrid)


class Method:
    """One entry of the registry.

    Attributes:
        name: the string ``method=`` takes.
        order: order of the propagated solution.
        kind: ``"explicit"``, ``"rosenbrock"``, ``"implicit"``, ``"multistep"`` or ``"external"``.
        adaptive: steps are chosen by an error estimate and the step-size controller (else a fixed grid).
        options: the option names it accepts.
        per_sample: whether ``per_sample=True`` can step each sample on its own with it.
        compiles: whether ``compile=True`` has a compiled path for it.
        checkpoint: whether ``gradient="checkpoint"`` can replay its steps.
        calls_callbacks: whether its loop calls every ``callback_*`` of ``func``.
        tableau: the coefficients, where the method has a tableau.
    """

    name: str
    order: int
    kind: str
    adaptive: bool = True
    options: frozenset = ADAPTIVE_OPTIONS
    per_sample: bool = False
    compiles: bool = False
    checkpoint: bool = True
    calls_callbacks: bool = False
    tableau: Any = None

    def run(self, ctx: RunContext) -> IntegrationResult:  # pragma: no cover - every entry overrides it
        raise NotImplementedError

    def __repr__(self) -> str:
        return (
            f"<method {self.name!r}: {self.kind}, order {self.order}, {'adaptive' if self.adaptive else 'fixed step'}>"
        )


def _adaptive_loop(ctx: RunContext, rk, ctrl: StepController, step_t: list[float]) -> IntegrationResult:
    """The eager adaptive loop with the options every adaptive entry shares."""
    res = integrate_adaptive(
        ctx.rhs,
        ctx.y0,
        ctx.t_out,
        rk,
        ctrl,
        rtol=ctx.rtol,
        atol=ctx.atol,
        norm=ctx.norm,
        first_step=ctx.opts.get("first_step"),
        step_t=step_t,
        jump_t=times(ctx.opts.get("jump_t")),
        max_num_steps=max_num_steps(ctx.opts),
        callbacks=ctx.callbacks,
        keep_segments=ctx.keep_segments,
        event=ctx.event,
        t_end=ctx.event_t_end,
        trace=ctx.trace,
    )
    res.method = rk
    return res


def _fixed_loop(ctx: RunContext, rk) -> IntegrationResult:
    res = integrate_fixed(
        ctx.rhs,
        ctx.y0,
        ctx.t_out,
        rk,
        ctx.grid,
        perturb=bool(ctx.opts.get("perturb", False)),
        callbacks=ctx.callbacks,
        keep_segments=ctx.keep_segments,
        event=ctx.event,
        trace=ctx.trace,
    )
    res.method = rk
    return res


class ExplicitRK(Method):
    """An explicit Runge–Kutta method given by its Butcher tableau: adaptive when the tableau has an
    embedded error estimate (``b_err``), fixed-step otherwise."""

    kind = "explicit"

    def __init__(self, tableau: ButcherTableau) -> None:
        self.tableau = tableau
        self.name = tableau.name
        self.order = int(tableau.order)
        self.adaptive = tableau.b_err is not None
        self.options = ADAPTIVE_OPTIONS if self.adaptive else FIXED_OPTIONS
        self.per_sample = self.compiles = self.calls_callbacks = self.adaptive

    def run(self, ctx: RunContext) -> IntegrationResult:
        rhs = ctx.rhs
        if not self.adaptive:
            return _fixed_loop(ctx, stepper(self.name, rhs.n, rhs.dtype, rhs.device, ctx.opts.get("interp", "linear")))
        rk = stepper(self.name, rhs.n, rhs.dtype, rhs.device, "dense")
        ctrl = make_controller(self.order, ctx.opts)
        step_t = times(ctx.opts.get("step_t"))
        if ctx.opts.get("compile"):
            from .compiled.solve import run_compiled

            res = run_compiled(ctx, rk, ctrl, step_t, max_num_steps(ctx.opts))
            if res is not None:
                return res
        return _adaptive_loop(ctx, rk, ctrl, step_t)


class RosenbrockMethod(Method):
    """A linearly implicit (Rosenbrock) method with an embedded error estimate: one Jacobian and one LU per
    step, steps landing on the output times (its dense output is for the step only)."""

    kind = "rosenbrock"
    options = ADAPTIVE_OPTIONS | {"jacobian"}
    calls_callbacks = True

    def __init__(self, name: str, tableau: RosenbrockTableau | None) -> None:
        info = ROSENBROCK_METHODS[name]
        self.name, self.order, self.tableau = name, int(info.order), tableau
        self.compiles = tableau is RODAS4  # the compiled Rosenbrock step is written for rodas4's tableau

    def make_stepper(self, ctx: RunContext):
        rhs = ctx.rhs
        batch = jacobian_batch(rhs, ctx.opts)
        if self.tableau is None:
            return Rosenbrock23(rhs.n, rhs.dtype, rhs.device, batch=batch)
        rk = _compiled_rosenbrock(self.tableau, ctx, batch) if ctx.opts.get("compile") else None
        return rk if rk is not None else Rosenbrock(self.tableau, rhs.n, rhs.dtype, rhs.device, batch=batch)

    def run(self, ctx: RunContext) -> IntegrationResult:
        step_t = times(ctx.opts.get("step_t")) + [float(s) for s in ctx.t_out]  # (no interpolation there)
        return _adaptive_loop(ctx, self.make_stepper(ctx), make_controller(self.order, ctx.opts), step_t)


class TRBDF2Method(Method):
    """The TR-BDF2 method of Hosea & Shampine (1996) with its error estimate (an adaptive SDIRK)."""

    name = "adaptive_trbdf2"
    order = ROSENBROCK_METHODS["adaptive_trbdf2"].order
    kind = "implicit"
    options = ADAPTIVE_OPTIONS | {"jacobian"}
    calls_callbacks = True

    def run(self, ctx: RunContext) -> IntegrationResult:
        rhs, rtol = ctx.rhs, ctx.rtol
        rt = float(rtol) if isinstance(rtol, float) else float(torch.as_tensor(rtol).min())
        rk = AdaptiveTRBDF2(
            rhs.n,
            rhs.dtype,
            rhs.device,
            batch=jacobian_batch(rhs, ctx.opts),
            rtol=rt,
            newton_floor=newton_floor(ctx.prob),
        )
        step_t = times(ctx.opts.get("step_t")) + [float(s) for s in ctx.t_out]  # (no interpolation there)
        return _adaptive_loop(ctx, rk, make_controller(self.order, ctx.opts), step_t)


class ImplicitFixed(Method):
    """A fixed-step implicit Runge–Kutta method (Newton's method on the stage equations)."""

    kind = "implicit"
    adaptive = False
    options = _IMPLICIT_OPTIONS

    def __init__(self, tableau: ImplicitTableau) -> None:
        self.tableau = tableau
        self.name = tableau.name
        self.order = int(tableau.order)

    def run(self, ctx: RunContext) -> IntegrationResult:
        rhs, opts = ctx.rhs, ctx.opts
        max_iters = int(opts.get("max_iters", 10))
        rk = ImplicitRK(
            self.tableau,
            rhs.n,
            rhs.dtype,
            rhs.device,
            opts.get("interp", "linear"),
            batch=jacobian_batch(rhs, opts),
            newton_tol=opts.get("newton_tol", newton_floor(ctx.prob)),
            max_iters=max_iters,
        )
        return _fixed_loop(ctx, rk)


class Adams(Method):
    """Adams–Bashforth(–Moulton) multistep methods on a fixed grid, started by lower orders."""

    kind = "multistep"
    adaptive = False
    options = _ADAMS_OPTIONS
    checkpoint = False

    def __init__(self, name: str, implicit: bool, order: int) -> None:
        self.name, self.implicit, self.order = name, implicit, order

    def run(self, ctx: RunContext) -> IntegrationResult:
        if ctx.trace is not None:
            raise NotImplementedError(
                f"gradient='checkpoint' supports the Runge–Kutta methods, not the multistep {self.name!r}; "
                "use gradient='backprop' or 'adjoint' with it"
            )
        opts = ctx.opts
        return integrate_adams(
            ctx.rhs,
            ctx.y0,
            ctx.t_out,
            ctx.grid,
            implicit=self.implicit,
            max_order=opts.get("max_order"),
            max_iters=int(opts.get("max_iters", 4)),
            rtol=ctx.rtol,
            atol=ctx.atol,
            interp=opts.get("interp", "linear"),
            perturb=bool(opts.get("perturb", False)),
            callbacks=ctx.callbacks,
            keep_segments=ctx.keep_segments,
            event=ctx.event,
        )


class Scipy(Method):
    """scipy.integrate.solve_ivp (forward only: the solution carries no gradient)."""

    name = "scipy_solver"
    order = 0
    kind = "external"
    options = _SCIPY_OPTIONS
    checkpoint = False

    def run(self, ctx: RunContext) -> IntegrationResult:
        opts = ctx.opts
        res = integrate_scipy(
            ctx.rhs,
            ctx.y0,
            ctx.t_out,
            rtol=ctx.rtol,
            atol=ctx.atol,
            solver=opts.get("solver", "LSODA"),
            min_step=float(opts.get("min_step", 0.0)),
            max_step=float(opts.get("max_step", math.inf)),
            first_step=opts.get("first_step"),
        )
        res.ys = forward_only(res.ys, ctx.rhs.func, ctx.y0, ctx.prob.t)
        return res


class ReversibleMethod(Method):
    """An algebraically reversible scheme (``solvers.reversible``): adaptive, or fixed steps of at most
    ``options["step_size"]``; steps land on the output times; ``gradient="reversible"`` differentiates it by
    undoing its steps. ``reversible_rk`` takes ``options["base"]`` (an explicit Runge–Kutta method; default
    ``"dopri5"``) and ``options["coupling"]`` (λ in (0, 1], default 0.999)."""

    kind = "reversible"
    checkpoint = False

    def __init__(self, name: str, order: int, coupled: bool) -> None:
        self.name, self.order, self.coupled = name, order, coupled
        self.options = ADAPTIVE_OPTIONS | {"step_size"} | ({"base", "coupling"} if coupled else set())

    def scheme(self, opts: dict):
        from .solvers.reversible import CoupledRK, ReversibleHeun

        if not self.coupled:
            return ReversibleHeun()
        base = get_method(opts.get("base", "dopri5"), "options['base']")
        if not isinstance(base, ExplicitRK):
            valid = ", ".join(method_names(kind="explicit"))
            raise ValueError(
                f"options['base'] must be an explicit Runge–Kutta method (one of {valid}), got {base.name!r}"
            )
        return CoupledRK(base.tableau, opts.get("coupling", 0.999))

    def run(self, ctx: RunContext) -> IntegrationResult:
        if ctx.trace is not None:
            raise NotImplementedError(
                f"gradient='checkpoint' does not replay {self.name!r}: use gradient='reversible' (exact, in memory "
                "that does not grow with the steps) or 'backprop'"
            )
        if ctx.event is not None:
            raise NotImplementedError(f"{self.name!r} does not locate events; use an explicit method such as dopri5")
        rhs, opts = ctx.rhs, ctx.opts
        t_out = [float(s) for s in ctx.t_out]
        direction = 1.0 if t_out[-1] >= t_out[0] else -1.0
        # the output times and any step_t/jump_t inside the interval, each landed on by a step
        extra = times(opts.get("step_t")) + times(opts.get("jump_t"))
        inside = {s for s in extra if direction * (s - t_out[0]) > 0 and direction * (t_out[-1] - s) > 0}
        marks = sorted(set(t_out) | inside, key=lambda s: direction * s)
        where = {s: i for i, s in enumerate(t_out)}
        out_index = [where.get(s, -1) for s in marks]
        run_ = self.loop(
            lambda t, y: rhs(t[0].to(rhs.dtype), y[0])[None],
            ctx.y0[None],
            torch.tensor([marks], dtype=torch.float64, device=ctx.y0.device),
            out_index,
            opts,
            rtol=ctx.rtol,
            atol=ctx.atol,
            norm=ctx.norm,
            keep_segments=ctx.keep_segments,
            evals=lambda: rhs.nfe,
        )
        res = IntegrationResult(
            run_.ys[:, 0], run_.status, run_.message, run_.t_fail, int(run_.n_steps[0]), int(run_.n_rejected[0])
        )
        res.segments = run_.segments
        res.method, res.run = run_.scheme, run_
        return res

    def loop(self, F, y0, marks, out_index, opts: dict, **kw):
        """:func:`solvers.reversible.reversible_loop` with this method's scheme and the solve's options; the
        result also carries the scheme (``.scheme``)."""
        from .solvers.reversible import reversible_loop

        scheme = self.scheme(opts)
        step_size = opts.get("step_size")
        if step_size is None and not getattr(scheme, "has_error", True):
            raise ValueError(
                f"options['base']={scheme.base.name!r} has no error estimate: give options['step_size'] for fixed "
                "steps, or an adaptive base such as 'dopri5'"
            )
        run_ = reversible_loop(
            F,
            y0,
            marks,
            out_index,
            scheme,
            make_controller(scheme.order, opts),
            step_size=None if step_size is None else float(step_size),
            first_step=opts.get("first_step"),
            max_num_steps=max_num_steps(opts),
            **kw,
        )
        run_.scheme = scheme
        return run_


class AutoMethod(Method):
    """Automatic stiffness switching (``solvers.auto``): tsit5 while the problem is not stiff, rodas4 while it is,
    each step's method chosen from a stiffness estimate the steps compute anyway. ``Solution.stats.methods``
    lists which method ran over which interval. Options: those of the adaptive methods, ``jacobian`` (for the
    stiff phases) and ``nonstiff`` (the explicit method: one whose last two nodes are 1, ``"tsit5"`` or
    ``"dopri5"``)."""

    name = "auto"
    order = 5
    kind = "auto"
    options = (ADAPTIVE_OPTIONS - {"compile"}) | {"jacobian", "nonstiff"}
    calls_callbacks = True
    per_sample = True

    def run_per_sample(self, func, y0: torch.Tensor, t_out, opts: dict, rtol: float, atol: float, trace=None):
        """``per_sample=True``: :func:`solvers.per_sample_auto.integrate_per_sample_auto` with the solve's options
        (filling ``trace`` for a checkpointed backward)."""
        from .solvers.auto import SwitchRule, stability_boundary
        from .solvers.per_sample_auto import integrate_per_sample_auto

        nonstiff = self.explicit(opts)
        ctrl_e, ctrl_s = make_controller(nonstiff.order, opts), make_controller(RODAS4.order, opts)
        return integrate_per_sample_auto(
            func,
            y0,
            t_out,
            stepper(nonstiff.name, int(y0[0].numel()), y0.dtype, y0.device, "dense"),
            ctrl_e,
            ctrl_s,
            SwitchRule(_boundary(nonstiff.tableau, stability_boundary)),
            rtol=rtol,
            atol=atol,
            first_step=opts.get("first_step"),
            max_num_steps=max_num_steps(opts),
            trace=trace,
        )

    def replay(self, func, shape: torch.Size, t_out, trace, opts: dict | None = None):
        """The per-sample checkpointed gradient's replay of the attempts ``run_per_sample`` traced."""
        from .solvers.per_sample_auto import AutoReplay

        y = trace[0][2]
        explicit = stepper(self.explicit(opts or {}).name, int(math.prod(shape[1:])), y.dtype, y.device, "dense")
        return AutoReplay(func, shape, explicit, t_out, trace)

    def explicit(self, opts: dict) -> "ExplicitRK":
        from .solvers.auto import supports_estimate

        name = opts.get("nonstiff", "tsit5")
        entry = get_method(name, "options['nonstiff']")
        if not (isinstance(entry, ExplicitRK) and entry.adaptive and supports_estimate(entry.tableau)):
            raise ValueError(
                f"options['nonstiff'] must be an adaptive explicit method whose last two stages are both at t + h "
                f"(first same as last), such as 'tsit5' or 'dopri5'; got {name!r}"
            )
        return entry

    def run(self, ctx: RunContext) -> IntegrationResult:
        from .solvers.auto import StepperSchedule, SwitchRule, explicit_stiffness, stability_boundary

        rhs, opts = ctx.rhs, ctx.opts
        nonstiff = self.explicit(opts)
        tab = nonstiff.tableau
        rk = stepper(nonstiff.name, rhs.n, rhs.dtype, rhs.device, "dense")
        ros = Rosenbrock(RODAS4, rhs.n, rhs.dtype, rhs.device, batch=jacobian_batch(rhs, opts))
        ros.track_norm = True
        ctrl_e, ctrl_s = make_controller(nonstiff.order, opts), make_controller(RODAS4.order, opts)
        rule = SwitchRule(_boundary(tab, stability_boundary))
        step_t, jump_t = times(opts.get("step_t")), times(opts.get("jump_t"))
        t_out = [float(s) for s in ctx.t_out]
        horizon = t_out[-1] if ctx.event_t_end is None else float(ctx.event_t_end)
        t, y, first = t_out[0], ctx.y0, opts.get("first_step")
        stiff, nxt = False, 1  # nxt: the first output time not yet produced
        chunks, segments = [ctx.y0[None]], [] if ctx.keep_segments else None
        schedule, intervals = StepperSchedule(), []
        n_steps = n_rej = 0
        while True:
            budget = max_num_steps(opts) - n_steps - n_rej
            if budget <= 0:  # (a phase used up the attempts exactly: the next one may not start)
                res = IntegrationResult(y[None], Status.MAX_STEPS, "", t, 0, 0)
                break
            rule.reset()
            seg_out = [t] + t_out[nxt:] if ctx.event is None else [t]
            schedule.add(_trace_len(ctx.trace), ros if stiff else rk)
            if stiff:
                ctrl_s.reset()

                def switch(K, h, h_next):
                    return rule(float(ros.jac_norm), h_next, True)

                res = integrate_adaptive(
                    rhs, y, seg_out, ros, ctrl_s, rtol=ctx.rtol, atol=ctx.atol, norm=ctx.norm, first_step=first,
                    step_t=step_t + seg_out, jump_t=jump_t, max_num_steps=budget,
                    callbacks=ctx.callbacks, keep_segments=ctx.keep_segments, event=ctx.event, t_end=horizon,
                    trace=ctx.trace, switch=switch,
                )  # fmt: skip
            else:
                ctrl_e.reset()

                def switch(K, h, h_next):
                    return rule(explicit_stiffness(tab, K, h), h, False)

                res = integrate_adaptive(
                    rhs, y, seg_out, rk, ctrl_e, rtol=ctx.rtol, atol=ctx.atol, norm=ctx.norm, first_step=first,
                    step_t=step_t, jump_t=jump_t, max_num_steps=budget,
                    callbacks=ctx.callbacks, keep_segments=ctx.keep_segments, event=ctx.event, t_end=horizon,
                    trace=ctx.trace, switch=switch,
                )  # fmt: skip
            n_steps += res.n_steps
            n_rej += res.n_rejected
            if res.ys.shape[0] > 1:
                chunks.append(res.ys[1:])
                nxt += res.ys.shape[0] - 1
            if segments is not None and res.segments:
                segments.extend(res.segments)
            end = res.stop[0] if res.stop is not None else (res.t_fail if res.t_fail is not None else horizon)
            if res.event_t is not None:
                end = res.event_t
            intervals.append(("rodas4" if stiff else nonstiff.name, t, end))
            if res.stop is None:
                break
            t, y = res.stop
            # the new method starts from the step the old one proposed, grown on entering the stiff phase and
            # shrunk on leaving it (DifferentialEquations.jl's AutoSwitch: dtfac = 2)
            first = abs(res.next_step) * (0.5 if stiff else 2.0)
            stiff = not stiff
        ys = torch.cat(chunks) if len(chunks) > 1 else chunks[0]
        message = res.message
        if res.status == Status.MAX_STEPS:  # (the phase's message counts its own steps: give the whole solve's)
            message = _max_steps_message(max_num_steps(opts), res.t_fail, t_out[0], horizon, n_steps, n_rej)
        out = IntegrationResult(ys, res.status, message, res.t_fail, n_steps, n_rej, segments)
        out.event_t, out.event_y, out.next_step = res.event_t, res.event_y, res.next_step
        out.method, out.intervals = schedule.finish(), intervals
        return out


def _trace_len(trace) -> int:
    if trace is None:
        return 0
    return len(trace.records) if hasattr(trace, "records") else len(trace)


_BOUNDARIES: dict = {}


def _boundary(tableau: ButcherTableau, compute) -> float:
    if tableau not in _BOUNDARIES:
        _BOUNDARIES[tableau] = compute(tableau)
    return _BOUNDARIES[tableau]


# ---------------------------------------------------------------------------------------------------------------
# the registry


_REGISTRY: dict[str, Method] = {}
_BUILTIN: set[str] = set()


def _add(entry: Method) -> Method:
    _REGISTRY[entry.name] = entry
    return entry


for _name in ("dopri5", "tsit5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"):
    _add(ExplicitRK(TABLEAUS[_name]))
_add(RosenbrockMethod("rosenbrock23", None))  # (its own stepper class: Shampine & Reichelt's W-method)
_add(RosenbrockMethod("rodas4", RODAS4))
_add(TRBDF2Method())
for _name in ("euler", "midpoint", "heun2", "heun3", "rk4"):
    _add(ExplicitRK(TABLEAUS[_name]))
for _tab in IMPLICIT_TABLEAUS.values():
    _add(ImplicitFixed(_tab))
_add(Adams("explicit_adams", implicit=False, order=4))
_add(Adams("implicit_adams", implicit=True, order=12))
_add(Adams("fixed_adams", implicit=True, order=12))
_add(ReversibleMethod("reversible_heun", 2, coupled=False))
_add(ReversibleMethod("reversible_rk", 5, coupled=True))
_add(AutoMethod())
_add(Scipy())
_BUILTIN.update(_REGISTRY)


def get_method(name: Any, argument: str = "method") -> Method:
    """The registry entry called ``name``; an error naming ``argument`` and the valid names otherwise."""
    if not isinstance(name, str):
        raise TypeError(f"`{argument}` must be a method name (a string), got {type(name).__name__}")
    entry = _REGISTRY.get(name)
    if entry is None:
        raise ValueError(f"unknown {argument} {name!r}; valid methods: {', '.join(_REGISTRY)}")
    return entry


def method_names(**where: Any) -> tuple[str, ...]:
    """Names of the entries whose attributes equal ``where`` (e.g. ``method_names(per_sample=True)``)."""
    return tuple(n for n, m in _REGISTRY.items() if all(getattr(m, k) == v for k, v in where.items()))


def register_method(tableau: ButcherTableau, *, replace: bool = False) -> Method:
    """Add an explicit Runge–Kutta method, given by its tableau, to the methods ``method=`` accepts.

    The method then works wherever a built-in explicit method does: adaptive (when the tableau has
    ``b_err``) or fixed-step, every gradient mode, events, dense output (the tableau's ``dense`` extension
    or cubic Hermite interpolation), ``per_sample=True`` and ``compile=True`` (adaptive methods), and it is
    listed in ``neuralode.METHODS``.

    Arguments:
        tableau: a :class:`neuralode.ButcherTableau`; its ``name`` becomes the method's name. The tableau's
            consistency (row sums, weights) is checked when it is built.
        replace: allow replacing a method registered earlier under the same name (built-in methods cannot
            be replaced).

    Returns:
        The registry entry.

    Raises:
        TypeError: ``tableau`` is not a ``ButcherTableau``.
        ValueError: the name is taken (by a built-in method, or by an earlier registration without
            ``replace=True``).

    Example:
        ```python
        import torch
        import neuralode

        # Ralston's third-order method (Ralston 1962), fixed step: it has no embedded error estimate
        ralston3 = neuralode.ButcherTableau(
            "ralston3_doc",
            c=(0.0, 0.5, 0.75),
            a=((), (0.5,), (0.0, 0.75)),
            b=(2 / 9, 1 / 3, 4 / 9),
            order=3,
        )
        neuralode.register_method(ralston3)
        ys = neuralode.odeint(lambda t, y: -y, torch.ones(2), torch.tensor([0.0, 1.0]), method="ralston3_doc",
                              options=dict(step_size=0.01))
        assert abs(ys[-1, 0] - torch.exp(torch.tensor(-1.0))) < 1e-6
        ```
    """
    if not isinstance(tableau, ButcherTableau):
        raise TypeError(
            f"register_method takes a neuralode.ButcherTableau (an explicit Runge–Kutta method), got "
            f"{type(tableau).__name__}"
        )
    name = tableau.name
    if not isinstance(name, str) or not name:
        raise ValueError("the tableau needs a non-empty `name`: the string method= will take")
    if name in _BUILTIN:
        raise ValueError(f"method {name!r} is built in and cannot be replaced; give the tableau another name")
    if name in _REGISTRY and not replace:
        raise ValueError(f"a method named {name!r} is already registered; pass replace=True to replace it")
    return _add(ExplicitRK(tableau))


class _Names(Sequence):
    """A read-only, live tuple of the registered method names."""

    def __getitem__(self, i):
        return tuple(_REGISTRY)[i]

    def __len__(self) -> int:
        return len(_REGISTRY)

    def __contains__(self, name: object) -> bool:
        return name in _REGISTRY

    def __iter__(self):
        return iter(tuple(_REGISTRY))

    def __eq__(self, other: object) -> bool:
        return tuple(self) == (tuple(other) if isinstance(other, (tuple, list, _Names)) else other)

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __add__(self, other):
        return tuple(self) + tuple(other)

    def __repr__(self) -> str:
        return repr(tuple(self))


METHODS = _Names()
"""The names ``method=`` accepts (a read-only sequence of str that includes methods added by
:func:`register_method`): adaptive explicit (``dopri5`` the default, ``tsit5``, ...), adaptive stiff
(``rodas4``, ``rosenbrock23``, ``adaptive_trbdf2``), automatic stiffness switching (``auto``), fixed-step
explicit (``euler``, ``rk4``, ...), fixed-step implicit (``implicit_euler``, ``radauIIA5``, ...), multistep
(``explicit_adams``, ``implicit_adams``, ``fixed_adams``), algebraically reversible (``reversible_heun``,
``reversible_rk``) and ``scipy_solver``."""


# ---------------------------------------------------------------------------------------------------------------
# pieces the entries share


_STEPPERS: dict = {}


def stepper(method: str, n: int, dtype: torch.dtype, device: torch.device, interp: str) -> RungeKutta:
    """A bound explicit stepper, cached: its coefficient tensors are made once per (tableau, size, dtype,
    device, interpolation). Keyed by the tableau itself, so a replaced registration gets a new stepper."""
    tableau = get_method(method).tableau
    key = (tableau, n, dtype, device, interp)
    rk = _STEPPERS.get(key)
    if rk is None:
        if len(_STEPPERS) > 256:
            _STEPPERS.clear()
        rk = _STEPPERS[key] = RungeKutta(tableau, n, dtype, device, interp=interp)
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


def max_num_steps(opts: dict) -> int:
    return int(opts.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))


def times(x: Any) -> list[float]:
    """A list of float times from None, a tensor or a sequence."""
    if x is None:
        return []
    if torch.is_tensor(x):
        return x.detach().double().reshape(-1).tolist()
    return [float(v) for v in x]


def jacobian_batch(rhs: RHS, opts: dict) -> int:
    """Blocks of the Jacobian: per sample (``jacobian="batched"``, the default for a tensor state of two or
    more dimensions: dimension 0 holds independent systems) or the whole state (``"dense"``: 1 block)."""
    shape = rhs.buffer_shape
    default = "batched" if shape is not None and len(shape) >= 2 else "dense"
    kind = opts.get("jacobian", default)
    if kind == "batched" and (shape is None or len(shape) < 2):
        raise ValueError(
            "option jacobian='batched' needs a tensor state of shape (batch, ...): dimension 0 "
            "holds independent systems; use jacobian='dense' otherwise"
        )
    return shape[0] if kind == "batched" else 1


def newton_floor(prob: Any) -> float | None:
    """The smallest relative Newton update a func evaluated in half precision can resolve (an eighth of its
    epsilon: 1e-3 for bfloat16), or None for a func in the state's own dtype."""
    low = getattr(prob.func, "eval_dtype", None)
    return None if low is None else torch.finfo(low).eps / 8


def _compiled_rosenbrock(tableau: RosenbrockTableau, ctx: RunContext, batch: int):
    """rodas4's compiled stepper, or None (with a one-line warning) where the solve needs what it lacks."""
    from .compiled.rosenbrock import CompiledRosenbrock
    from .compiled.step import _warn_once

    rhs, y0 = ctx.rhs, ctx.y0
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
        _warn_once(f"compile=True for {tableau.name} does not support {why} yet; using the eager solver")
        return None
    backend = backend_of(ctx.opts["compile"])
    return CompiledRosenbrock(tableau, rhs.func, rhs.buffer_shape, rhs.dtype, rhs.device, batch=batch, backend=backend)
