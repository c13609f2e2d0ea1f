"""Hybrid solves (``solve(..., events=[neuralode.Event(...)])``): event times and states against the analytic
bouncing ball, gradients through resets and event times against central differences in float64 (backprop,
adjoint, checkpoint), gradients to an event function's own parameters against the analytic derivative,
direction filtering, terminal events, tuple states, and a clear error for accumulating events."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode

D = torch.float64
G0, E0, H0 = 9.81, 0.8, 1.0


def ball(e, g, floor=0.0, **kw):
    """A ball dropped from H0 at rest, bouncing on a floor at ``floor`` with restitution ``e``."""

    def f(t, y):
        return torch.stack([y[1], -g * torch.ones_like(y[1])])

    bounce = neuralode.Event(lambda t, y: y[0] - floor, reset=lambda t, y: torch.stack([y[0], -e * y[1]]), direction=-1)
    t = torch.linspace(0, 2.0, 9, dtype=D)
    return neuralode.solve(f, torch.tensor([H0, 0.0], dtype=D), t, events=[bounce], rtol=1e-10, atol=1e-12, **kw)


def analytic(t: float, e=E0, g=G0) -> tuple[list[float], float]:
    """Bounce times up to t, and the height at t."""
    v = math.sqrt(2 * g * H0)
    times = [math.sqrt(2 * H0 / g)]
    while True:
        v_k = e ** len(times) * v
        nxt = times[-1] + 2 * v_k / g
        if nxt > t:
            s = t - times[-1]
            return times, v_k * s - 0.5 * g * s * s
        times.append(nxt)


def test_bounce_times_and_heights_equal_the_analytic_ones():
    sol = ball(E0, G0)
    times, _ = analytic(2.0)
    torch.testing.assert_close(sol.event_times, torch.tensor(times, dtype=D), rtol=0, atol=1e-9)
    assert sol.event_index == [0] * len(times) and len(times) >= 3
    for tk, yk in zip(sol.ts.tolist(), sol.ys[:, 0].tolist()):
        ref = H0 - 0.5 * G0 * tk * tk if tk < times[0] else analytic(tk)[1]
        assert abs(yk - ref) < 1e-8, (tk, yk, ref)
    for y_minus in sol.event_states:  # (the state just before each bounce: on the floor, falling)
        assert abs(float(y_minus[0])) < 1e-9 and float(y_minus[1]) < 0


@pytest.mark.parametrize("gradient", ["backprop", "adjoint", "checkpoint"])
def test_gradients_through_resets_and_event_times_equal_central_differences(gradient):
    def loss(e, g, **kw):
        sol = ball(e, g, **kw)
        return sol.ys[:, 0].square().sum() + sol.event_times.sum()

    e = torch.tensor(E0, dtype=D, requires_grad=True)
    g = torch.tensor(G0, dtype=D, requires_grad=True)
    kw = {} if gradient == "backprop" else dict(gradient=gradient, params=(e, g))
    got = torch.autograd.grad(loss(e, g, **kw), (e, g))
    h = 1e-6
    with torch.no_grad():
        fd_e = (loss(torch.tensor(E0 + h, dtype=D), g) - loss(torch.tensor(E0 - h, dtype=D), g)) / (2 * h)
        fd_g = (loss(e, torch.tensor(G0 + h, dtype=D)) - loss(e, torch.tensor(G0 - h, dtype=D))) / (2 * h)
    assert abs(float(got[0] - fd_e)) < 1e-6 * abs(float(fd_e)) + 1e-8
    assert abs(float(got[1] - fd_g)) < 1e-6 * abs(float(fd_g)) + 1e-8


def test_event_function_parameters_get_their_gradient():
    floor = torch.tensor(0.2, dtype=D, requires_grad=True)
    sol = ball(E0, G0, floor=floor)
    (got,) = torch.autograd.grad(sol.event_times[0], floor)
    # t1 = sqrt(2 (H0 - floor) / g): dt1/dfloor = -1 / (g t1)
    t1 = math.sqrt(2 * (H0 - 0.2) / G0)
    assert abs(float(got) + 1 / (G0 * t1)) < 1e-8


def test_direction_selects_crossings_and_events_without_reset_only_record():
    t = torch.linspace(0, 10.0, 5, dtype=D)

    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    y0 = torch.tensor([0.0, 1.0], dtype=D)  # x = sin t
    rising = neuralode.Event(lambda t, y: y[0] - 0.5, direction=1)
    falling = neuralode.Event(lambda t, y: y[0] + 0.5, direction=-1)
    sol = neuralode.solve(osc, y0, t, events=[rising, falling], rtol=1e-10, atol=1e-12)
    expected = sorted(
        [(math.pi / 6 + 2 * math.pi * k, 0) for k in range(2)]
        + [(7 * math.pi / 6 + 2 * math.pi * k, 1) for k in range(2)]
    )
    assert sol.event_index == [i for _, i in expected]
    torch.testing.assert_close(sol.event_times, torch.tensor([s for s, _ in expected], dtype=D), rtol=0, atol=1e-8)
    ref = neuralode.solve(osc, y0, t, rtol=1e-10, atol=1e-12).ys  # (recording events leave the solution as it is)
    torch.testing.assert_close(sol.ys, ref, rtol=0, atol=1e-8)


def test_a_terminal_event_stops_the_solve_and_tuple_states_work():
    def f(t, y):
        x, v = y
        return v, -G0 * torch.ones_like(v)

    hit = neuralode.Event(lambda t, y: y[0], terminal=True)
    t = torch.linspace(0, 2.0, 9, dtype=D)
    y0 = (torch.tensor([H0], dtype=D), torch.tensor([0.0], dtype=D))
    sol = neuralode.solve(f, y0, t, events=[hit], rtol=1e-10, atol=1e-12)
    t1 = math.sqrt(2 * H0 / G0)
    assert abs(float(sol.event_times[0]) - t1) < 1e-9 and len(sol.event_times) == 1
    assert sol.ys[0].shape[0] == sum(1 for s in t.tolist() if s < t1)  # (the outputs before the event)
    assert abs(float(sol.event_states[0][1]) + G0 * t1) < 1e-8


def test_accumulating_events_raise_instead_of_hanging():
    def f(t, y):
        return torch.stack([y[1], -G0 * torch.ones_like(y[1])])

    bounce = neuralode.Event(lambda t, y: y[0], reset=lambda t, y: torch.stack([y[0], -0.5 * y[1]]), direction=-1)
    t = torch.tensor([0.0, 5.0], dtype=D)  # (the ball comes to rest at 3 t1 = 1.35 s after infinitely many bounces)
    with pytest.raises(neuralode.SolverError, match="events accumulate"):
        neuralode.solve(f, torch.tensor([H0, 0.0], dtype=D), t, events=[bounce], max_events=200)


def test_bad_events_are_refused_by_name():
    f = lambda t, y: -y  # noqa: E731
    y0, t = torch.ones(2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(TypeError, match=r"events\[0\]"):
        neuralode.solve(f, y0, t, events=[lambda t, y: y[0]])
    with pytest.raises(ValueError, match="direction"):
        neuralode.Event(lambda t, y: y[0], direction=2)
    with pytest.raises(ValueError, match="event_fn"):
        neuralode.solve(f, y0, t, events=[neuralode.Event(lambda t, y: y[0])], event_fn=lambda t, y: y[0])
    with pytest.raises(ValueError, match="max_events"):
        neuralode.solve(f, y0, t, events=[neuralode.Event(lambda t, y: y[0] - 0.5)], max_events=0)


def test_gradients_with_several_guards_on_either_side_equal_central_differences():
    """Two guards that start on opposite sides and change sides from event to event (each event's gradient
    must use the sides its own segment started with)."""

    def loss(w, c):
        def osc(t, y):
            return torch.stack([y[1], -w * w * y[0]])

        up = neuralode.Event(lambda t, y: y[0] - c, reset=lambda t, y: torch.stack([y[0], 0.9 * y[1]]), direction=1)
        down = neuralode.Event(lambda t, y: y[0] + c, reset=lambda t, y: torch.stack([y[0], 0.8 * y[1]]), direction=-1)
        t = torch.linspace(0, 6.0, 7, dtype=D)
        sol = neuralode.solve(osc, torch.tensor([0.0, 1.0], dtype=D), t, events=[up, down], rtol=1e-10, atol=1e-12)
        assert len(sol.event_times) >= 3 and set(sol.event_index) == {0, 1}
        return sol.event_times.sum() + sol.ys[:, 0].sum()

    w = torch.tensor(1.3, dtype=D, requires_grad=True)
    c = torch.tensor(0.4, dtype=D, requires_grad=True)
    got = torch.autograd.grad(loss(w, c), (w, c))
    h = 1e-6
    with torch.no_grad():
        fd_w = (loss(w + h, c) - loss(w - h, c)) / (2 * h)
        fd_c = (loss(w, c + h) - loss(w, c - h)) / (2 * h)
    assert abs(float(got[0] - fd_w)) < 1e-6 * abs(float(fd_w)) + 1e-7
    assert abs(float(got[1] - fd_c)) < 1e-6 * abs(float(fd_c)) + 1e-7


def test_events_at_output_times_and_at_the_end_report_the_state_after_the_reset():
    def f(t, y):
        return torch.ones_like(y)  # y = y0 + t between resets

    halve = neuralode.Event(lambda t, y: t - 0.5, reset=lambda t, y: 0.5 * y)
    at_end = neuralode.Event(lambda t, y: t - 1.0, reset=lambda t, y: y - 10.0)
    t = torch.tensor([0.0, 0.5, 0.75, 1.0], dtype=D)
    sol = neuralode.solve(f, torch.tensor([1.0], dtype=D), t, events=[halve, at_end], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sol.event_times, torch.tensor([0.5, 1.0], dtype=D), rtol=0, atol=1e-12)
    # y(0.5) after halving 1.5 is 0.75; 0.75 + 0.25 = 1.0 at t = 0.75; at t = 1: 1.25 - 10 after the reset
    torch.testing.assert_close(sol.ys[:, 0], torch.tensor([1.0, 0.75, 1.0, -8.75], dtype=D), rtol=0, atol=1e-9)


def test_max_events_is_the_most_events_allowed():
    def osc(t, y):
        return torch.stack([y[1], -y[0]])

    cross = neuralode.Event(lambda t, y: y[0])  # (x = sin t crosses zero at π, 2π, 3π)
    y0, t = torch.tensor([0.0, 1.0], dtype=D), torch.tensor([0.0, 10.0], dtype=D)
    sol = neuralode.solve(osc, y0, t, events=[cross], max_events=3, rtol=1e-10, atol=1e-12)
    assert len(sol.event_times) == 3
    with pytest.raises(neuralode.SolverError, match="more than max_events=2"):
        neuralode.solve(osc, y0, t, events=[cross], max_events=2)
