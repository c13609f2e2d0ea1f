"""Complex states (as torchdiffeq accepts them): a Schrödinger equation against the matrix exponential,
gradients against central differences, and the rest of the interface with complex entries."""

import copy
import math

import pytest
import torch

import neuralode as nd

C = torch.complex128
D = torch.float64
MODES = ["backprop", "adjoint", "checkpoint"]


class Schroedinger(torch.nn.Module):
    """dψ/dt = -i H ψ with H = S + Sᵀ + i (K - Kᵀ) Hermitian, from real parameters S and K."""

    def __init__(self, n=4, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.S = torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=D) * 0.5)
        self.K = torch.nn.Parameter(torch.randn(n, n, generator=g, dtype=D) * 0.5)

    def H(self):
        return torch.complex(self.S + self.S.T, self.K - self.K.T)

    def forward(self, t, psi):
        return -1j * psi @ self.H().T


def exact(f, psi0, t):
    with torch.no_grad():
        return torch.stack([psi0 @ torch.linalg.matrix_exp(-1j * f.H() * ti).T for ti in t])


def psi0_of(batch=(3,), n=4, seed=1, dtype=C):
    g = torch.Generator().manual_seed(seed)
    return torch.complex(torch.randn(*batch, n, generator=g, dtype=D), torch.randn(*batch, n, generator=g, dtype=D)).to(
        dtype
    )


@pytest.mark.parametrize(
    "method, options, tol",
    [("dopri5", None, 1e-6), ("tsit5", None, 1e-6), ("dopri8", None, 1e-6), ("rk4", {"step_size": 0.01}, 1e-7)],
)
def test_schroedinger_matches_the_matrix_exponential(method, options, tol):
    f, psi0 = Schroedinger(), psi0_of()
    t = torch.tensor([0.0, 0.4, 1.1, 2.0], dtype=D)
    ys = nd.odeint(f, psi0, t, method=method, options=options, rtol=1e-9, atol=1e-10)
    assert ys.dtype == C and ys.shape == (4, 3, 4)
    ref = exact(f, psi0, t)
    assert (ys - ref).abs().max() < tol * ref.abs().max()
    # the norm is conserved by the exact flow; the solver keeps it to its accuracy
    torch.testing.assert_close(ys.abs().pow(2).sum(-1), psi0.abs().pow(2).sum(-1).expand(4, 3), rtol=tol, atol=0)


def test_complex64_and_interpolation_and_torchdiffeq():
    torchdiffeq = pytest.importorskip("torchdiffeq")
    f64, psi0 = Schroedinger(), psi0_of(dtype=torch.complex64)
    f = copy.deepcopy(f64).float()
    t = torch.linspace(0, 1.5, 4)
    sol = nd.solve(f, psi0, t, rtol=1e-5, atol=1e-6)
    assert sol.ys.dtype == torch.complex64
    ref = exact(f64, psi0.to(C), t.double())
    assert (sol.ys.to(C) - ref).abs().max() < 1e-4
    mid = sol.interpolate(torch.tensor([0.77]))[0]
    ref_mid = exact(f64, psi0.to(C), torch.tensor([0.77], dtype=D))[0]
    assert (mid.to(C) - ref_mid).abs().max() < 1e-4
    # torchdiffeq controls the modulus of each entry, we its real and imaginary parts: about the same cost
    theirs = torchdiffeq.odeint(f, psi0, t, rtol=1e-5, atol=1e-6)
    assert (theirs.to(C) - ref).abs().max() < 1e-4
    counted = []
    torchdiffeq.odeint(lambda tt, y: counted.append(1) or f(tt, y), psi0, t, rtol=1e-5, atol=1e-6)
    assert 0.6 * len(counted) <= sol.stats.nfe <= 1.6 * len(counted)


