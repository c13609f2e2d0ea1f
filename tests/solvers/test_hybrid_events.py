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
    """Bounce times up to t, and the height at t, of the ball dropped from H0."""
    return analytic_from(t, e, g, H0)


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


# ---------------------------------------------------------------------------------------------------------------
# per_sample=True: every sample its own events


def ball_batch(es, g, h0s, t, events_extra=(), **kw):
    """Balls dropped from heights ``h0s`` with restitutions ``es`` (one per sample), state (batch, 2)."""

    def f(t, y):
        return torch.stack([y[:, 1], -g * torch.ones_like(y[:, 1])], 1)

    bounce = neuralode.Event(
        lambda t, y: y[:, 0], reset=lambda t, y: torch.stack([y[:, 0], -es * y[:, 1]], 1), direction=-1
    )
    y0 = torch.stack([torch.as_tensor(h0s, dtype=D), torch.zeros(len(h0s), dtype=D)], 1)
    return neuralode.solve(f, y0, t, events=[bounce, *events_extra], per_sample=True, rtol=1e-10, atol=1e-12, **kw)


def analytic_from(t: float, e: float, g: float, h0: float) -> tuple[list[float], float]:
    """Bounce times up to t and the height at t of a ball dropped from h0."""
    v = math.sqrt(2 * g * h0)
    times = [math.sqrt(2 * h0 / g)]
    if t < times[0]:
        return [], h0 - 0.5 * g * t * t
    while True:
        v_k = e ** len(times) * v
        nxt = times[-1] + 2 * v_k / g
        if nxt > t:
            s = t - times[-1]
            return times, v_k * s - 0.5 * g * s * s
        times.append(nxt)


ES, H0S = (0.8, 0.7, 0.9), (1.0, 1.0, 0.5)


def test_per_sample_events_match_the_analytic_balls():
    t = torch.linspace(0, 2.0, 9, dtype=D)
    sol = ball_batch(torch.tensor(ES, dtype=D), G0, H0S, t)
    assert sol.ys.shape == (9, 3, 2)
    for b, (e, h0) in enumerate(zip(ES, H0S)):
        times, h = analytic_from(2.0, e, G0, h0)
        assert sol.event_times[b].tolist() == pytest.approx(times, abs=1e-9)  # each sample its own bounces
        assert sol.event_index[b] == [0] * len(times)
        assert float(sol.ys[-1, b, 0]) == pytest.approx(h, abs=1e-9)
        for j, tj in enumerate(t.tolist()[1:-1], start=1):
            assert float(sol.ys[j, b, 0]) == pytest.approx(analytic_from(tj, e, G0, h0)[1], abs=1e-9)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint", "checkpoint"])
def test_per_sample_event_gradients_match_central_differences(gradient):
    t = torch.linspace(0, 1.5, 4, dtype=D)
    es = torch.tensor(ES, dtype=D, requires_grad=True)
    g = torch.tensor(G0, dtype=D, requires_grad=True)
    sol = ball_batch(es, g, H0S, t, gradient=gradient, **({} if gradient == "backprop" else {"params": (g,)}))
    L = sol.ys[1:, :, 0].sum() + sum(x.sum() for x in sol.event_times)
    L.backward()

    def L_of(e_vals, g0):
        total = 0.0
        for e, h0 in zip(e_vals, H0S):
            for tj in t.tolist()[1:]:
                total += analytic_from(tj, e, g0, h0)[1]
            total += sum(analytic_from(1.5, e, g0, h0)[0])
        return total

    eps = 1e-6
    for b in range(3):
        up, down = list(ES), list(ES)
        up[b] += eps
        down[b] -= eps
        fd = (L_of(up, G0) - L_of(down, G0)) / (2 * eps)
        assert float(es.grad[b]) == pytest.approx(fd, rel=1e-5, abs=1e-7), (gradient, b)
    fd_g = (L_of(ES, G0 + eps) - L_of(ES, G0 - eps)) / (2 * eps)
    assert float(g.grad) == pytest.approx(fd_g, rel=1e-5, abs=1e-7)


