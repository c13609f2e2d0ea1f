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
from ._events import event_time, guard_value, per_sample_event_time
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


def _checked(events: Sequence[Event], max_events: int, t: Any) -> list[Event]:
    events = list(events)
    for i, e in enumerate(events):
        if not isinstance(e, Event):
            raise TypeError(f"`events[{i}]` must be a neuralode.Event, got {type(e).__name__}")
    if isinstance(max_events, bool) or not isinstance(max_events, int) or max_events < 1:
        raise ValueError(f"`max_events` must be a positive int, got {max_events!r}")
    if not torch.is_tensor(t) or t.ndim != 1:
        raise ValueError("with `events`, `t` must be a 1-D tensor of output times")
    return events


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
    events = _checked(events, max_events, t)
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
        t_event, y_flat = event_time(prob, comp, 1.0, torch.tensor(t_ev, dtype=t.dtype, device=t.device), y_flat, g)
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
    total.methods.extend(part.methods)


def solve_with_events_per_sample(
    solve: Callable,
    func: Callable,
    y0: torch.Tensor,
    t: torch.Tensor,
    events: Sequence[Event],
    *,
    max_events: int,
    kw: dict,
) -> Solution:
    """``per_sample=True``: every sample of a ``(batch, ...)`` state has its own events, resets and segments.

    Each round locates, without a graph, every live sample's first crossing after its current time (the
    per-sample loop's event finder, with the guards' sides fixed per sample as in the joint chain), solves
    every sample from its current time through its outputs to its event (per-sample times, ``solve(...,
    per_sample=True)``, with the gradient mode asked for), gives the event times their gradients by the
    implicit function theorem per sample, and applies each sample's reset. Rows of per-sample times must have
    one length: a sample with fewer outputs in the round gets extra times between its last output and its
    event, whose values are dropped; a sample that is finished takes a negligible step."""
    from ._methods import get_method, make_controller, method_names, stepper
    from .solvers.per_sample import PerSampleEvents, integrate_per_sample

    events = _checked(events, max_events, t)
    B = y0.shape[0]
    shape = y0.shape
    times = t.detach().double().tolist()
    m = len(times)
    direction = 1.0 if m < 2 or times[-1] >= times[0] else -1.0
    t_end = times[-1]
    method, rtol, atol = kw.get("method"), kw.get("rtol", 1e-7), kw.get("atol", 1e-9)
    options = dict(kw.get("options") or {})
    entry = get_method("dopri5" if method is None else method)
    if entry.kind != "explicit" or not entry.per_sample:
        raise ValueError(
            "per_sample=True with `events` needs an adaptive explicit method "
            f"({', '.join(method_names(kind='explicit', per_sample=True))}), not {entry.name!r}"
        )
    probe = prepare(func, y0.detach(), t.detach(), rtol, atol, entry.name, options, per_sample=True)
    dtype, device = probe.y0.dtype, probe.y0.device
    if not (isinstance(probe.rtol, float) and isinstance(probe.atol, float)):
        raise ValueError("per_sample=True takes scalar rtol and atol")
    rk = stepper(entry.name, int(y0[0].numel()), dtype, device, "dense")
    ctrl = make_controller(entry.order, options)
    tol = float(options.get("event_tol", 0.0))

    def guards(tt: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        values, owner = [], []
        for i, e in enumerate(events):
            g = e.fn(tt, y.view(shape))
            if not torch.is_tensor(g) or g.ndim == 0 or g.shape[0] != B:
                got = f"shape {tuple(g.shape)}" if torch.is_tensor(g) else type(g).__name__
                raise ValueError(
                    f"with per_sample=True, `events[{i}].fn` must return one row per sample, a tensor of shape "
                    f"({B},) or ({B}, k); got {got}"
                )
            g = g.reshape(B, -1)
            values.append(g)
            owner += [i] * g.shape[1]
        return torch.cat(values, 1), owner

    stats = SolveStats()
    outputs: list[list] = [[y0[b]] for b in range(B)]
    ev_times: list[list] = [[] for _ in range(B)]
    ev_index: list[list] = [[] for _ in range(B)]
    ev_states: list[list] = [[] for _ in range(B)]
    k = [1] * B
    done = [m <= 1] * B
    crossed: list[int | None] = [None] * B
    close_run = [0] * B
    t_c = t[0].expand(B)
    y_c = y0
    while True:
        tc = t_c.detach().double().tolist()
        for b in range(B):
            while not done[b] and k[b] < m and times[k[b]] == tc[b]:  # (an output at an event: after the reset)
                outputs[b].append(y_c[b])
                k[b] += 1
            done[b] = done[b] or k[b] >= m
        if all(done):
            break
        live = torch.tensor([not d for d in done], device=device)
        # a finished sample takes a negligible step (func sees the whole batch); its values are dropped
        tiny = [direction * torch.finfo(t.dtype).eps ** 0.5 * max(1.0, abs(s)) for s in tc]
        ends = [s + d if fin else t_end for s, d, fin in zip(tc, tiny, done)]
        t64 = torch.tensor(tc, dtype=torch.float64, device=device)
        y_det = y_c.detach()
        with torch.no_grad():
            g_c, owner = guards(t64.to(dtype), y_det)
            signs = torch.sign(g_c)
            near = g_c.abs() <= 1e-12 * g_c.abs().amax(1, keepdim=True).clamp(min=1.0)
            for b, c in enumerate(crossed):
                if c is not None:
                    near[b, c] = True
            if bool(near.any()):
                h = torch.tensor([direction * 1e-7 * max(1.0, abs(t_end - s)) for s in tc], dtype=dtype, device=device)
                f = func(t64.to(dtype), y_det).reshape(B, -1)
                ahead, _ = guards((t64 + h.double()).to(dtype), y_det.reshape(B, -1) + h[:, None] * f)
                signs = torch.where(near, torch.sign(ahead - g_c), signs)
            signs = torch.where(signs == 0, torch.ones_like(signs), signs)

            def seg_fn(tq: torch.Tensor, y: torch.Tensor, signs=signs, start=t64) -> torch.Tensor:
                g = signs * guards(tq, y)[0]
                return torch.where((tq.double() == start)[:, None], torch.ones_like(g), g)

            finder = PerSampleEvents(seg_fn, shape, t64, y_det.reshape(B, -1), tol=tol)
            res, sample_stats = integrate_per_sample(
                func,
                y_det,
                [[s, e] for s, e in zip(tc, ends)],
                rk,
                ctrl,
                rtol=probe.rtol,
                atol=probe.atol,
                first_step=options.get("first_step"),
                max_num_steps=int(options.get("max_num_steps", 100_000)),
                events=finder,
            )
        stats.nfe += sample_stats["calls"]
        if res.status != Status.SUCCESS:
            raise exception_for(res.status, "while looking for events: " + res.message, res.t_fail)
        hit = finder.found & live
        t_ev = torch.where(hit, finder.t_event, torch.tensor(ends, dtype=torch.float64, device=device)).tolist()
        inside = [
            [] if done[b] else [j for j in range(k[b], m) if direction * (times[j] - t_ev[b]) < 0] for b in range(B)
        ]
        width = max(len(x) for x in inside) + 2
        rows, where = [], []
        for b in range(B):
            # the sample's start (differentiable), its outputs (differentiable) and its end: the event time (its
            # gradient comes below) or the last output time; then filler times, whose values are dropped, spread
            # over the row's widest gap
            end_is_output = not done[b] and not bool(hit[b])
            row = [t_c[b]] + [t[j] for j in inside[b]]
            row.append(t[m - 1] if end_is_output else torch.tensor(t_ev[b], dtype=t.dtype))
            at = [float(x.detach()) for x in row]
            fill = width - len(row)
            g = max(range(len(at) - 1), key=lambda i: abs(at[i + 1] - at[i]))
            extra = [
                torch.tensor(at[g] + (at[g + 1] - at[g]) * (i + 1) / (fill + 1), dtype=t.dtype) for i in range(fill)
            ]
            row = row[: g + 1] + extra + row[g + 1 :]
            where.append([1 + i + (fill if i >= g else 0) for i in range(len(inside[b]))])
            row_t = torch.stack([x.to(device=t.device, dtype=t.dtype).reshape(()) for x in row])
            if not bool((direction * row_t.diff() > 0).all()):
                raise SolverError(
                    f"events of sample {b} come too close together near t={tc[b]:.10g} to be told apart in "
                    f"{t.dtype} (accumulating events?); stop the solve before that time or change the reset",
                    tc[b],
                )
            rows.append(row_t)
        sol = solve(func, y_c, torch.stack(rows), per_sample=True, **kw)
        _add(stats, sol.stats)
        ys = sol.ys
        for b in range(B):
            if done[b]:
                continue
            outputs[b] += [ys[r, b] for r in where[b]]
            k[b] += len(inside[b])
            if not bool(hit[b]):  # reached the end without an event
                outputs[b].append(ys[-1, b])
                k[b], done[b] = m, True
        y_minus = ys[-1]
        if not bool(hit.any()):
            continue
        with torch.no_grad():
            t_ev64 = torch.tensor(t_ev, dtype=torch.float64, device=device)
            g_ev = signs * guards(t_ev64.to(dtype), y_minus.detach())[0]
            comp = g_ev.argmin(1)
        comps = comp.tolist()
        counts = [bool(hit[b]) and events[owner[comps[b]]].direction in (0, -int(signs[b, comps[b]])) for b in range(B)]
        for b in range(B):
            if bool(hit[b]):
                crossed[b] = comps[b]
        t_plain = torch.tensor(t_ev, dtype=t.dtype, device=t.device)
        mask = torch.tensor(counts, device=device)
        t_next = t_plain
        if any(counts):
            # the event times, differentiable in the states, starts and the event functions' tensors
            prob = prepare(
                func,
                y_minus,
                torch.stack([t_c.detach(), t_plain], 1),
                rtol,
                atol,
                entry.name,
                options,
                lambda tq, y, signs=signs: signs * guards(tq, y)[0],
                per_sample=True,
            )
            y_flat = y_minus.reshape(B, -1)
            guard = guard_value(
                lambda a, b_, s=signs, c=comp: (s * guards(a, b_.view(shape))[0]).gather(1, c[:, None])[:, 0],
                t_ev64.to(dtype),
                y_flat,
            )
            ones = torch.ones_like(signs)
            t_event, y_flat = per_sample_event_time(prob, ones, comp, t_plain, y_flat, guard, mask)
            y_minus = y_flat.view(shape)
            t_next = torch.where(mask.to(t.device), t_event, t_plain)
        y_next = y_minus
        for b in range(B):
            if not counts[b]:
                continue
            event = events[owner[comps[b]]]
            ev_times[b].append(t_next[b])
            ev_index[b].append(owner[comps[b]])
            ev_states[b].append(y_minus[b])
            close_run[b] = (
                close_run[b] + 1 if abs(t_ev[b] - tc[b]) <= _ZENO_ULPS * math.ulp(max(abs(t_ev[b]), 1.0)) else 0
            )
            if close_run[b] >= _ZENO_RUN:
                raise SolverError(
                    f"events accumulate for sample {b}: {len(ev_times[b])} events up to t={t_ev[b]:.10g}, the last "
                    f"ones {abs(t_ev[b] - tc[b]):.3g} apart (Zeno behaviour, e.g. a bouncing ball coming to rest). "
                    "Stop the solve before that time, make the event terminal, or change the reset so that the "
                    "events stop",
                    t_ev[b],
                )
            if len(ev_times[b]) > max_events:
                raise SolverError(
                    f"more than max_events={max_events} events for sample {b} by t={t_ev[b]:.10g}; pass a larger "
                    "max_events if they are expected, or check the events' functions and resets",
                    t_ev[b],
                )
            if event.terminal:  # (the sample keeps its state at the event for the remaining output times)
                outputs[b] += [y_minus[b]] * (m - k[b])
                k[b], done[b] = m, True
        for i, event in enumerate(events):
            fired = [counts[b] and owner[comps[b]] == i and not event.terminal for b in range(B)]
            if event.reset is not None and any(fired):
                which = torch.tensor(fired, device=device).view(B, *([1] * (len(shape) - 1)))
                y_next = torch.where(which, event.reset(t_next.to(dtype), y_minus), y_next)
        t_c, y_c = t_next, y_next
    ys = torch.stack([torch.stack([outputs[b][j] for b in range(B)]) for j in range(m)])
    sol = Solution(t, ys, stats, Status.SUCCESS, "", None, None, None)
    sol.event_times = [torch.stack(x) if x else t.new_zeros(0) for x in ev_times]
    sol.event_index = ev_index
    sol.event_states = ev_states
    return sol
