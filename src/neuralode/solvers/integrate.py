"""The integration loop: cover ``[t0, tN]`` with steps, emit the solution at the requested times, find
events, count the cost. It knows nothing about gradients; :mod:`neuralode.gradients` drives it.

Time bookkeeping is in Python floats (double precision); ``func`` receives time as a 0-d tensor of the
state's dtype and device. The state is one flat tensor (the public layer flattens tuples and shapes).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, Sequence

import torch

from .._errors import Status, caller_stacklevel
from .control import StepController, initial_step
from .runge_kutta import RungeKutta, Segment, view_args

__all__ = ["RHS", "IntegrationResult", "integrate_adaptive", "integrate_fixed", "Outputs"]

_EPS = 2.220446049250313e-16


class RHS:
    """``func`` seen by the solvers: flat state in, flat derivative out, evaluations counted.

    The first call checks ``func``'s output (shape, dtype, device) and raises a clear error.
    """

    __slots__ = ("func", "shape", "n", "dtype", "device", "nfe", "_checked", "unflatten", "buffer_shape", "into")

    def __init__(
        self,
        func: Callable,
        shape: torch.Size,
        dtype: torch.dtype,
        device: torch.device,
        unflatten: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        self.func = func
        self.shape = shape
        self.n = int(math.prod(shape))
        self.dtype, self.device = dtype, device
        self.nfe = 0
        self._checked = False
        dims = view_args(shape)
        self.unflatten = unflatten if unflatten is not None else (lambda y: y.view(*dims))
        #: the state's shape for stage buffers viewed in it (None for tuple states: they go through flat)
        self.buffer_shape = shape if unflatten is None else None
        #: optional ``into(t, y, out)`` writing f(t, y) straight into ``out`` (internal right-hand sides, such
        #: as the adjoint's augmented dynamics, use it to skip a state-sized temporary per evaluation)
        self.into: Callable | None = None

    def shaped_into(self, t: torch.Tensor, y: torch.Tensor, out: torch.Tensor) -> None:
        """Evaluate on a state in its own shape, writing the result into ``out`` (same shape)."""
        if self.into is not None:
            self.nfe += 1
            self.into(t, y, out)
        else:
            out.copy_(self.shaped(t, y))

    def shaped(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Evaluate on a state already in its own shape; the output is returned unflattened."""
        self.nfe += 1
        out = self.func(t, y)
        if not self._checked:
            out = self._check(out)
        return out

    def __call__(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.nfe += 1
        out = self.func(t, self.unflatten(y))
        if not self._checked:
            out = self._check(out)
        return out.reshape(-1) if torch.is_tensor(out) else self._flatten_tuple(out)

    def _flatten_tuple(self, out) -> torch.Tensor:
        return torch.cat([o.reshape(-1) for o in out])

    def _check(self, out):
        self._checked = True
        if (
            torch.is_tensor(out)
            and self.buffer_shape is not None
            and out.shape == self.shape
            and out.dtype == self.dtype
            and out.device == self.device
            and not is_vmapped(out)
        ):
            return out
        if any(torch.is_tensor(o) and is_vmapped(o) for o in (out if isinstance(out, (tuple, list)) else (out,))):
            raise RuntimeError(VMAP_MESSAGE)
        shaped = self.unflatten(torch.zeros(self.n, dtype=self.dtype, device=self.device))
        if isinstance(shaped, tuple):
            if not isinstance(out, (tuple, list)) or len(out) != len(shaped):
                raise TypeError(
                    f"`func` must return a tuple of {len(shaped)} tensors (one per entry of the tuple `y0`), "
                    f"got {type(out).__name__}"
                )
            pairs = list(zip(out, shaped))
        else:
            if not torch.is_tensor(out):
                raise TypeError(f"`func` must return a tensor, got {type(out).__name__}")
            pairs = [(out, shaped)]
        for i, (o, s) in enumerate(pairs):
            where = f" (tuple entry {i})" if len(pairs) > 1 else ""
            if not torch.is_tensor(o):
                raise TypeError(f"`func` must return tensors{where}, got {type(o).__name__}")
            if o.shape != s.shape:
                raise ValueError(
                    f"`func` returned shape {tuple(o.shape)}{where} but the state `y0` has shape {tuple(s.shape)}; "
                    "dy/dt must have the shape of y"
                )
            if o.dtype != s.dtype:
                raise TypeError(
                    f"`func` returned dtype {o.dtype}{where} but `y0` has dtype {s.dtype}; "
                    "cast y0 or make func return the state's dtype"
                )
            if o.device != s.device:
                raise ValueError(f"`func` returned a tensor on {o.device}{where} but `y0` is on {s.device}")
        return out

    def at(self, t: float, y: torch.Tensor, perturb: int = 0) -> torch.Tensor:
        """Evaluate at a float time; ``perturb=±1`` evaluates just after/before ``t`` (in the state dtype)."""
        tt = torch.scalar_tensor(t, dtype=self.dtype, device=self.device)
        if perturb:
            tt = torch.nextafter(
                tt, torch.full((), math.copysign(math.inf, perturb), dtype=self.dtype, device=self.device)
            )
        return self(tt, y)

    def time(self, t: float) -> torch.Tensor:
        return torch.scalar_tensor(t, dtype=self.dtype, device=self.device)


_is_batched = getattr(getattr(torch._C, "_functorch", None), "is_batchedtensor", None)
VMAP_MESSAGE = (
    "neuralode's solvers cannot run under torch.func.vmap: an adaptive step's accept/reject decision and every "
    "solver's in-place stage arithmetic do not batch. Put the batch in the state instead (y0 of shape "
    "(batch, ...), with func batched over it), and pass solve(..., per_sample=True) to give each sample its own "
    "steps; parameters that differ per sample can be part of the state (with zero derivative) or indexed by "
    "batch inside func"
)


def is_vmapped(x: torch.Tensor) -> bool:
    """Whether ``x`` is batched by ``torch.func.vmap`` (the solvers then cannot run: VMAP_MESSAGE)."""
    return _is_batched is not None and _is_batched(x)


@dataclasses.dataclass
class IntegrationResult:
    ys: torch.Tensor  # (number of requested times reached, N)
    status: Status
    message: str = ""
    t_fail: float | None = None
    n_steps: int = 0
    n_rejected: int = 0
    segments: list | None = None
    event_t: float | None = None
    event_y: torch.Tensor | None = None
    method: Any = None  # the bound stepper (RungeKutta) that produced this result
    next_step: float | None = None  # adaptive: the controller's proposal after the last accepted step
    stop: tuple | None = None  # (t, y) where a ``switch`` hook ended the solve early (``method="auto"``)
    intervals: list | None = None  # method="auto": (method name, t_start, t_end) of each phase


def block_rms_max(sizes: Sequence[int], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """Norm of a flat vector made of blocks: the largest of the blocks' RMS values (torchdiffeq's mixed
    norm for tuples). Small vectors: one vectorised reduction whatever the number of blocks; large ones
    (where per-element temporaries would cost memory): one norm per block, on views."""
    sizes = [int(s) for s in sizes]
    total = sum(sizes)
    if total >= _BLOCKWISE_FROM:
        bounds, start = [], 0
        for s in sizes:
            bounds.append((start, start + s, 1.0 / math.sqrt(max(s, 1))))
            start += s

        def blockwise(x: torch.Tensor) -> torch.Tensor:
            return torch.stack([torch.linalg.vector_norm(x[a:b]) * w for a, b, w in bounds]).max()

        return blockwise
    idx = torch.repeat_interleave(torch.arange(len(sizes), device=device), torch.tensor(sizes, device=device))
    counts = torch.tensor([max(s, 1) for s in sizes], device=device)

    def norm(x: torch.Tensor) -> torch.Tensor:
        sq = torch.zeros(len(sizes), dtype=x.dtype, device=x.device).index_add_(0, idx, x[:total] * x[:total])
        return (sq / counts).max().sqrt()

    return norm


_BLOCKWISE_FROM = 1 << 16


class Outputs:
    """Collects the solution at the requested times (and events, and segments for dense output)."""

    def __init__(
        self,
        t_out: Sequence[float],
        direction: float,
        y0: torch.Tensor,
        keep_segments: bool,
        event: "EventLocator | None",
    ) -> None:
        self.t_out = t_out
        self.direction = direction
        self.next = 1
        #: single states (1-D) and interpolated blocks (2-D), stacked once at the end
        self.chunks = [y0]
        self._blocks = False
        self.segments = [] if keep_segments else None
        self.event = event
        self.done = len(t_out) <= 1 and event is None

    def wants_interpolation(self, t1: float) -> bool:
        """Whether a segment ending at ``t1`` will be interpolated (not only read at its end)."""
        if self.event is not None or self.segments is not None:
            return True
        return self.next < len(self.t_out) and self.direction * (self.t_out[self.next] - t1) < 0

    def add(self, seg: Segment) -> bool:
        """Consume one accepted step; returns ``True`` once everything requested has been produced."""
        if self.segments is not None:
            self.segments.append(seg)
        if self.event is not None:
            return self.event.check(seg)
        d, t_out, n = self.direction, self.t_out, len(self.t_out)
        j = self.next
        while j < n and d * (t_out[j] - seg.t1) <= 0:
            j += 1
        if j > self.next:
            ts = t_out[self.next : j]
            if ts[-1] == seg.t1:
                if len(ts) > 1:
                    self.chunks.append(seg(ts[:-1]))
                    self._blocks = True
                self.chunks.append(seg.y1)
            else:
                self.chunks.append(seg(ts))
                self._blocks = True
            self.next = j
        self.done = j >= n
        return self.done

    def result(self) -> torch.Tensor:
        if not self._blocks:  # only states at step ends: one stack (no per-row unsqueeze)
            return torch.stack(self.chunks)
        return torch.cat([c if c.ndim == 2 else c[None] for c in self.chunks], 0)


class EventLocator:
    """Finds the first time ``event_fn(t, y)`` changes sign, by the Illinois method on the dense output.

    Several event functions (a tensor output) are combined as in torchdiffeq: each is made positive at
    the start and the event is when the smallest of them reaches zero.
    """

    #: iterations of the root finder; each halves the bracket at least every other iteration
    MAX_ITERS = 200

    def __init__(self, event_fn: Callable, rhs: RHS, t0: float, y0: torch.Tensor, tol: float = 0.0) -> None:
        self.event_fn = event_fn
        self.rhs = rhs
        with torch.no_grad():
            g0 = event_fn(rhs.time(t0), rhs.unflatten(y0))
            if not torch.is_tensor(g0):
                raise TypeError(f"`event_fn` must return a tensor, got {type(g0).__name__}")
            self.sign0 = torch.sign(g0)
            if bool((self.sign0 == 0).any()):
                raise ValueError(f"`event_fn` is exactly zero at the initial time t0={t0}; start away from the event")
        self.tol = tol
        self.t_event: float | None = None
        self.y_event: torch.Tensor | None = None

    def value(self, t: float, y: torch.Tensor) -> float:
        with torch.no_grad():
            return float((self.event_fn(self.rhs.time(t), self.rhs.unflatten(y)) * self.sign0).min())

    def check(self, seg: Segment) -> bool:
        g1 = self.value(seg.t1, seg.y1)
        if g1 > 0:
            return False
        # bracket [a, b] with g(a) > 0 >= g(b)
        a, b = seg.t0, seg.t1
        ga, gb = self.value(seg.t0, seg.y0), g1
        side = 0
        tol = self.tol if self.tol > 0 else 4 * _EPS * max(abs(a), abs(b), 1e-300)
        for _ in range(self.MAX_ITERS):
            if gb == 0 or abs(b - a) <= tol:
                break
            m = b - gb * (b - a) / (gb - ga) if ga != gb else 0.5 * (a + b)
            if not (min(a, b) < m < max(a, b)):
                m = 0.5 * (a + b)
            gm = self.value(m, seg([m])[0])
            if gm > 0:
                a, ga = m, gm
                if side == -1:
                    gb *= 0.5
                side = -1
            else:
                b, gb = m, gm
                if side == 1:
                    ga *= 0.5
                side = 1
        self.t_event = b
        self.y_event = seg.y1 if b == seg.t1 else seg([b])[0]
        return True


class HermiteSegment:
    """Linear or cubic Hermite interpolation between two grid points (multistep methods)."""

    __slots__ = ("t0", "t1", "y0", "y1", "f0", "f1")

    def __init__(self, t0, t1, y0, y1, f0=None, f1=None) -> None:
        self.t0, self.t1, self.y0, self.y1, self.f0, self.f1 = t0, t1, y0, y1, f0, f1

    def __call__(self, ts) -> torch.Tensor:
        h = self.t1 - self.t0
        th = torch.tensor([(t - self.t0) / h for t in ts], dtype=self.y0.dtype, device=self.y0.device)[:, None]
        dy = self.y1 - self.y0
        if self.f0 is None:
            return self.y0 + th * dy
        h10 = th * (1 - th) ** 2
        h01 = th * th * (3 - 2 * th)
        h11 = th * th * (th - 1)
        return self.y0 + h01 * dy + h * (h10 * self.f0 + h11 * self.f1)


def _l2_norm(x: torch.Tensor) -> float:
    """‖x‖₂ of a flat vector as a float: one dot product (``vector_norm`` costs an extra pass and kernel
    for |x|). Where the sum of squares overflows (float32 entries beyond ~1e19) the norm is taken of x
    scaled by its largest entry, so a huge but finite error stays finite (a rejected step, not a
    non-finite state); NaN stays NaN."""
    if x.is_complex():
        return float(torch.linalg.vector_norm(x))
    sq = float(torch.dot(x, x))
    if sq < math.inf:
        return math.sqrt(sq)
    m = float(x.abs().max())
    if not 0 < m < math.inf:  # NaN or an infinite entry
        return m
    y = x / m
    return m * math.sqrt(float(torch.dot(y, y)))


def _callbacks(func: Any, names: Sequence[str]) -> list:
    if isinstance(func, torch.nn.Module) and type(func).__getattr__ is torch.nn.Module.__getattr__:
        # the lookups nn.Module's attribute access makes, without the AttributeError (and its formatted
        # message) that a missing attribute costs through Module.__getattr__: ~4 µs a solve
        d, cls = func.__dict__, type(func)
        return [
            getattr(func, n)
            if n in d or hasattr(cls, n) or n in d["_parameters"] or n in d["_buffers"] or n in d["_modules"]
            else None
            for n in names
        ]
    return [getattr(func, n, None) for n in names]


CALLBACK_NAMES = ("callback_step", "callback_accept_step", "callback_reject_step")
_WARNED_CALLBACKS: set = set()


def warn_uncalled_callbacks(func: Any, method: str, adjoint: bool = False, per_sample: bool = False) -> None:
    """A UserWarning where ``func`` defines callbacks that ``method`` never calls, for a method outside the
    adaptive Runge–Kutta and Rosenbrock families (those call all three): the fixed-grid and multistep loops
    take every step, so they call only ``callback_step``; scipy's solvers call none. ``adjoint``: check the
    ``*_adjoint`` callbacks, which the adjoint's backward solve calls. torchdiffeq warns likewise, at every
    solve; here once per method and set of callbacks (a training loop solves thousands of times)."""
    called = () if method == "scipy_solver" or per_sample else ("callback_step",)
    suffix = "_adjoint" if adjoint else ""
    names = [n + suffix for n in CALLBACK_NAMES if n not in called]
    uncalled = tuple(n for n, cb in zip(names, _callbacks(func, names)) if cb is not None)
    if not uncalled or (method, per_sample, uncalled) in _WARNED_CALLBACKS:
        return
    _WARNED_CALLBACKS.add((method, per_sample, uncalled))
    which = "calls no callbacks" if not called else "calls only callback_step (it never accepts or rejects a step)"
    role = "adjoint_method" if adjoint else "method"
    solver = f"per-sample stepping (per_sample=True) with {method!r}" if per_sample else f"{role} {method!r}"
    warnings.warn(
        f"func defines {', '.join(uncalled)}, which {solver} never calls: it {which}",
        UserWarning,
        stacklevel=caller_stacklevel(),
    )


def _underflow(t: float, dt: float, min_step: float) -> bool:
    """The step no longer moves t. (A step at ``min_step`` is accepted whatever its error: torchdiffeq's
    ``min_step``, which never underflows; ``min_step`` is kept in the signature for the message.)"""
    return t + dt == t or abs(dt) < 4 * _EPS * abs(t)


def integrate_adaptive(
    rhs: RHS,
    y0: torch.Tensor,
    t_out: Sequence[float],
    method: RungeKutta,
    ctrl: StepController,
    *,
    rtol: float | torch.Tensor,
    atol: float | torch.Tensor,
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
    first_step: float | None = None,
    step_t: Sequence[float] = (),
    jump_t: Sequence[float] = (),
    max_num_steps: int = 100_000,
    callbacks: Any = None,
    keep_segments: bool = False,
    event: EventLocator | None = None,
    t_end: float | None = None,
    trace: list | None = None,
    switch: Callable | None = None,
) -> IntegrationResult:
    """Adaptive Runge–Kutta integration from ``t_out[0]`` through every time in ``t_out``.

    ``t_end`` (events) replaces ``t_out[-1]`` as the horizon; with an event the loop stops at the event.
    ``switch(K, dt_taken, dt_next)`` (``method="auto"``) is asked after each accepted step that does not end
    the solve; when it returns True the loop stops there and the result's ``stop`` holds ``(t, y)``.
    """
    t = float(t_out[0])
    t_end = float(t_out[-1]) if t_end is None else float(t_end)
    direction = 1.0 if t_end >= t else -1.0
    out = Outputs(t_out, direction, y0, keep_segments, event)
    if t_end == t:
        return IntegrationResult(out.result(), Status.SUCCESS)

    cb_step, cb_accept, cb_reject = _callbacks(
        callbacks, ("callback_step", "callback_accept_step", "callback_reject_step")
    )
    fresh = torch.is_grad_enabled() or keep_segments
    S, fsal = method.stages, method.fsal
    inv_sqrt_n = 1.0 / math.sqrt(max(rhs.n, 1))
    if norm is None:
        ratio_of = _l2_norm
        norm_scale = inv_sqrt_n
    else:

        def ratio_of(x: torch.Tensor) -> float:
            return float(norm(x))

        norm_scale = 1.0

    # Grid points (step_t) and discontinuities (jump_t) strictly inside the interval, then the end.
    inside = lambda s: direction * (s - t) > 0 and direction * (t_end - s) > 0  # noqa: E731
    marks = {float(s): False for s in step_t if inside(float(s))}
    marks.update({float(s): True for s in jump_t if inside(float(s))})
    bounds = sorted(marks.items(), key=lambda kv: direction * kv[0]) + [(t_end, False)]
    bi = 0

    y = y0
    shape = rhs.buffer_shape
    # without a graph one buffer serves every step: the next step's first row is written over the old one
    # (FSAL: copied from the last row) once the accepted step's output has been interpolated
    buf = method.new_buffer() if fresh else method.acquire(shape)
    f0 = rhs.at(t, y)
    buf.set(0, f0)
    # scale = atol + rtol·max(|y0|, |y1|); with scalar tolerances it is rtol·(max + atol/rtol): one op fewer
    scalar_tol = isinstance(rtol, float) and isinstance(atol, float) and rtol > 0
    # (a 0-d tensor: adding a Python float to a tensor is a slower path in eager PyTorch than a 0-d tensor)
    tol_shift = torch.scalar_tensor(atol / rtol, dtype=y0.dtype, device=y0.device) if scalar_tol else None
    inv_rtol = 1.0 / rtol if scalar_tol else 1.0
    low_memory = not fresh and buf.scratch is not None and buf.scratch.shape == y.shape and rhs.n >= _BLOCKWISE_FROM
    y_abs = None if low_memory else y.detach().abs()
    if first_step is None:

        def scale_norm(x: torch.Tensor) -> float:
            return ratio_of(x) * norm_scale

        order = method.tableau.order
        if fresh:  # (entering no_grad costs a few µs: only where a graph is being recorded)
            with torch.no_grad():
                dt, _ = initial_step(rhs.at, t, y, f0, direction, order, rtol, atol, scale_norm, y_abs, tol_shift)
        else:
            dt, _ = initial_step(rhs.at, t, y, f0, direction, order, rtol, atol, scale_norm, y_abs, tol_shift)
    else:
        dt = direction * abs(float(first_step))
    del f0  # its copy lives in the buffer; a state-sized tensor less for the rest of the solve
    dt = math.copysign(min(abs(dt), ctrl.max_step), direction)
    if ctrl.min_step > 0 and abs(dt) < ctrl.min_step:
        dt = direction * ctrl.min_step

    n_steps = n_rej = 0
    nonfinite_rejects = 0
    perturbed_start = False

    def error_ratio(y, y_abs, y1, e, buf):
        """‖e / scale‖ / rtol (the step's error is dt · e) and |y1| for the next step's scale."""
        if low_memory:
            # large states: max(|y|, |y1|) is built in the stage scratch (free between steps) without a
            # stored |y|: s = |y1|; s = max(s, y); s = -min(-s, y) = max(s, -y). Nothing state-sized is
            # allocated for error control.
            scale = torch.abs(y1, out=buf.scratch)
            torch.maximum(scale, y, out=scale)
            scale.neg_()
            torch.minimum(scale, y, out=scale)
            scale.neg_()
            y1_abs = None
        else:
            y1_abs = y1.abs()
            scale = torch.maximum(y_abs, y1_abs)
        if scalar_tol:
            scale.add_(tol_shift)
        else:
            scale.mul_(rtol).add_(atol)
        return ratio_of(e.div_(scale)) * norm_scale * inv_rtol, y1_abs

    status, message, t_fail = Status.SUCCESS, "", None
    stop = None
    while True:
        if n_steps + n_rej >= max_num_steps:
            status, t_fail = Status.MAX_STEPS, t
            message = _max_steps_message(max_num_steps, t, float(t_out[0]), t_end, n_steps, n_rej)
            break
        if _underflow(t, dt, ctrl.min_step):
            t_fail = t
            if nonfinite_rejects:
                status = Status.NONFINITE
                message = (
                    f"the state became NaN or Inf just after t={t:.10g}: every step from there produced "
                    "non-finite values (func returned NaN/Inf, or the solution blows up there)"
                )
                if t == float(t_out[0]):
                    message += "; check y0 and func(t0, y0) for NaN/Inf"
            else:
                status = Status.DT_UNDERFLOW
                message = _underflow_message(t, dt, ctrl.min_step, rtol, atol)
            break
        target, is_jump = bounds[bi]
        lands = direction * (t + dt - target) >= 0
        dt_try = target - t if lands else dt
        if cb_step is not None:
            cb_step(rhs.time(t), rhs.unflatten(y), rhs.time(dt_try))
        y1, e = method.step(rhs, t, dt_try, y, buf, perturb_last=lands and is_jump)
        if fresh:  # (entering no_grad costs a few µs: only where a graph is being recorded)
            with torch.no_grad():
                ratio, y1_abs = error_ratio(y, y_abs, y1, e, buf)
        else:
            ratio, y1_abs = error_ratio(y, y_abs, y1, e, buf)
        ratio *= abs(dt_try)
        e = None  # consumed: do not hold it through the next step
        # a step at the floor options['min_step'] is accepted whatever its error (torchdiffeq's min_step)
        if ratio <= 1.0 or (abs(dt_try) <= ctrl.min_step and math.isfinite(ratio)):
            t1 = target if lands else t + dt_try
            n_steps += 1
            if trace is not None:  # enough to recompute this step exactly: (t0, t1, y0, f0 perturbed, last perturbed)
                trace.append((t, t1, y, perturbed_start, lands and is_jump))
            nonfinite_rejects = 0
            wants = out.wants_interpolation(t1)
            f_next = None
            if not fsal and (wants and method.interp_needs_f1):
                f_next = rhs.at(t1, y1)
                buf.set(S, f_next)
            done = out.add(Segment(t, t1, y, y1, buf.K, method))
            if cb_accept is not None:
                cb_accept(rhs.time(t), rhs.unflatten(y), rhs.time(dt_try))
            dt = ctrl.next_step(dt_try, ratio, True)
            if lands:
                bi += 1
            if done or (lands and target == t_end):
                if event is not None and not done:
                    message = "no event before the end of the interval"
                break
            if switch is not None and switch(buf.K, dt_try, dt):
                stop = (t1, y1)
                break
            # first stage of the next step
            perturbed_start = lands and is_jump
            if perturbed_start:
                f_next = rhs.at(t1, y1, perturb=int(direction))
            elif fsal:
                f_next = buf.K[S - 1] if buf.grad else buf.rows[S - 1]
            elif f_next is None:
                f_next = rhs.at(t1, y1)
            nb = method.new_buffer() if fresh else buf
            nb.set(0, f_next)
            if low_memory:
                buf, y, t = nb, y1, t1
            else:
                buf, y, t, y_abs = nb, y1, t1, y1_abs
        else:
            n_rej += 1
            y1 = None  # the rejected state is not needed while the retry runs
            if not math.isfinite(ratio):
                nonfinite_rejects += 1
                dt = dt_try * ctrl.dfactor
            else:
                dt = ctrl.next_step(dt_try, ratio, False)
            if cb_reject is not None:
                cb_reject(rhs.time(t), rhs.unflatten(y), rhs.time(dt_try))

    if not fresh:
        method.release(buf)
    buf = None  # free the stages before the output is assembled
    ys = out.result()
    if status == Status.SUCCESS:  # an accepted state can be Inf while its error estimate is finite
        checked = finite_rows_result(ys, t_out, n_steps, None)
        if checked.status != Status.SUCCESS:
            status, message, t_fail, ys = checked.status, checked.message, checked.t_fail, checked.ys
    res = IntegrationResult(ys, status, message, t_fail, n_steps, n_rej, out.segments)
    res.next_step, res.stop = dt, stop
    if event is not None:
        res.event_t, res.event_y = event.t_event, event.y_event
    return res


def integrate_fixed(
    rhs: RHS,
    y0: torch.Tensor,
    t_out: Sequence[float],
    method: RungeKutta,
    grid: Sequence[float],
    *,
    perturb: bool = False,
    callbacks: Any = None,
    keep_segments: bool = False,
    event: EventLocator | None = None,
    trace: list | None = None,
) -> IntegrationResult:
    """Fixed-grid Runge–Kutta integration over ``grid`` (which starts at ``t_out[0]``)."""
    direction = float(getattr(grid, "direction", 0.0)) or _grid_direction(t_out)
    grid = iter(grid)
    t = float(next(grid))
    out = Outputs(t_out, direction, y0, keep_segments, event)
    (cb_step,) = _callbacks(callbacks, ("callback_step",))
    fresh = torch.is_grad_enabled() or keep_segments
    S = method.stages
    y = y0
    shape = rhs.buffer_shape
    buf = method.new_buffer() if fresh else method.acquire(shape)
    f_next = None
    n_steps = 0
    for t1 in grid:
        t1 = float(t1)
        dt = t1 - t
        if perturb or f_next is None:
            f_next = rhs.at(t, y, perturb=int(direction) if perturb else 0)
        buf.set(0, f_next)
        if cb_step is not None:
            cb_step(rhs.time(t), rhs.unflatten(y), rhs.time(dt))
        y1, _ = method.step(rhs, t, dt, y, buf, perturb_last=perturb)
        n_steps += 1
        if trace is not None:
            trace.append((t, t1, y, perturb, perturb))
        f_next = None
        wants = out.wants_interpolation(t1)
        if wants and method.interp_needs_f1:
            f_next = rhs.at(t1, y1, perturb=-int(direction) if perturb else 0)
            if method.fsal:
                buf.set(S - 1, f_next)
            else:
                buf.set(S, f_next)
            if perturb:
                f_next = None
        if out.add(Segment(t, t1, y, y1, buf.K, method)):
            break
        if fresh:
            buf = method.new_buffer()
        y, t = y1, t1
    if not fresh:
        method.release(buf)
    buf = None  # free the stages before the output is assembled
    res = finite_rows_result(out.result(), t_out, n_steps, out.segments)
    if event is not None:
        res.event_t, res.event_y = event.t_event, event.y_event
        if event.t_event is None:
            res.message = "no event before the end of the grid"
    return res


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite, by one reduction (NaN and ±Inf reach the min or max) instead of a
    state-sized boolean temporary."""
    if x.numel() == 0:
        return True
    if x.is_complex():
        return bool(torch.isfinite(x).all())
    lo, hi = torch.aminmax(x)
    # (read as Python floats: isfinite on two 0-d tensors costs several times the reduction itself)
    return math.isfinite(lo.item()) and math.isfinite(hi.item())


def finite_rows_result(ys: torch.Tensor, t_out: Sequence[float], n_steps: int, segments) -> IntegrationResult:
    """Result of a fixed-grid solve, failed with NONFINITE at the first output that is NaN/Inf (the grid
    loops have no error estimate that would notice earlier)."""
    status, message, t_fail = Status.SUCCESS, "", None
    if _all_finite(ys):
        return IntegrationResult(ys, status, message, t_fail, n_steps, 0, segments)
    finite = torch.isfinite(ys).all(dim=1)
    if not bool(finite.all()):
        i = int((~finite).nonzero()[0])
        status, t_fail = Status.NONFINITE, float(t_out[max(i - 1, 0)])
        message = (
            f"the state became NaN or Inf between t={t_out[max(i - 1, 0)]:.10g} and t={t_out[i]:.10g} "
            "(func returned NaN/Inf, the solution blows up, or step_size is too large for stability)"
        )
        ys = ys[:i]
    return IntegrationResult(ys, status, message, t_fail, n_steps, 0, segments)


def _grid_direction(t_out: Sequence[float]) -> float:
    return 1.0 if len(t_out) < 2 or t_out[-1] >= t_out[0] else -1.0


class EventGrid:
    """An unbounded uniform grid ``t0, t0 ± h, ...`` for fixed-step solves that stop at an event."""

    def __init__(self, t0: float, h: float, direction: float, max_steps: int) -> None:
        self.t0, self.h, self.direction, self.max_steps = t0, h, direction, max_steps

    def __iter__(self):
        for i in range(self.max_steps + 1):
            yield self.t0 + self.direction * self.h * i


#: where a solve looks stiff: the adaptive stiff methods first (they keep error control), fixed-step ones last
STIFF_HINT = (
    "use an adaptive stiff method: method='rodas4' (or 'rosenbrock23', 'adaptive_trbdf2'); a fixed-step "
    "implicit method ('radauIIA5', 'implicit_euler' with options={'step_size': ...}) only where no error "
    "control is wanted"
)


def _max_steps_message(max_num_steps: int, t: float, t0: float, t_end: float, n_steps: int, n_rej: int) -> str:
    frac = (t - t0) / (t_end - t0) if t_end != t0 else 1.0
    msg = (
        f"max_num_steps={max_num_steps} exceeded at t={t:.10g}, {100 * frac:.3g}% of the way from "
        f"t0={t0:.6g} to {t_end:.6g} ({n_steps} accepted and {n_rej} rejected steps). Raise "
        "options['max_num_steps'], loosen rtol/atol, or pass on_failure='return' to solve() to keep the "
        "partial solution."
    )
    if n_rej > 0.1 * max(n_steps, 1):  # stability-limited stepping rejects often (about 1 in 4 here)
        msg += (
            " The many rejected steps suggest the problem is stiff, where an explicit method needs tiny steps: "
            + STIFF_HINT
            + "."
        )
    return msg


def _underflow_message(t: float, dt: float, min_step: float, rtol: Any, atol: Any) -> str:
    def show(x):
        return f"{x:g}" if isinstance(x, float) else "tensor"

    if min_step > 0 and abs(dt) < min_step:
        why = f"the step size {abs(dt):.3g} fell below options['min_step']={min_step:g}"
    else:
        why = f"the step size fell to {abs(dt):.3g}, too small to advance t={t:.17g} in floating point"
    return (
        f"step size underflow at t={t:.10g}: {why} (rtol={show(rtol)}, atol={show(atol)}). The solution "
        "may have a singularity there or the problem may be stiff; try looser tolerances, check func "
        "near that time, or, for a stiff problem, " + STIFF_HINT + "."
    )
