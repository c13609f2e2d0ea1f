"""The same calls through torchdiffeq and neuralode give the same answers (issue 9's promise: port code by
changing one import). Skipped when torchdiffeq (a test extra) is not installed."""

import math

import pytest
import torch

import neuralode as nd

tdq = pytest.importorskip("torchdiffeq")

D = torch.float64


class Field(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.l1 = torch.nn.Linear(2, 16).double()
        self.l2 = torch.nn.Linear(16, 2).double()

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.3 * torch.sin(t))


Y0 = torch.tensor([[0.5, -0.3], [1.0, 0.2]], dtype=D)
T = torch.tensor([0.0, 0.4, 1.1, 2.0], dtype=D)


@pytest.mark.parametrize("method", ["euler", "midpoint", "heun2", "heun3", "rk4"])
@pytest.mark.parametrize("interp", ["linear", "cubic"])
def test_fixed_grid_methods_agree_to_rounding(method, interp):
    f = Field()
    opts = {"step_size": 0.07, "interp": interp}
    if method == "heun2" and not hasattr(tdq._impl.fixed_grid, "Heun2"):
        pytest.skip("this torchdiffeq has no heun2")
    a = tdq.odeint(f, Y0, T, method=method, options=dict(opts))
    b = nd.odeint(f, Y0, T, method=method, options=dict(opts))
    assert torch.allclose(a, b, rtol=0, atol=1e-12), float((a - b).abs().max())


@pytest.mark.parametrize("method", ["dopri5", "bosh3", "fehlberg2", "adaptive_heun", "dopri8"])
def test_adaptive_methods_agree_to_tolerance(method):
    f = Field()
    tol = 1e-8 if method not in ("fehlberg2", "adaptive_heun") else 1e-6
    with torch.no_grad():
        a = tdq.odeint(f, Y0, T, method=method, rtol=tol, atol=tol)
        b = nd.odeint(f, Y0, T, method=method, rtol=tol, atol=tol)
        ref = nd.odeint(f, Y0, T, method="dopri8", rtol=1e-13, atol=1e-13)
    err_a, err_b = float((a - ref).abs().max()), float((b - ref).abs().max())
    assert err_b <= 3 * err_a + 10 * tol, (err_a, err_b)


@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_agree_to_their_accuracy(method):
    f = Field()
    a = tdq.odeint(f, Y0, T, method=method, options={"step_size": 0.01})
    b = nd.odeint(f, Y0, T, method=method, options={"step_size": 0.01})
    assert torch.allclose(a, b, atol=1e-6)


def test_tuple_states_and_backwards_time_agree():
    f = lambda t, s: (s[1], -torch.sin(s[0]))
    y0 = (torch.tensor([1.0], dtype=D), torch.tensor([0.0], dtype=D))
    t = torch.tensor([3.0, 1.5, 0.0], dtype=D)
    a = tdq.odeint(f, y0, t, rtol=1e-10, atol=1e-10)
    b = nd.odeint(f, y0, t, rtol=1e-10, atol=1e-10)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-8)


def test_adjoint_gradients_agree():
    grads = []
    for lib in (tdq, nd):
        f = Field()
        y0 = Y0.clone().requires_grad_(True)
        t = T.clone().requires_grad_(True)
        ys = lib.odeint_adjoint(f, y0, t, rtol=1e-9, atol=1e-10)
        (ys**2).sum().backward()
        grads.append([y0.grad, t.grad] + [p.grad for p in f.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), float((a - b).abs().max())


def test_adjoint_seminorm_option_is_accepted_by_both():
    for lib in (tdq, nd):
        f = Field()
        y0 = Y0.clone().requires_grad_(True)
        lib.odeint_adjoint(f, y0, T, adjoint_options=dict(norm="seminorm"))[-1].sum().backward()
        assert y0.grad is not None


def test_events_agree():
    f = lambda t, y: torch.stack([y[1], -9.81 * torch.ones_like(y[1])])
    y0 = torch.tensor([5.0, 1.0], dtype=D)
    ev = lambda t, y: y[0]
    ta, ya = tdq.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=ev, rtol=1e-10, atol=1e-10)
    tb, yb = nd.odeint_event(f, y0, torch.tensor(0.0, dtype=D), event_fn=ev, rtol=1e-10, atol=1e-10)
    exact = (1.0 + math.sqrt(1.0 + 2 * 9.81 * 5.0)) / 9.81
    assert abs(float(ta) - exact) < 1e-7 and abs(float(tb) - exact) < 1e-9
    assert ya.shape == yb.shape


def test_same_nfe_as_torchdiffeq_on_a_short_solve():
    # same controller, same initial-step heuristic: the same steps (neuralode clips the last step to t1
    # where torchdiffeq steps past it, so only solves that end on an accepted step compare exactly)
    counts = []
    for lib in (tdq, nd):
        n = [0]
        f = Field()

        def g(t, y, f=f, n=n):
            n[0] += 1
            return f(t, y)

        with torch.no_grad():
            lib.odeint(g, Y0, torch.tensor([0.0, 0.5], dtype=D), rtol=1e-6, atol=1e-6)
        counts.append(n[0])
    assert abs(counts[0] - counts[1]) <= 6, counts
