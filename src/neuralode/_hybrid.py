"""Hybrid solves: events that reset the state and let the solve go on (``solve(..., events=[Event(...)])``).

The solve is a chain of segments. In each, the first zero crossing of any event function before the end is
located without a graph (the same root finder as ``event_fn``); the segment is then solved with the requested
gradient mode up to that time, the event time gets its gradient by the implicit function theorem (``_events``:
through the state, the time and the event function's own parameters), the reset map is applied, and the next
segment starts at the event time, differentiably in its start time and state. Composed by autograd this is the
sensitivity jump with the saltation matrix (Aizerman & Gantmacher 1958; Chen, Amos & Nickel 2021 for learned
event functions): the start-time gradient of the next segment supplies the −f⁺ dτ term.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import torch

from ._errors import SolverError, Status, exception_for
from ._events import EventTime, guard_value
from ._problem import prepare, run
from ._solution import Solution
from .gradients.common import SolveStats

__all__ = ["Event", "solve_with_events"]

#: events closer together than this many ulps of the time, several times in a row, are taken as accumulating
_ZENO_ULPS = 1e4
_ZENO_RUN = 3


@dataclasses.dataclass(frozen=True)
class Event:
    """An event of a hybrid solve: a zero crossing of ``fn(t, y)``.

    Arguments:
        fn: ``fn(t, y) -> tensor``; every entry is a guard, and the event happens where one crosses zero.
            ``fn`` may use tensors that require grad: they get gradients through the event times.
        reset: ``reset(t, y) -> y⁺``, the state the solve continues from (same structure as ``y``); None
            leaves the state as it is (the event is then only recorded, or stops the solve).
        terminal: stop the solve at this event.
        direction: ``-1``: only crossings from positive to negative; ``+1``: from negative to positive;
            ``0``: both.

    Example:
        ```python
        import torch
        import neuralode

        # a ball dropped from height 1 bouncing with restitution 0.8: y = (height, velocity)
        bounce = neuralode.Event(lambda t, y: y[0], reset=lambda t, y: torch.stack([y[0], -0.8 * y[1]]),
                                 direction=-1)
        sol = neuralode.solve(lambda t, y: torch.stack([y[1], torch.full_like(y[1], -9.81)]),
                              torch.tensor([1.0, 0.0], dtype=torch.float64),
                              torch.linspace(0, 1.5, 4, dtype=torch.float64), events=[bounce])
        print(sol.event_times)  # first bounce at sqrt(2 / 9.81) = 0.4515
        ```
    """

    fn: Callable
    reset: Callable | None = None
    terminal: bool = False
    direction: int = 0

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise TypeError(f"Event(fn=...) must be callable as fn(t, y), got {type(self.fn).__name__}")
        if self.reset is not None and not callable(self.reset):
            raise TypeError(
                f"Event(reset=...) must be callable as reset(t, y) or None, got {type(self.reset).__name__}"
            )
        if not isinstance(self.terminal, bool):
            raise TypeError(f"Event(terminal=...) must be True or False, got {self.terminal!r}")
        if isinstance(self.direction, bool) or self.direction not in (-1, 0, 1):
            raise ValueError(f"Event(direction=...) must be -1, 0 or 1, got {self.direction!r}")


def _flat(y: Any) -> torch.Tensor:
    return torch.cat([x.reshape(-1) for x in y]) if isinstance(y, (tuple, list)) else y.reshape(-1)


def solve_with_events(
    solve: Callable,
    func: Callable,
    y0: Any,
    t: torch.Tensor,
    events: Sequence[Event],
    *,
    max_events: int,
    kw: dict,
) -> Solution:
    """``solve(func, y0, t, events=events, **kw)``: the segments between events, each by ``solve``."""
    events = list(events)
    for i, e in enumerate(events):
        if not isinstance(e, Event):
            raise TypeError(f"`events[{i}]` must be a neuralode.Event, got {type(e).__name__}")
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        raise ValueError(f"`max_events` must be a positive int, got {max_events!r}")
    if not torch.is_tensor(t) or t.ndim != 1:
        raise ValueError("with `events`, `t` must be a 1-D tensor of output times")
    times = t.detach().double().tolist()
    direction = 1.0 if len(times) < 2 or times[-1] >= times[0] else -1.0
    t_end = times[-1]
    stats = SolveStats()
    outputs: list = [y0]
    event_times: list[torch.Tensor] = []
    event_index: list[int] = []
    event_states: list = []
    k = 1  # next output
    t_c, y_c = t[0], y0
    close_run = 0
    crossed: int | None = None  # the guard whose crossing started this segment
    method, rtol, atol, options = kw.get("method"), kw.get("rtol", 1e-7), kw.get("atol", 1e-9), kw.get("options")

    def guards(tt: torch.Tensor, y: Any) -> tuple[torch.Tensor, list[int]]:
        values, owner = [], []
        for i, e in enumerate(events):
            g = e.fn(tt, y)
            if not torch.is_tensor(g):
                raise TypeError(f"`events[{i}].fn` must return a tensor, got {type(g).__name__}")
            g = g.reshape(-1)
            values.append(g)
            owner += [i] * g.numel()
        return torch.cat(values), owner

    while True:
        t_cf = float(t_c.detach())
        while k < len(times) and times[k] == t_cf:  # (an output at an event time: the state after the reset)
            outputs.append(y_c)
            k += 1
        if k >= len(times):
            break
        y_det = tuple(x.detach() for x in y_c) if isinstance(y_c, (tuple, list)) else y_c.detach()
        with torch.no_grad():
            probe = prepare(func, y_det, torch.tensor([t_cf, t_end], dtype=torch.float64), rtol, atol, method, options)
            tt = torch.tensor(t_cf, dtype=probe.y0.dtype, device=probe.y0.device)
            g_c, owner = guards(tt, y_det)
            # the side each guard is on. The guard that just crossed sits at zero to within the solve's error
            # (either side): it takes the side it moves to, as does any other guard at zero
            signs = torch.sign(g_c)
            near = g_c.abs() <= 1e-12 * g_c.abs().amax().clamp(min=1.0)
            if crossed is not None:
                near[crossed] = True
            if bool(near.any()):
                dt = direction * 1e-7 * max(1.0, abs(t_end - t_cf))
                f = probe.rhs().at(t_cf, probe.y0)
                ahead, _ = guards(tt + dt, probe.unflatten(probe.y0 + dt * f))
                signs = torch.where(near, torch.sign(ahead - g_c), signs)
            signs = torch.where(signs == 0, torch.ones_like(signs), signs)

            def seg_fn(tq: torch.Tensor, y: Any, signs=signs, t_cf=t_cf) -> torch.Tensor:
                if float(tq) == t_cf:  # (the start: every guard on its own side, whatever round-off says)
                    return torch.ones_like(signs)
                return signs * guards(tq, y)[0]

            locate = prepare(
                func, y_det, torch.tensor([t_cf, t_end], dtype=torch.float64), rtol, atol, method, options, seg_fn
            )
            rhs = locate.rhs()
            res = run(locate, rhs, t_out=[t_cf], event_t_end=t_end)
        stats.nfe += rhs.nfe
        if res.event_t is None:
            if res.status != Status.SUCCESS:
                raise exception_for(res.status, "while looking for events: " + res.message, res.t_fail)
            grid = torch.cat([t_c.reshape(1), t[k:]])
            sol = solve(func, y_c, grid, **kw)
            _add(stats, sol.stats)
            outputs += _rows(sol.ys)[1:]
            break
        t_ev = float(res.event_t)
        inside = [j for j in range(k, len(times)) if direction * (times[j] - t_ev) < 0]
        grid = torch.cat([t_c.reshape(1), t[inside], torch.tensor([t_ev], dtype=t.dtype, device=t.device)])
        sol = solve(func, y_c, grid, **kw)
        _add(stats, sol.stats)
        rows = _rows(sol.ys)
        outputs += rows[1:-1]
        k += len(inside)
        y_minus = rows[-1]
        with torch.no_grad():
            g_ev = signs * guards(torch.tensor(t_ev, dtype=probe.y0.dtype, device=probe.y0.device), y_minus)[0]
            comp = int(torch.argmin(g_ev))
        crossing = -int(signs[comp])  # (+1: the guard rose through zero, −1: it fell)
        crossed = comp
        event = events[owner[comp]]
        if event.direction not in (0, crossing):  # a crossing the event does not count: go on from there
            t_c, y_c = torch.tensor(t_ev, dtype=t.dtype, device=t.device), y_minus
            continue
        # the event time, differentiable in the state, the start and the event function's parameters
        prob = prepare(
            func,
            y_minus,
            torch.tensor([t_cf, t_ev], dtype=torch.float64),
            rtol,
            atol,
            method,
            options,
            lambda tq, y, signs=signs: signs * guards(tq, y)[0],  # (kept by the backward: bound now)
        )
        y_flat = _flat(y_minus)
        tq = torch.tensor(t_ev, dtype=y_flat.dtype, device=y_flat.device)
        g = guard_value(
            lambda a, b, s=float(signs[comp]), c=comp, p=prob: s * guards(a, p.unflatten(b))[0][c], tq, y_flat
        )
        t_event, y_flat = EventTime.apply(
            prob, comp, 1.0, torch.tensor(t_ev, dtype=t.dtype, device=t.device), y_flat, g
        )
        y_minus = prob.unflatten(y_flat)
        event_times.append(t_event)
        event_index.append(owner[comp])
        event_states.append(y_minus)
        if event.terminal:
            break
        close_run = close_run + 1 if abs(t_ev - t_cf) <= _ZENO_ULPS * math.ulp(max(abs(t_ev), 1.0)) else 0
        if len(event_times) > max_events and close_run < _ZENO_RUN:
            raise SolverError(
                f"more than max_events={max_events} events by t={t_ev:.10g}; pass a larger max_events if they are "
                "expected, or check the events' functions and resets",
                t_ev,
            )
        if close_run >= _ZENO_RUN:
            raise SolverError(
                f"events accumulate: {len(event_times)} events up to t={t_ev:.10g}, the last ones "
                f"{abs(t_ev - t_cf):.3g} apart (Zeno behaviour, e.g. a bouncing ball coming to rest). Stop the "
                "solve before that time, make the event terminal, or change the reset so that the events "
                "stop",
                t_ev,
            )
        t_c = t_event
        y_c = y_minus if event.reset is None else event.reset(t_event.to(y_flat.dtype), y_minus)
    n = len(outputs)
    ys = (
        tuple(torch.stack([o[i] for o in outputs]) for i in range(len(outputs[0])))
        if isinstance(y0, (tuple, list))
        else torch.stack(outputs)
    )
    sol = Solution(t[:n], ys, stats, Status.SUCCESS, "", None, None, None)
    sol.event_times = torch.stack(event_times) if event_times else t.new_zeros(0)
    sol.event_index = event_index
    sol.event_states = event_states
    return sol


def _rows(ys: Any) -> list:
    """A solution's outputs one time at a time (tuples for a tuple state)."""
    if isinstance(ys, (tuple, list)):
        return [tuple(x[i] for x in ys) for i in range(ys[0].shape[0])]
    return list(ys.unbind(0))


def _add(total: SolveStats, part: SolveStats) -> None:
    total.nfe += part.nfe
    total.n_steps += part.n_steps
    total.n_rejected += part.n_rejected