@pytest.mark.parametrize("mode", MODES)
def test_gradients_match_central_differences(mode):
    f, psi0 = Schroedinger(n=3), psi0_of(batch=(2,), n=3)
    t = torch.tensor([0.0, 0.5, 1.2], dtype=D)
    w = torch.randn(3, 2, 3, dtype=D, generator=torch.Generator().manual_seed(5))

    def loss(psi_init, **kw):  # a real loss of the complex solution: weighted probabilities and real parts
        ys = nd.solve(f, psi_init, t, rtol=1e-11, atol=1e-12, **kw).ys
        return (w * ys.abs().pow(2)).sum() + (w * ys.real).sum()

    x = psi0.clone().requires_grad_(True)
    grads = torch.autograd.grad(loss(x, gradient=mode), [x, f.S, f.K])
    eps = 1e-6
    with torch.no_grad():
        for _ in range(3):  # directional derivatives along random directions, each input in turn
            g = torch.Generator().manual_seed(_)
            v = torch.complex(torch.randn(2, 3, generator=g, dtype=D), torch.randn(2, 3, generator=g, dtype=D))
            fd = (loss(psi0 + eps * v) - loss(psi0 - eps * v)) / (2 * eps)
            # for a real loss of a complex input, autograd returns the conjugate Wirtinger form: dL = Re(<g, v>)
            torch.testing.assert_close((grads[0].conj() * v).real.sum(), fd, rtol=1e-6, atol=1e-8)
            for p, gp in zip((f.S, f.K), grads[1:]):
                dv = torch.randn(p.shape, generator=g, dtype=D)
                p.add_(eps * dv)
                hi = loss(psi0)
                p.sub_(2 * eps * dv)
                lo = loss(psi0)
                p.add_(eps * dv)
                torch.testing.assert_close((gp * dv).sum(), (hi - lo) / (2 * eps), rtol=1e-6, atol=1e-8)


def test_tuple_states_events_per_sample_and_tensor_tolerances():
    f = Schroedinger(n=2)

    class WithClock(torch.nn.Module):  # (ψ, s): a complex wavefunction and a real clock
        def __init__(self):
            super().__init__()
            self.f = f

        def forward(self, t, state):
            psi, s = state
            return f(t, psi), torch.ones_like(s)

    psi0 = psi0_of(batch=(), n=2)
    t = torch.tensor([0.0, 0.3, 0.9], dtype=D)
    psis, clocks = nd.odeint(WithClock(), (psi0, torch.zeros(1, dtype=D)), t, rtol=1e-9, atol=1e-10)
    assert psis.dtype == C and clocks.dtype == D
    torch.testing.assert_close(clocks[:, 0], t)
    assert (psis - exact(f, psi0, t)).abs().max() < 1e-7

    # an event on the complex state: the first time the real part of ψ₀ crosses zero
    t_event, ys = nd.odeint_event(f, psi0, torch.tensor(0.0, dtype=D), event_fn=lambda tt, y: y[0].real)
    assert abs(float(ys[-1][0].real.detach())) < 1e-7 and 0 < float(t_event.detach()) < 2 * math.pi / 0.5
    # per-sample stepping, each sample its own steps, equal to solving it alone
    batch = psi0_of(batch=(3,), n=2)
    sol = nd.solve(lambda tt, y: f(tt, y), batch, t, per_sample=True, rtol=1e-8, atol=1e-9)
    for b in range(3):
        alone = nd.odeint(f, batch[b : b + 1], t, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(sol.ys[:, b], alone[:, 0], rtol=1e-10, atol=1e-12)
    # per-component tolerances broadcast over the real and imaginary parts
    atol = torch.tensor([1e-12, 1e-3], dtype=D)
    ys = nd.odeint(f, batch, t, rtol=0.0, atol=atol)
    assert (ys - exact(f, batch, t)).abs()[..., 0].max() < 1e-8


def test_callbacks_see_complex_states_and_are_looked_up_at_each_solve():
    f = Schroedinger(n=2)
    psi0 = psi0_of(batch=(), n=2)
    t = torch.tensor([0.0, 1.0], dtype=D)
    nd.odeint(f, psi0, t)  # a first solve without callbacks: the wrapper kept on f must still see new ones
    seen = []
    f.callback_accept_step = lambda tt, y, dt: seen.append(y.dtype)
    nd.odeint(f, psi0, t)
    assert seen and set(seen) == {C}
