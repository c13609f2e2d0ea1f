"""Adams–Bashforth and Adams–Bashforth–Moulton multistep methods on a (possibly irregular) grid.

Weights come from integrating the Lagrange interpolant of the past derivatives over the step, so they are
exact for any spacing (HNW I, §III.1 and §III.5); on a uniform grid they are the classical coefficients.

Start and order: the first ``min(max_order, 4) - 1`` steps are taken with RK4 (3/8 rule), so that the
multistep formulas start at order ``min(max_order, 4)`` rather than at a low order. From there each step
adds one past derivative and so raises the order by one, up to ``max_order`` (the predictor and the
corrector use ``k`` values and both have order ``k``). torchdiffeq's Adams methods ramp their order up the
same way (its start: two RK4 steps, then orders 3/4 upwards), and its default for ``max_order`` is 12;
``implicit_adams`` takes that default. ``explicit_adams`` defaults to 4: the stability region of
Adams–Bashforth shrinks quickly with the order (HNW I §III.3), and torchdiffeq's default (Adams–Bashforth
of order 11) diverges already on y'' = -y with a step of 0.1.

Kept different from torchdiffeq on purpose: ``max_order`` below 4 gives an Adams method of that order
(torchdiffeq then uses RK4 throughout); an explicit method with ``max_order = k`` has order ``k``
(torchdiffeq's: ``k - 1``); the corrector iterates until its change is small against the state's tolerance
``atol + rtol·|y|`` (torchdiffeq measures the change against the step's increment: more iterations for
about the same accuracy).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, Sequence

import numpy as np
import torch

from .integrate import (
    RHS,
    EventLocator,
    HermiteSegment,
    IntegrationResult,
    Outputs,
    _callbacks,
    _grid_direction,
    finite_rows_result,
)
from .runge_kutta import RungeKutta
from .tableaus import RK4

__all__ = ["integrate_adams", "adams_weights", "MAX_ORDER"]

#: the largest order offered (higher-order Adams methods have tiny stability regions)
MAX_ORDER = 12
#: ``max_order`` where the option is not given, by ``implicit`` (see the module docstring)
DEFAULT_MAX_ORDER = {True: 12, False: 4}
#: the order the multistep formulas start at once RK4 has supplied the past values
_START_ORDER = 4


def adams_weights(nodes: Sequence[float], t: float, h: float) -> np.ndarray:
    """Weights ``w`` with ``∫_t^{t+h} p(s) ds = h Σ_j w_j p(nodes_j)`` for every polynomial ``p`` of degree
    below ``len(nodes)``."""
    tau = np.array([(s - t) / h for s in nodes], dtype=np.float64)
    k = len(tau)
    V = np.vander(tau, k, increasing=True).T  # V[m, j] = tau_j ** m
    rhs = 1.0 / np.arange(1, k + 1)
    return np.linalg.solve(V, rhs)


def integrate_adams(
    rhs: RHS,
    y0: torch.Tensor,
    t_out: Sequence[float],
    grid: Sequence[float],
    *,
    implicit: bool,
    max_order: int | None = None,
    max_iters: int = 4,
    rtol: Any = 1e-7,
    atol: Any = 1e-9,
    interp: str = "linear",
    perturb: bool = False,
    callbacks: Any = None,
    keep_segments: bool = False,
    event: EventLocator | None = None,
) -> IntegrationResult:
    max_order = DEFAULT_MAX_ORDER[bool(implicit)] if max_order is None else int(max_order)
    if not 1 <= max_order <= MAX_ORDER:
        raise ValueError(f"option `max_order` must be between 1 and {MAX_ORDER}, got {max_order}")
    if max_iters < 1:
        raise ValueError(f"option `max_iters` must be at least 1, got {max_iters}")
    direction = float(getattr(grid, "direction", 0.0)) or _grid_direction(t_out)
    grid = iter(grid)
    t = float(next(grid))
    out = Outputs(t_out, direction, y0, keep_segments, event)
    (cb_step,) = _callbacks(callbacks, ("callback_step",))
    starter = RungeKutta(RK4, rhs.n, rhs.dtype, rhs.device)
    p = int(int(direction) if perturb else 0)
    hist_t: deque = deque(maxlen=max_order)
    hist_f: deque = deque(maxlen=max_order)
    y = y0
    f0 = rhs.at(t, y, perturb=p)
    hist_t.appendleft(t)
    hist_f.appendleft(f0)
    weights_cache: dict = {}
    start = min(max_order, _START_ORDER)
    n_steps = 0
    for t1 in grid:
        t1 = float(t1)
        h = t1 - t
        if cb_step is not None:
            cb_step(rhs.time(t), rhs.unflatten(y), rhs.time(h))
        k = len(hist_f)  # past derivatives held (at most max_order): the order of this step's formulas
        if k < start:
            buf = starter.new_buffer()
            buf.set(0, hist_f[0])
            y1, _ = starter.step(rhs, t, h, y, buf, perturb_last=perturb)
        else:
            y1 = y + h * _combine(hist_f, _weights(weights_cache, tuple(hist_t), t, h))
            if implicit:
                nodes = (t1,) + tuple(hist_t)[: k - 1]
                w = _weights(weights_cache, nodes, t, h)
                past = list(hist_f)[: k - 1]
                known = y + h * _combine(past, w[1:]) if past else y
                for _ in range(max_iters):
                    f1 = rhs.at(t1, y1, perturb=-p)
                    y_new = known + (h * w[0]) * f1
                    with torch.no_grad():
                        scale = torch.maximum(y1.abs(), y_new.abs()).mul_(rtol).add_(atol)
                        converged = float(torch.linalg.vector_norm((y_new - y1) / scale)) <= math.sqrt(y1.numel())
                    y1 = y_new
                    if converged:
                        break
        n_steps += 1
        f1 = rhs.at(t1, y1, perturb=p)  # start of the next step (and Hermite data); perturbed past a grid point
        f0 = hist_f[0]
        hist_t.appendleft(t1)
        hist_f.appendleft(f1)
        seg = HermiteSegment(t, t1, y, y1, f0, f1) if interp == "cubic" else HermiteSegment(t, t1, y, y1)
        if out.add(seg):
            break
        y, t = y1, t1
    res = finite_rows_result(out.result(), t_out, n_steps, out.segments)
    if event is not None:
        res.event_t, res.event_y = event.t_event, event.y_event
    return res


def _weights(cache: dict, nodes: tuple, t: float, h: float) -> list[float]:
    key = tuple(round((s - t) / h, 12) for s in nodes)
    w = cache.get(key)
    if w is None:
        w = adams_weights(nodes, t, h).tolist()
        cache[key] = w
    return w


def _combine(fs, ws) -> torch.Tensor:
    acc = fs[0] * ws[0]
    for f, w in zip(list(fs)[1:], ws[1:]):
        acc = acc.add(f, alpha=w)
    return acc
