"""``solve``: the solve with every option, its gradient modes, per-sample stepping and events."""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ._amp import entry_point
from ._convert import ConvertedSolution, needs_conversion, solver_problem
from ._errors import SolverError, Status, caller_stacklevel, exception_for
from ._events import event_time as _event_time
from ._events import guard_value as _guard_value
from ._events import per_sample_event_time as _per_sample_event_time
from ._methods import DEFAULT_MAX_NUM_STEPS, METHODS, get_method, make_controller, method_names, stepper
from ._problem import Problem, prepare, run
from ._solution import Solution
from .gradients.adjoint import AdjointConfig, adjoint_solve
from .gradients.checkpoint import checkpoint_solve
from .gradients.common import SolveRecord, SolveStats, time_gradient_wrapper
from .gradients.modes import Adjoint, Backprop, Checkpoint, GradientMode, Reversible, resolve_gradient
from .solvers.integrate import is_vmapped, warn_uncalled_callbacks
from .solvers.per_sample import PerSampleDense

if TYPE_CHECKING:
    from .gradients.per_sample_adjoint import PerSampleAdjointConfig

__all__ = ["solve"]


def _params_of(func: Callable, params: Sequence[torch.Tensor] | None, what: str) -> tuple[torch.Tensor, ...]:
    if params is not None:
        if torch.is_tensor(params) or not isinstance(params, Sequence) and not hasattr(params, "__iter__"):
            raise TypeError(f"`{what}` must be a sequence of tensors, got {type(params).__name__}")
        params = tuple(params)
        for i, p in enumerate(params):
            if not torch.is_tensor(p):
                raise TypeError(f"`{what}[{i}]` must be a tensor, got {type(p).__name__}")
        # a tensor given twice gets its gradient once (autograd would add the two returned copies)
        return tuple({id(p): p for p in params}.values())
    if isinstance(func, torch.nn.Module):
        return tuple(p for p in func.parameters() if p.requires_grad)
    raise TypeError(
        f"`func` must be an nn.Module or `{what}` must be given: gradients of this mode reach only the "
        f"tensors it is told about. Wrap func in an nn.Module, or pass {what}=(...) (or {what}=() if func "
        "has no parameters)."
    )