def test_per_sample_events_equal_each_sample_solved_alone_and_event_parameters_get_gradients():
    # a floor per sample, a tensor the event function uses: its gradient comes through the event times only
    floors = torch.tensor([0.0, 0.2], dtype=D, requires_grad=True)
    t = torch.linspace(0, 1.2, 5, dtype=D)

    def f(t, y):
        return torch.stack([y[..., 1], -G0 * torch.ones_like(y[..., 1])], -1)

    def event(floor):
        return neuralode.Event(
            lambda t, y: y[..., 0] - floor,
            reset=lambda t, y: torch.stack([y[..., 0], -0.8 * y[..., 1]], -1),
            direction=-1,
        )

    y0 = torch.tensor([[1.0, 0.0], [1.5, 0.5]], dtype=D)
    sol = neuralode.solve(f, y0, t, events=[event(floors)], per_sample=True, rtol=1e-10, atol=1e-12)
    (dfloor,) = torch.autograd.grad(sum(x.sum() for x in sol.event_times), floors)
    for b in range(2):
        fl = floors[b].detach().clone().requires_grad_(True)
        alone = neuralode.solve(f, y0[b], t, events=[event(fl)], rtol=1e-10, atol=1e-12)
        assert torch.allclose(sol.ys[:, b], alone.ys, atol=1e-10)
        assert torch.allclose(sol.event_times[b], alone.event_times, atol=1e-10)
        (d_alone,) = torch.autograd.grad(alone.event_times.sum(), fl)
        assert float(dfloor[b]) == pytest.approx(float(d_alone), rel=1e-7)


def test_per_sample_terminal_event_freezes_that_sample_only():
    t = torch.linspace(0, 1.0, 5, dtype=D)
    # terminal when a ball falls below 0.3 (first crossing): the second ball, dropped from 0.5, reaches it
    # at t = sqrt(2 · 0.2 / g); the first, dropped from 0.2, is below from the start and bounces on
    low = neuralode.Event(lambda t, y: y[:, 0] - 0.3 * torch.tensor([0.0, 1.0], dtype=D), terminal=True, direction=-1)
    sol = ball_batch(torch.tensor([0.8, 0.8], dtype=D), G0, (0.2, 0.5), t, events_extra=(low,))
    t_stop = math.sqrt(2 * 0.2 / G0)
    assert sol.event_index[1] == [1] and sol.event_times[1].tolist() == pytest.approx([t_stop], abs=1e-9)
    later = t > t_stop
    assert torch.allclose(sol.ys[later, 1, 0], torch.full((int(later.sum()),), 0.3, dtype=D), atol=1e-9)
    times, h = analytic_from(1.0, 0.8, G0, 0.2)
    assert sol.event_times[0].tolist() == pytest.approx(times, abs=1e-9)


def test_per_sample_events_refuse_what_they_do_not_do():
    t = torch.linspace(0, 1.0, 3, dtype=D)
    with pytest.raises(ValueError, match="adaptive explicit method"):
        ball_batch(torch.tensor([0.8], dtype=D), G0, (1.0,), t, method="rodas4")
    bad = neuralode.Event(lambda t, y: y[0, 0])  # one value for the whole batch
    with pytest.raises(ValueError, match="one row per sample"):
        ball_batch(torch.tensor([0.8, 0.8], dtype=D), G0, (1.0, 1.0), t, events_extra=(bad,))


def test_per_sample_output_an_ulp_before_an_event():
    # one sample's output lies an ulp before its first bounce while the other sample has more outputs in that
    # round: the filler times of the shorter row must not collide
    t_bounce = math.sqrt(2 * 0.5 / G0)
    t = torch.tensor([0.0, 0.1, 0.2, 0.25, math.nextafter(t_bounce, 0.0), 0.6], dtype=D)
    sol = ball_batch(torch.tensor([0.8, 0.8], dtype=D), G0, (0.5, 3.0), t)
    for b, h0 in enumerate((0.5, 3.0)):
        for j, tj in enumerate(t.tolist()):
            assert float(sol.ys[j, b, 0]) == pytest.approx(analytic_from(tj, 0.8, G0, h0)[1], abs=1e-9)
