"""Per-sample events: every sample of a batch stops at its own first event."""

import math

import pytest
import torch

import neuralode as node

D = torch.float64
G = 9.81


class Fall(torch.nn.Module):
    """Balls falling under a learnable gravity: y = (height, velocity) per sample."""

    def __init__(self) -> None:
        super().__init__()
        self.g = torch.nn.Parameter(torch.tensor(G, dtype=D))

    def forward(self, t, y):
        return torch.stack([y[:, 1], -self.g.expand_as(y[:, 1])], 1)


@pytest.mark.parametrize("gradient", ["backprop", "adjoint"])
@pytest.mark.parametrize("method", ["dopri5", "bosh3"])
def test_each_ball_lands_at_its_own_time_with_the_formulas_gradients(gradient, method):
    """t*ᵦ = sqrt(2hᵦ/g): the times, dt*/dhᵦ = 1/sqrt(2ghᵦ), dΣt*/dg, and the landing speed's dependence on hᵦ."""
    f = Fall()
    h = torch.tensor([10.0, 5.0, 1.0, 20.0], dtype=D, requires_grad=True)
    y0 = torch.stack([h, torch.zeros(4, dtype=D)], 1)
    tol = 1e-10 if method == "dopri5" else 1e-8
    sol = node.solve(
        f,
        y0,
        torch.tensor([0.0, 1.0], dtype=D),
        method=method,
        per_sample=True,
        event_fn=lambda t, y: y[:, 0],
        rtol=tol,
        atol=tol,
        gradient=gradient,
    )
    hd = h.detach()
    assert sol.event_t.shape == (4,) and sol.ys.shape == (2, 4, 2)
    torch.testing.assert_close(sol.event_t.detach(), torch.sqrt(2 * hd / G), rtol=1e-8, atol=1e-9)
    assert float(sol.ys[-1, :, 0].detach().abs().max()) < 1e-7  # on the ground
    dh, dg = torch.autograd.grad(sol.event_t.sum(), (h, f.g), retain_graph=True)
    torch.testing.assert_close(dh, 1 / torch.sqrt(2 * G * hd), rtol=1e-6, atol=1e-9)
    assert abs(float(dg) - float((-0.5 * torch.sqrt(2 * hd) * G**-1.5).sum())) < 1e-6
    (dv,) = torch.autograd.grad(sol.ys[-1, :, 1].sum(), h)  # v* = -sqrt(2 g h)
    torch.testing.assert_close(dv, -math.sqrt(2 * G) * 0.5 / torch.sqrt(hd), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("method", ["dopri5", "adaptive_heun"])
def test_per_sample_events_match_the_joint_solver_on_each_sample(method):
    """Van der Pol oscillators of different stiffness, each until its first x = 0 crossing: event time and
    state equal those of the joint solver's odeint_event on that sample alone (the same steps and the same
    continuous extension, at a loose tolerance where the extension matters: a non-FSAL method's reads f at
    the step's end)."""
    mus = torch.tensor([0.5, 1.5, 4.0], dtype=D)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [1.5, -1.0]], dtype=D)

    def vdp(m):
        return lambda t, y: torch.stack([y[:, 1], m * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    with torch.no_grad():
        sol = node.solve(
            vdp(mus),
            y0,
            torch.tensor([0.0, 1.0], dtype=D),
            per_sample=True,
            event_fn=lambda t, y: y[:, 0],
            rtol=1e-5,
            atol=1e-7,
            method=method,
        )
        for b in range(3):
            t_ev, ys = node.odeint_event(
                vdp(mus[b : b + 1]),
                y0[b : b + 1],
                torch.tensor(0.0, dtype=D),
                event_fn=lambda t, y: y[0, 0],
                rtol=1e-5,
                atol=1e-7,
                method=method,
            )
            assert abs(float(sol.event_t[b]) - float(t_ev)) < 1e-11
            torch.testing.assert_close(sol.ys[-1, b], ys[-1, 0], rtol=0, atol=1e-10)
    assert len(set(sol.event_t.tolist())) == 3


def test_per_sample_events_several_functions_backwards_and_own_start_times():
    """(batch, k) event functions (the first to reach zero wins), each sample its own start time, integrating
    backwards: y' = -1 from y(sᵦ) = 0 reaches -0.3 or -0.7 first, whichever is nearer."""
    starts = torch.tensor([0.0, 2.0, -1.0], dtype=D)
    t = torch.stack([starts, starts - 1.0], 1)  # (batch, 2): each sample's start, then the direction
    y0 = torch.zeros(3, 1, dtype=D)
    sol = node.solve(
        lambda t, y: torch.ones_like(y),
        y0,
        t,
        per_sample=True,
        event_fn=lambda t, y: torch.cat([y + 0.7, y + 0.3], 1),
    )
    torch.testing.assert_close(sol.event_t, starts - 0.3, rtol=0, atol=1e-9)
    torch.testing.assert_close(sol.ys[-1, :, 0], torch.full((3,), -0.3, dtype=D), rtol=0, atol=1e-9)


def test_per_sample_event_bad_input_is_a_clear_error():
    f = lambda t, y: torch.ones_like(y)  # noqa: E731
    y0 = torch.zeros(2, 1, dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match=r"one row per sample, shape \(2,\)"):
        node.solve(f, y0, t, per_sample=True, event_fn=lambda t, y: y.sum())
    with pytest.raises(ValueError, match="exactly zero at the initial time t0=0.0 for sample 1"):
        node.solve(f, torch.tensor([[1.0], [0.0]], dtype=D), t, per_sample=True, event_fn=lambda t, y: y[:, 0])
    with pytest.raises(node.MaxStepsError, match="event of sample 1"):
        node.solve(
            f,
            y0,
            t,
            per_sample=True,
            event_fn=lambda t, y: torch.stack([y[0, 0] - 0.5, -1 - y[1, 0]]),
            options={"max_num_steps": 30},
        )