@entry_point
def solve(
    func: Callable,
    y0: Any,
    t: Any,
    *,
    method: str | None = None,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    options: dict | None = None,
    gradient: str | GradientMode = "backprop",
    params: Sequence[torch.Tensor] | None = None,
    adjoint_rtol: Any = None,
    adjoint_atol: Any = None,
    adjoint_method: str | None = None,
    adjoint_options: dict | None = None,
    on_failure: str = "raise",
    dense: bool | None = None,
    event_fn: Callable | None = None,
    per_sample: bool = False,
    compile: bool | str = False,
    checkpoints: int | None = None,
    events: Sequence | None = None,
    max_events: int = 1000,
) -> Solution:
    """Solve ``dy/dt = func(t, y)``, ``y(t[0]) = y0`` at the times ``t``.

    Arguments:
        func: ``func(t, y) -> dy/dt`` (``t`` a 0-d tensor of the state's dtype); ``y`` a tensor of any shape
            or a tuple of tensors.
        y0: the initial state.
        t: 1-D strictly monotonic times; decreasing integrates backwards. ``ys[0]`` is ``y0``. With
            ``per_sample=True`` also ``(batch, m)``: each sample's own times (rows all increasing or all
            decreasing); ``ys`` is then ``(m, batch, ...)``.
        method: see ``neuralode.METHODS`` (default ``"dopri5"``).
        rtol, atol: tolerances (floats or tensors broadcastable to the state, per-component).
        options: method options, torchdiffeq's names (``first_step``, ``step_size``, ``max_num_steps``, ...).
        gradient: ``"backprop"`` (autograd through the solver), ``"adjoint"`` (Algorithm 1 of Chen et
            al. 2018; O(1) memory in the number of steps), ``"checkpoint"`` (the exact discrete gradient
            recomputed one step at a time) or ``"reversible"`` (the exact discrete gradient of a reversible
            method, its steps undone: memory that does not grow with the steps); or the same modes as objects
            with their settings: :class:`~neuralode.Backprop`, :class:`~neuralode.Adjoint`
            (``Adjoint(rtol=..., seminorm=True)``), :class:`~neuralode.Checkpoint`, :class:`~neuralode.Reversible`.
        params: tensors to differentiate for ``adjoint``/``checkpoint`` (default: ``func.parameters()``);
            ``Adjoint(params=...)``/``Checkpoint(params=...)`` with an object.
        adjoint_rtol, adjoint_atol, adjoint_method, adjoint_options: the adjoint's backward solve (default:
            the forward's); ``adjoint_options=dict(norm="seminorm")`` uses the seminorm. With the forward's
            method, ``adjoint_options`` adds to and overrides the forward's options (torchdiffeq replaces them).
            The fields of :class:`~neuralode.Adjoint`: with a gradient-mode object, a keyword argument fills
            only a field the object leaves unset.
        on_failure: ``"raise"`` (default) or ``"return"``: give back the solution up to the failure with
            ``status``, ``message`` and ``t_fail`` set.
        dense: keep each step's interpolant so that ``Solution.interpolate`` works. Default: yes, except with
            ``gradient="adjoint"``, ``"reversible"`` and ``checkpoints=N`` (whose memory would then grow with the
            number of steps, which they exist to avoid) and with ``compile=True`` (where the compiled loop then
            keeps every attempt's continuous extension instead of evaluating and dropping them as it goes); pass
            ``dense=True`` there.
        event_fn: stop at the first zero crossing of ``event_fn(t, y)``; ``Solution.event_t`` holds it. With
            ``per_sample=True`` every sample stops at its own first event: ``event_fn(t (batch,), y)`` returns
            one row per sample (``(batch,)`` or ``(batch, k)``), ``event_t`` is ``(batch,)``.
        per_sample: adaptive methods: every sample of a ``(batch, ...)`` state keeps its own time, step size
            and accept/reject decision; ``func`` then receives ``t`` as a ``(batch,)`` tensor. Per-sample step
            counts and evaluations are in ``Solution.sample_stats`` (all three gradient modes, ``t``
            included; ``Solution.interpolate`` evaluates each sample's own continuous extension). The adjoint
            steps each sample's backward solve on its own too (``gradients.per_sample_adjoint``); the checkpoint
            replays the forward's attempts one at a time (``gradients.per_sample_checkpoint``). With
            ``method="auto"`` each sample also switches between the explicit method and rodas4 on its own
            (``sample_stats["methods"]``; no dense output, no events).
        compile: ``torch.compile`` the solver (True: inductor, or a backend name). Without gradients the whole
            adaptive loop runs compiled (joint or per-sample); with backprop each step is compiled; with
            checkpointed gradients the forward loop runs compiled and the backward rebuilds each step through
            a compiled function; with the adjoint, the backward solve of an ``nn.Module`` func (its own
            parameters, joint stepping), or of any func with the seminorm, runs in the compiled loop too,
            except on CPU where func is expensive (≥ 3 ms per augmented call), where eager kernels were
            measured as fast. Tensor states and scalar tolerances. Anything else runs the eager solver with a
            one-line warning.
        events: a list of :class:`~neuralode.Event`: at each zero crossing of an event's ``fn`` (located as
            ``event_fn``'s), its ``reset`` replaces the state and the solve goes on, or stops for a terminal
            event. ``Solution.event_times`` (differentiable: through the state, the start and the tensors ``fn``
            uses), ``event_index`` (which event) and ``event_states`` (the state just before each) report them;
            an output at an event time reports the state after the reset. Every gradient mode, joint or
            ``per_sample=True`` (each sample its own events; the three reports are then lists, one entry per
            sample); not with ``on_failure="return"`` or ``dense=True``.
        max_events: with ``events``, the most events before the solve stops with a :class:`SolverError`
            (events that accumulate, Zeno behaviour, also stop it).
        checkpoints: with ``gradient="checkpoint"``, keep at most this many states (the initial one included)
            however many steps the solve takes, and recompute the rest in the backward pass: the same gradient
            in bounded memory, for more evaluations (:class:`~neuralode.Checkpoint`). None: one state per step.

    Returns:
        a :class:`Solution`: ``ys`` of shape ``(len(t), *y0.shape)`` in ``y0``'s dtype (a tuple of such for a
        tuple state), ``stats`` with the cost, ``status``.

    Raises:
        ValueError: bad input, named in the message: ``t`` not strictly monotonic or of the wrong shape, an
            unknown ``method``, option or ``gradient``, tolerances that do not broadcast to the state, a
            gradient-mode object and a keyword argument that set the same thing (or an ``adjoint_*`` argument
            with a mode other than the adjoint).
        TypeError: ``y0``/``t`` not tensors of a floating (or complex) dtype, ``func`` returning the wrong
            shape or type, ``gradient`` neither one of the strings nor a gradient-mode object.
        StepSizeUnderflowError: the adaptive step size became too small (a singularity, or a stiff problem).
        MaxStepsError: more than ``options["max_num_steps"]`` steps.
        NonFiniteStateError: the state or ``func``'s output became NaN or infinite.
            (The three :class:`SolverError` subclasses only with ``on_failure="raise"``, the default.)

    Example:
        >>> sol = solve(lambda t, y: -y, torch.tensor([1.0]), torch.linspace(0, 1, 5))
        >>> sol.ys.shape, sol.stats.nfe > 0
        (torch.Size([5, 1]), True)
    """
    mode = resolve_gradient(
        gradient,
        params=params,
        adjoint_rtol=adjoint_rtol,
        adjoint_atol=adjoint_atol,
        adjoint_method=adjoint_method,
        adjoint_options=adjoint_options,
        checkpoints=checkpoints,
    )
    vmapped = torch.is_tensor(y0) and is_vmapped(y0)  # (vmap gets its own message, from prepare)
    if not isinstance(mode, Backprop) and not vmapped and torch._C._are_functorch_transforms_active():
        # (the gradient modes' autograd Functions define no forward-mode rule or functorch setup_context.
        # The checkpoint's and the reversible gradient are backprop's numbers: under a transform they run as
        # backprop, with its memory. The adjoint's are not, and torch's own error would not say what to do.)
        if isinstance(mode, Adjoint):
            raise RuntimeError(
                "gradient='adjoint' does not run under torch.func transforms (jvp, jacfwd, jacrev, grad, hessian): "
                "use gradient='backprop' or 'checkpoint', which they differentiate through"
            )
        mode = Backprop()
    if per_sample and not (torch.is_tensor(y0) and y0.ndim >= 2):  # (checked on the user's shape: a complex
        # state's real view has one dimension more)
        got = f"shape {tuple(y0.shape)}" if torch.is_tensor(y0) else f"a {type(y0).__name__} state"
        raise ValueError(
            f"per_sample=True needs a tensor state of shape (batch, ...) with the samples along dimension 0; got {got}"
        )
    if events is not None:
        if event_fn is not None or on_failure != "raise" or dense:
            raise ValueError(
                "`events` goes with neither `event_fn` (give it as neuralode.Event(fn, terminal=True)) nor, yet, "
                "on_failure='return' or dense=True"
            )
        from ._hybrid import solve_with_events, solve_with_events_per_sample

        kw = dict(method=method, rtol=rtol, atol=atol, options=options, gradient=mode, compile=compile)
        chain = solve_with_events_per_sample if per_sample else solve_with_events
        return chain(solve, func, y0, t, events, max_events=max_events, kw=kw)
    if needs_conversion(y0):  # complex or half precision: solved as real float32 or wider (_convert)
        func, y0, rtol, atol, event_fn, conv = solver_problem(func, y0, rtol, atol, event_fn)
        sol = solve(
            func,
            y0,
            t,
            method=method,
            rtol=rtol,
            atol=atol,
            options=options,
            gradient=mode,
            on_failure=on_failure,
            dense=dense,
            event_fn=event_fn,
            per_sample=per_sample,
            compile=compile,
        )
        return ConvertedSolution(sol, conv)
    if compile and isinstance(method, str) and method in METHODS and not get_method(method).compiles:
        from .compiled.cache import warn_fallback

        msg = f"compile=True: method {method!r} has no compiled path; it runs on the eager solver"
        warn_fallback(msg, caller_stacklevel() + 1)
        if "compile" not in get_method(method).options:
            compile = False
    if compile:
        options = {**(options or {}), "compile": compile}
    # the adjoint's memory must not grow with the steps: it keeps no dense output unless asked to
    # (nor the checkpoint's, in a budget of states)
    bounded = isinstance(mode, (Adjoint, Reversible)) or isinstance(mode, Checkpoint) and mode.checkpoints is not None
    if per_sample and method == "auto":  # (its per-sample loop keeps no continuous extensions)
        if dense:
            raise ValueError(
                "per_sample=True with method='auto' keeps no dense output: leave dense unset and ask for the times "
                "you need in `t`, or solve without per_sample=True"
            )
        dense = False
    dense = (not compile and not bounded) if dense is None else bool(dense)
    if on_failure not in ("raise", "return"):
        raise ValueError(f"`on_failure` must be 'raise' or 'return', got {on_failure!r}")
    prob = prepare(func, y0, t, rtol, atol, method, options, event_fn, per_sample=per_sample)
    if prob.method == "scipy_solver" and isinstance(mode, (Checkpoint, Reversible)):
        raise ValueError(
            "method='scipy_solver' is forward only: it cannot be used with gradient="
            f"{mode.name!r}; use a neuralode method for gradients"
        )
    reversible = get_method(prob.method).kind == "reversible"
    if isinstance(mode, Reversible) != reversible and (reversible or not isinstance(mode, Backprop)):
        if isinstance(mode, Reversible):
            raise ValueError(
                f"gradient='reversible' undoes the steps of a reversible method; method={prob.method!r} is not one: "
                f"use method='reversible_heun' or 'reversible_rk' (options base=..., coupling=...)"
            )
        if isinstance(mode, Checkpoint):
            raise ValueError(
                f"gradient='checkpoint' does not replay method={prob.method!r}: use gradient='reversible' (exact, in "
                "memory that does not grow with the steps), 'backprop' or 'adjoint'"
            )
    if reversible and (event_fn is not None or per_sample and isinstance(mode, Adjoint)):
        raise ValueError(
            f"method={prob.method!r} supports neither event_fn nor the per-sample adjoint; use an explicit method "
            "such as dopri5 for those (or gradient='reversible' with it)"
        )
    stats = SolveStats()
    if per_sample and reversible:
        return _solve_reversible_per_sample(prob, stats, mode, on_failure)
    if per_sample:
        return _solve_per_sample(prob, stats, mode, event_fn, on_failure, dense)
    if event_fn is not None:
        return _solve_event(prob, stats, mode, on_failure, dense)
    return _solve(prob, stats, mode, on_failure, dense)


def _check_per_sample_state(prob: Problem) -> None:
    """What every per-sample solve needs of the state, the tolerances and the options."""
    if prob.is_tuple or len(prob.shape) < 2:
        raise ValueError(
            "per_sample=True needs a tensor state of shape (batch, ...) with the samples along "
            f"dimension 0; got shape {tuple(prob.shape)}"
        )
    if not (isinstance(prob.rtol, float) and isinstance(prob.atol, float)):
        raise ValueError("per_sample=True takes scalar rtol and atol")
    unsupported = {"step_t", "jump_t", "norm"} & set(prob.options)
    if unsupported:
        raise ValueError(f"options {sorted(unsupported)} are not supported with per_sample=True")


def _solve_reversible_per_sample(prob: Problem, stats: SolveStats, mode: GradientMode, on_failure: str) -> Solution:
    """A reversible method with every sample on its own steps (the reversible loop with a row per sample):
    backprop through it, or ``gradient="reversible"``."""
    from .gradients.reversible import reversible_solve

    _check_per_sample_state(prob)
    entry = get_method(prob.method)
    y0 = prob.unflatten(prob.y0)
    shape, B = y0.shape, y0.shape[0]
    T = torch.as_tensor(prob.t_out, dtype=torch.float64).to(y0.device)
    rows = T.ndim == 2
    T = (T if rows else T.expand(B, -1)).contiguous()
    m = T.shape[1]

    def field() -> tuple:
        count = [0]

        def F(t_: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            count[0] += 1
            return prob.func(t_.to(y.dtype), y.view(shape)).reshape(B, -1)

        return F, (lambda: count[0])

    first = [True]

    def loop(y_rows: torch.Tensor):
        F, evals = field()
        got = entry.loop(F, y_rows, T, list(range(m)), prob.options, rtol=prob.rtol, atol=prob.atol, evals=evals)
        got.calls = evals()
        if first[0]:  # (not a recomputation for a second derivative: its graph must not stay on the record)
            first[0] = False
            record.result = got
        return got

    record = SolveRecord(stats)
    if isinstance(mode, Reversible) and torch.is_grad_enabled():
        ps = _params_of(prob.func, mode.params, "params")

        def core(y0_: torch.Tensor) -> torch.Tensor:
            ys_ = reversible_solve(
                loop,
                field,
                y0_.reshape(B, -1),
                ps,
                record,
                t0=T[:, 0],
                rtol=prob.rtol,
                atol=prob.atol,
                method=prob.method,
            )
            return ys_.view(-1, *shape)
    else:

        def core(y0_: torch.Tensor) -> torch.Tensor:
            return loop(y0_.reshape(B, -1)).ys.view(-1, *shape)

    needs_t_grad = prob.t.requires_grad and torch.is_grad_enabled()
    ys = _per_sample_time_gradient(prob, y0, core, stats) if needs_t_grad else core(y0)
    got = record.take_result()
    stats.nfe += got.calls
    stats.n_steps += int(got.n_steps.max())
    stats.n_rejected += int(got.n_rejected.max())
    if got.status != Status.SUCCESS and on_failure == "raise":
        raise exception_for(got.status, got.message, got.t_fail)
    ys = ys.reshape(ys.shape[0], -1)
    n = ys.shape[0]
    ts = prob.t[:, :n] if rows else prob.t[:n]
    sol = Solution(ts, prob.unflatten(ys), stats, got.status, got.message, got.t_fail, None, prob)
    sol.sample_stats = {"n_steps": got.n_steps, "n_rejected": got.n_rejected, "nfe": got.nfe}
    return sol


def _solve_per_sample(
    prob: Problem, stats: SolveStats, mode: GradientMode, event_fn, on_failure: str, dense: bool
) -> Solution:
    from .gradients.per_sample_adjoint import per_sample_adjoint_solve
    from .gradients.per_sample_checkpoint import per_sample_checkpoint_solve
    from .solvers.per_sample import integrate_per_sample

    entry = get_method(prob.method)
    auto = entry.name == "auto"
    if auto and event_fn is not None:
        raise ValueError(
            "per_sample=True with method='auto' does not locate events; use it without per_sample=True, or "
            "per_sample=True with an explicit method such as 'tsit5'"
        )
    if event_fn is not None:
        return _solve_per_sample_event(prob, stats, mode, on_failure, dense)
    opts = prob.options
    max_steps, ctrl, rhs, method = _per_sample_setup(prob)
    y0 = prob.unflatten(prob.y0)
    rows = prob.t.ndim == 2  # per-sample output times
    needs_t_grad = prob.t.requires_grad and torch.is_grad_enabled()
    compiled = False
    step_fn = None  # backprop: each attempt's stages one compiled function, autograd through it
    # the torch.compile backend of every compiled part (None: all eager)
    backend = (opts["compile"] if isinstance(opts["compile"], str) else "inductor") if opts.get("compile") else None
    if backend is not None:
        from .compiled.loop import supports as device_loop_supports

        compiled = device_loop_supports(method, ctrl)
        if torch.is_grad_enabled() and isinstance(mode, Backprop):
            from .solvers.per_sample import compiled_attempt

            step_fn = compiled_attempt(prob.func, method, y0.shape, y0.dtype, y0.device, backend, prob.rtol, prob.atol)
            compiled = False

    def solve_loop(y0_: torch.Tensor, trace: list | None = None) -> tuple:
        """(result, per-sample statistics): the compiled loop where it applies (no graph), else the eager one;
        either fills ``trace`` for a checkpointed backward."""
        if auto:
            return entry.run_per_sample(prob.func, y0_, prob.t_out, opts, prob.rtol, prob.atol, trace=trace)
        if compiled and not torch.is_grad_enabled():
            from .compiled.loop import integrate_device_loop

            kept: list | None = [] if dense else None
            got = integrate_device_loop(
                prob.func,
                y0_.reshape(y0_.shape[0], -1),
                y0_.shape,
                prob.t_out,
                method,
                ctrl,
                per_sample=True,
                rtol=prob.rtol,
                atol=prob.atol,
                first_step=opts.get("first_step"),
                max_num_steps=max_steps,
                backend=backend,
                trace=trace,
                keep=kept,
            )
            if got is not None:
                if kept is not None:  # (every attempt's continuous extension, for Solution.interpolate)
                    T = torch.as_tensor(prob.t_out, dtype=torch.float64).to(y0_.device)
                    T = T if T.ndim == 2 else T.expand(y0_.shape[0], -1)
                    direction = 1.0 if float(T[0, -1]) >= float(T[0, 0]) else -1.0
                    got[0].segments = PerSampleDense.from_calls(kept, direction, T[:, 0]) if kept else []
                return got
            if trace is not None:
                trace.clear()  # (a compiled loop that failed part-way)
        return integrate_per_sample(
            prob.func,
            y0_,
            prob.t_out,
            method,
            ctrl,
            rtol=prob.rtol,
            atol=prob.atol,
            first_step=opts.get("first_step"),
            max_num_steps=max_steps,
            keep_dense=dense,
            trace=trace,
            step_fn=step_fn if torch.is_grad_enabled() else None,
        )

    record = SolveRecord(stats, checkpoints=getattr(mode, "checkpoints", None))
    if isinstance(mode, Adjoint) and torch.is_grad_enabled():
        # (with a backend, the backward solves run in the compiled per-sample loop too)
        cfg = _per_sample_adjoint_config(prob, mode, rhs, max_steps, backend)
        ps = _params_of(prob.func, mode.params, "params")

        def core(y0_: torch.Tensor) -> torch.Tensor:
            return per_sample_adjoint_solve(prob.func, solve_loop, y0_, ps, cfg, record)

    elif isinstance(mode, Checkpoint) and torch.is_grad_enabled():
        # (with a backend, the replayed attempts are compiled too)
        ps = _params_of(prob.func, mode.params, "params")

        replayed = functools.partial(entry.replay, opts=opts) if auto else method

        def core(y0_: torch.Tensor) -> torch.Tensor:
            return per_sample_checkpoint_solve(
                prob.func, solve_loop, y0_, ps, record, method=replayed, t_out=prob.t_out, backend=backend
            )

    else:

        def core(y0_: torch.Tensor) -> torch.Tensor:
            record.result, record.sample_stats = solve_loop(y0_)
            ys_ = record.result.ys
            if ys_.requires_grad:  # backprop passes back through every recorded (batched) evaluation
                calls = record.sample_stats["calls"]

                def count(grad: torch.Tensor) -> None:
                    stats.nfe_backward += calls

                ys_.register_hook(count)
            return ys_.view(-1, *y0_.shape)

    ys = _per_sample_time_gradient(prob, y0, core, stats) if needs_t_grad else core(y0)
    res, sample_stats = record.take_result(), record.sample_stats
    record.sample_stats = None
    res.ys = ys.reshape(ys.shape[0], -1)
    stats.nfe += sample_stats["calls"]
    stats.n_steps += res.n_steps
    stats.n_rejected += res.n_rejected
    if res.status != Status.SUCCESS and on_failure == "raise":
        raise exception_for(res.status, res.message, res.t_fail)
    m = res.ys.shape[0]
    ts = prob.t[:, :m] if rows else prob.t[:m]
    sol = Solution(ts, prob.unflatten(res.ys), stats, res.status, res.message, res.t_fail, res.segments, prob)
    sol.sample_stats = {k: v for k, v in sample_stats.items() if k != "calls"}
    return sol


def _per_sample_setup(prob: Problem) -> tuple:
    """Checks of a per-sample solve; (max_num_steps, controller, rhs, stepper)."""
    if not get_method(prob.method).per_sample:
        raise ValueError(
            f"per_sample=True needs an adaptive Runge–Kutta method ({', '.join(method_names(per_sample=True))}), "
            f"not {prob.method!r}"
        )
    _check_per_sample_state(prob)
    warn_uncalled_callbacks(prob.func, prob.method, per_sample=True)
    max_steps = int(prob.options.get("max_num_steps", DEFAULT_MAX_NUM_STEPS))
    entry = get_method(prob.method)
    explicit = entry.explicit(prob.options) if entry.name == "auto" else entry  # (auto: its explicit method)
    ctrl = make_controller(explicit.order, prob.options)
    rhs = prob.rhs()
    return max_steps, ctrl, rhs, stepper(explicit.name, rhs.n, rhs.dtype, rhs.device, "dense")


def _solve_per_sample_event(
    prob: Problem, stats: SolveStats, mode: GradientMode, on_failure: str, dense: bool
) -> Solution:
    """Every sample integrated until its own first event: located without a graph, then solved from its start
    to its event time with the gradient mode asked for; the event times get their gradients by the implicit
    function theorem, per sample."""
    from .solvers.per_sample import PerSampleEvents, integrate_per_sample

    max_steps, ctrl, rhs, method = _per_sample_setup(prob)
    y0 = prob.unflatten(prob.y0)
    B = y0.shape[0]
    rows = prob.t.ndim == 2
    t_rows = prob.t_out if rows else [prob.t_out] * B
    starts = [r[0] for r in t_rows]
    first = t_rows[0]
    direction = 1.0 if len(first) < 2 or first[1] >= first[0] else -1.0
    t0 = torch.tensor(starts, dtype=torch.float64, device=y0.device)
    with torch.no_grad():
        events = PerSampleEvents(
            prob.event_fn, y0.shape, t0, y0.reshape(B, -1), tol=float(prob.options.get("event_tol", 0.0))
        )
        res, sample_stats = integrate_per_sample(
            prob.func,
            y0.detach(),
            [[s, direction * math.inf] for s in starts],
            method,
            ctrl,
            rtol=prob.rtol,
            atol=prob.atol,
            first_step=prob.options.get("first_step"),
            max_num_steps=max_steps,
            events=events,
        )
    stats.nfe += sample_stats["calls"]
    if not bool(events.found.all()):
        b = int((~events.found).nonzero()[0])
        where = f"while looking for the event of sample {b} (and every sample without one): "
        if res.status != Status.SUCCESS:
            raise exception_for(res.status, where + res.message, res.t_fail)
        raise SolverError(where + "event_fn never changed sign", res.t_fail)
    t_ev = events.t_event
    at_start = t_ev == t0
    if bool(at_start.any()):
        b = int(at_start.nonzero()[0])
        raise SolverError(f"the event of sample {b} happens at its initial time t0={float(t0[b])}", float(t0[b]))
    # each sample from its start to its event, with gradients; the event times then get theirs
    t_start = prob.t[:, 0] if rows else prob.t[0].expand(B)
    t_pair = torch.stack([t_start, t_ev.to(dtype=prob.t.dtype, device=prob.t.device)], 1)
    sub = dataclasses.replace(prob, t=t_pair, t_out=[[s, e] for s, e in zip(starts, t_ev.tolist())], event_fn=None)
    sol = _solve_per_sample(sub, stats, mode, None, on_failure, dense)
    ys = sol.ys.reshape(2, B, -1)
    with torch.no_grad():
        g = events._raw(t_ev, ys[-1]) * events.sign0
        comp = g.argmin(1)
    t_event = t_ev.to(dtype=prob.t.dtype, device=prob.t.device)
    guard = _guard_value(
        lambda t_, y_: (events._raw(t_, y_) * events.sign0).gather(1, comp[:, None])[:, 0], t_ev, ys[-1]
    )
    t_event, y_event = _per_sample_event_time(prob, events.sign0, comp, t_event, ys[-1], guard)
    ys = torch.cat([ys[:1], y_event[None]])
    out = Solution(sol.ts, ys.view(2, *y0.shape), stats, Status.SUCCESS, "", None, sol._segments, prob, event_t=t_event)
    out.sample_stats = sol.sample_stats
    return out


def _per_sample_adjoint_config(
    prob: Problem, mode: Adjoint, rhs, max_steps: int, backend: str | None
) -> PerSampleAdjointConfig:
    """The per-sample adjoint's backward solve: an adaptive RK method, scalar tolerances, the integral
    controller (the per-sample loop's), its error on the state and adjoint of each sample (a seminorm)."""
    from .gradients.per_sample_adjoint import PerSampleAdjointConfig

    cfg = _adjoint_config(prob, mode)
    if cfg.method == "auto":
        # (the backward solve runs the explicit method per sample: the per-sample adjoint's parameter integrals
        # follow the stages of an explicit Runge–Kutta step)
        explicit = get_method("auto").explicit(cfg.options).name
        kept = {k: v for k, v in cfg.options.items() if k not in ("nonstiff", "jacobian")}
        cfg = dataclasses.replace(cfg, method=explicit, options=kept)
    if not get_method(cfg.method).per_sample:
        raise ValueError(
            f"per_sample=True with gradient='adjoint' needs an adaptive Runge–Kutta adjoint_method "
            f"({', '.join(method_names(per_sample=True))}), not {cfg.method!r}"
        )
    if not (isinstance(cfg.rtol, float) and isinstance(cfg.atol, float)):
        raise ValueError("per_sample=True with gradient='adjoint' takes scalar adjoint_rtol and adjoint_atol")
    if cfg.norm not in (None, "seminorm"):
        raise ValueError(
            "per_sample=True with gradient='adjoint' always controls the error of each sample's state and "
            "adjoint (a seminorm: the parameter integrals are left out); leave adjoint_options['norm'] unset"
        )
    unsupported = {"step_t", "jump_t"} & set(cfg.options)
    if unsupported:
        raise ValueError(f"adjoint_options {sorted(unsupported)} are not supported with per_sample=True")
    opts = cfg.options
    ctrl = make_controller(get_method(cfg.method).order, opts)
    if ctrl.beta2 != 0:
        raise ValueError("per-sample stepping uses the integral controller: leave `pcoeff` at 0 in adjoint_options")
    return PerSampleAdjointConfig(
        method=stepper(cfg.method, 1, rhs.dtype, rhs.device, "dense"),
        ctrl=ctrl,
        rtol=cfg.rtol,
        atol=cfg.atol,
        max_num_steps=int(opts.get("max_num_steps", max_steps)),
        first_step=opts.get("first_step"),
        t_out=prob.t_out,
        backend=backend,
    )


def _per_sample_time_gradient(prob: Problem, y0: torch.Tensor, core: Callable, stats: SolveStats) -> torch.Tensor:
    """Per-sample ``core(y0) -> ys (m, batch, ...)`` with gradients for every entry of ``t`` (``time_gradient_wrapper``
    per sample); costs one batched ``func`` call per output time."""
    B = y0.shape[0]
    times = torch.as_tensor(prob.t_out, dtype=torch.float64).to(y0.device)
    times = (times if times.ndim == 2 else times.expand(B, -1)).to(y0.dtype)

    def f(i: int, y: torch.Tensor) -> torch.Tensor:
        stats.nfe += 1
        with torch.no_grad():
            return prob.func(times[:, i], y)

    return time_gradient_wrapper(prob.t, y0, f, core, batch=B)


def _solve(prob: Problem, stats: SolveStats, mode: GradientMode, on_failure: str, dense: bool) -> Solution:
    t = prob.t
    record = SolveRecord(stats, dense=dense, checkpoints=getattr(mode, "checkpoints", None))
    needs_t_grad = t.requires_grad and torch.is_grad_enabled()
    extra_rhs = prob.rhs()

    def f_at(i: int, y: torch.Tensor) -> torch.Tensor:
        return extra_rhs.at(prob.t_out[i], y)

    if isinstance(mode, Backprop):

        def core(y0: torch.Tensor) -> torch.Tensor:
            rhs = prob.rhs()
            res = run(prob, rhs, y0=y0, keep_segments=dense, use_event=False)
            record.result, record.nfe = res, rhs.nfe
            if res.ys.requires_grad:
                res.ys.register_hook(_count_backprop(stats, rhs))
            return res.ys
    elif isinstance(mode, Checkpoint):
        ps = _params_of(prob.func, mode.params, "params")

        def core(y0: torch.Tensor) -> torch.Tensor:
            return checkpoint_solve(prob, y0, ps, record)
    elif isinstance(mode, Reversible):
        from .gradients.reversible import reversible_solve

        ps = _params_of(prob.func, mode.params, "params")

        first = [True]

        def forward(y0_rows: torch.Tensor):
            rhs = prob.rhs()
            res = run(prob, rhs, y0=y0_rows[0], keep_segments=dense, use_event=False)
            if first[0]:  # (not a recomputation for a second derivative: its graph must not stay on the record)
                first[0] = False
                record.result, record.nfe = res, rhs.nfe
            return res.run

        def field() -> tuple:
            rhs = prob.rhs()
            return (lambda t_, y: rhs(t_[0].to(rhs.dtype), y[0])[None]), (lambda: rhs.nfe)

        t0 = torch.tensor([prob.t_out[0]], dtype=torch.float64, device=prob.y0.device)

        def core(y0: torch.Tensor) -> torch.Tensor:
            ys_ = reversible_solve(
                forward, field, y0[None], ps, record, t0=t0, rtol=prob.rtol, atol=prob.atol, method=prob.method
            )
            return ys_[:, 0]
    else:
        ps = _params_of(prob.func, mode.params, "params")
        cfg = _adjoint_config(prob, mode)

        def core(y0: torch.Tensor) -> torch.Tensor:
            return adjoint_solve(prob, y0, t, ps, cfg, record)

    if needs_t_grad and not isinstance(mode, Adjoint):
        ys = time_gradient_wrapper(t, prob.y0, f_at, core)
    else:
        ys = core(prob.y0)
    res = record.take_result()  # the solve object must not keep the outputs alive through the graph
    stats.nfe += record.nfe + extra_rhs.nfe
    stats.n_steps += res.n_steps
    stats.n_rejected += res.n_rejected
    if res.intervals:
        stats.methods.extend(res.intervals)
    m = ys.shape[0]
    if res.status != Status.SUCCESS and on_failure == "raise":
        raise exception_for(res.status, res.message, res.t_fail)
    return Solution(t[:m], prob.unflatten(ys), stats, res.status, res.message, res.t_fail, res.segments, prob)


def _count_backprop(stats: SolveStats, rhs) -> Callable:
    def hook(grad: torch.Tensor) -> None:
        stats.nfe_backward += rhs.nfe

    return hook


def _adjoint_config(prob: Problem, mode: Adjoint) -> AdjointConfig:
    """The adjoint's backward solve, checked before the forward starts: ``mode``'s settings, each unset one
    the forward's (with the forward's method, its options under ``mode``'s)."""
    from ._problem import (
        _check_tol,
        check_method,
        check_option_values,
        check_options,
        valid_options,
    )

    rtol, atol, method, options = mode.rtol, mode.atol, mode.method, mode.backward_options()
    method = prob.method if method is None else check_method(method, "adjoint_method")
    if method == "scipy_solver" and mode.method is None:
        # a forward solve by scipy: the backward solve of the augmented system needs a neuralode method
        method, options = "dopri5", {k: v for k, v in (options or {}).items() if k != "solver"}
    if method == "scipy_solver":
        raise ValueError(
            "adjoint_method='scipy_solver' cannot solve the adjoint's augmented system; use a neuralode method"
        )
    options = check_options(options, "adjoint_options")
    if method == prob.method:
        # the backward solve with the forward's method keeps the forward's options (a fixed step size, above
        # all) unless adjoint_options overrides them: adjoint_options=dict(norm="seminorm") must not drop
        # step_size and silently fall back to stepping on the output grid
        inherited = {k: v for k, v in prob.options.items() if k not in ("norm", "compile")}
        options = {**inherited, **options}
    norm = options.pop("norm", None)
    if not (norm is None or norm == "seminorm" or callable(norm)):
        raise ValueError(f"adjoint_options['norm'] must be 'seminorm' or a callable on the scaled error, got {norm!r}")
    unknown = set(options) - valid_options(method)
    if unknown:
        raise ValueError(
            f"unknown adjoint_options {sorted(unknown)} for adjoint_method {method!r}; valid: "
            f"{sorted(valid_options(method))}"
        )
    check_option_values(method, options, "adjoint_options")  # at the forward, not halfway through the backward
    shapes, shape = prob.shapes, prob.shape
    rtol = prob.rtol if rtol is None else _check_tol("adjoint_rtol", rtol, prob.y0, shapes, shape)
    atol = prob.atol if atol is None else _check_tol("adjoint_atol", atol, prob.y0, shapes, shape)
    # compile=True: the backward solve runs in the compiled device loop where it can (gradients.adjoint)
    compile_ = prob.options.get("compile", False)
    return AdjointConfig(rtol=rtol, atol=atol, method=method, options=options, norm=norm, compile=compile_)


def _solve_event(prob: Problem, stats: SolveStats, mode: GradientMode, on_failure: str, dense: bool) -> Solution:
    t_out = prob.t_out
    direction = 1.0 if len(t_out) < 2 or t_out[1] >= t_out[0] else -1.0
    rhs = prob.rhs()
    with torch.no_grad():
        res = run(prob, rhs, t_out=[t_out[0]], event_t_end=direction * math.inf)
    stats.nfe += rhs.nfe
    if res.event_t is None:
        if res.status != Status.SUCCESS:
            raise exception_for(res.status, "while looking for the event: " + res.message, res.t_fail)
        raise SolverError(f"no event found: {res.message or 'event_fn never changed sign'}", res.t_fail)
    t_ev = float(res.event_t)
    # the solution up to the event with the requested gradient mode; the event time then gets its gradient
    t_pair = torch.tensor([t_out[0], t_ev], dtype=prob.t.dtype, device=prob.t.device)
    if prob.t.requires_grad:
        t_pair = torch.stack([prob.t[0], t_pair[1]])
    if t_ev == t_out[0]:
        raise SolverError(f"the event happens at the initial time t0={t_ev}", t_ev)
    sub = Problem(
        prob.func,
        prob.y0,
        t_pair,
        [t_out[0], t_ev],
        prob.method,
        prob.options,
        prob.rtol,
        prob.atol,
        prob.shapes,
        prob.shape,
        prob.norm,
        None,
    )
    sol = _solve(sub, stats, mode, on_failure, dense)
    ys = torch.cat([y.reshape(2, -1) for y in sol.ys], 1) if prob.is_tuple else sol.ys.reshape(2, -1)
    with torch.no_grad():
        g = prob.event_fn(
            torch.tensor(t_ev, dtype=prob.y0.dtype, device=prob.y0.device), prob.unflatten(ys[-1])
        ).reshape(-1)
        g0 = prob.event_fn(
            torch.tensor(t_out[0], dtype=prob.y0.dtype, device=prob.y0.device), prob.unflatten(prob.y0)
        ).reshape(-1)
        sign0 = torch.sign(g0)
        comp = int(torch.argmin(g * sign0))
    t_event = torch.tensor(t_ev, dtype=prob.t.dtype, device=prob.t.device)
    s0 = float(sign0[comp])
    guard = _guard_value(
        lambda t_, y_: prob.event_fn(t_, prob.unflatten(y_)).reshape(-1)[comp] * s0,
        torch.tensor(t_ev, dtype=prob.y0.dtype, device=prob.y0.device),
        ys[-1],
    )
    t_event, y_event = _event_time(prob, comp, s0, t_event, ys[-1], guard)
    ys = torch.cat([ys[:-1], y_event[None]])
    return Solution(
        sol.ts,
        prob.unflatten(ys) if prob.is_tuple else ys.view(2, *prob.shape),
        stats,
        Status.SUCCESS,
        "",
        None,
        sol._segments,
        prob,
        event_t=t_event,
    )
