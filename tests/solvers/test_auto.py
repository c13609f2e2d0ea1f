"""``method="auto"``: stiffness detection and switching between tsit5 and rodas4.

References: the stability boundaries that DifferentialEquations.jl publishes for its explicit methods, the
dominant eigenvalue of a linear system, scipy's ``solve_ivp`` (Radau, tight tolerance), the time LSODA switches
back to its non-stiff method on van der Pol μ = 1000 (scipy's ``odeint`` reports it as ``tsw``), plain tsit5
(bitwise, where nothing is stiff), backprop of the same solve (checkpointed gradients) and central differences
in float64."""

from __future__ import annotations

import math

import pytest
import torch

import neuralode
from neuralode.solvers.auto import SwitchRule, explicit_stiffness, stability_boundary
from neuralode.solvers.runge_kutta import RungeKutta
from neuralode.solvers.tableaus import TABLEAUS

D = torch.float64


class VdP(torch.nn.Module):
    """Van der Pol, ``x'' = μ (1 − x²) x' − x``, for a state (..., 2); ``mu`` a parameter."""

    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=D))

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


@pytest.mark.parametrize(
    "name, published",
    # DifferentialEquations.jl's stability sizes (OrdinaryDiffEqCore, `alg_stability_size`); Euler's is 2 and
    # RK4's 2.785 (Hairer & Wanner II, §IV.2, Fig. 2.1)
    [("tsit5", 3.5068), ("dopri5", 3.3066), ("euler", 2.0), ("rk4", 2.7853)],
)
def test_stability_boundary_matches_published_values(name, published):
    assert stability_boundary(TABLEAUS[name]) == pytest.approx(published, abs=6e-5)


@pytest.mark.parametrize("method", ["tsit5", "dopri5"])
def test_explicit_estimate_finds_the_dominant_eigenvalue(method):
    # y' = J y with eigenvalues -800 and -3 (a rotation mixes the components): one step of size h, |h λ| = 2
    Q = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=D)
    J = Q @ torch.diag(torch.tensor([-800.0, -3.0], dtype=D)) @ Q.T
    rk = RungeKutta(TABLEAUS[method], 2, D, torch.device("cpu"))
    buf = rk.new_buffer()
    y = torch.tensor([1.0, 0.3], dtype=D)
    buf.set(0, J @ y)
    h = 2.5e-3
    rk.step(lambda t, v: J @ v, 0.0, h, y, buf)
    assert explicit_stiffness(TABLEAUS[method], buf.K, h) == pytest.approx(800.0, rel=0.02)


def test_switch_rule_hysteresis():
    rule = SwitchRule(boundary=1.0, tol=0.9, to_stiff=15, reset_after=6, to_explicit=4)
    # 14 stiff steps with a run of 5 calm ones inside (fewer than 6: the count carries on), then the 15th
    pattern = [2.0] * 7 + [0.1] * 5 + [2.0] * 7
    assert not any(rule(r, 1.0, False) for r in pattern)
    assert rule(2.0, 1.0, False)
    rule.reset()
    assert not any(rule(r, 1.0, False) for r in [2.0] * 10 + [0.1] * 6 + [2.0] * 14)  # 6 calm steps reset it
    assert rule(math.nan, 1.0, False)  # (a NaN estimate counts as stiff)
    rule.reset()
    assert [rule(0.1, 1.0, True) for _ in range(4)] == [False, False, False, True]


def test_nonstiff_problem_is_plain_tsit5():
    f = VdP(1.0)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=D)
    t = torch.linspace(0, 10, 21, dtype=D)
    auto = neuralode.solve(f, y0, t, method="auto", rtol=1e-7, atol=1e-9)
    plain = neuralode.solve(f, y0, t, method="tsit5", rtol=1e-7, atol=1e-9)
    assert torch.equal(auto.ys, plain.ys)
    assert auto.stats.nfe == plain.stats.nfe and auto.stats.n_steps == plain.stats.n_steps
    assert auto.stats.methods == [("tsit5", 0.0, 10.0)]
    assert plain.stats.methods == []


def test_van_der_pol_1000_switches_where_lsoda_does_and_matches_scipy():
    scipy_integrate = pytest.importorskip("scipy.integrate")
    mu, T = 1000.0, 1000.0
    f = VdP(mu)
    t = torch.linspace(0, T, 11, dtype=D)
    with torch.no_grad():
        sol = neuralode.solve(f, torch.tensor([2.0, 0.0], dtype=D), t, method="auto", rtol=1e-7, atol=1e-9)
    names = [m for m, _, _ in sol.stats.methods]
    assert names[:2] == ["tsit5", "rodas4"] and sol.stats.methods[0][2] < 0.1  # stiff from the start
    # back to the explicit method for the first relaxation jump, where x crosses 0 at t = 807.085 (LSODA, through
    # scipy's odeint at rtol 1e-6, also switches back there: 'tsw' = 807.07), and stiff again just after it
    jump = 807.0847
    explicit = [(a, b) for m, a, b in sol.stats.methods[1:] if m == "tsit5"]
    assert len(explicit) == 1 and 800.0 < explicit[0][0] < jump < explicit[0][1] < jump + 0.1
    assert names[-1] == "rodas4"
    ref = scipy_integrate.solve_ivp(
        lambda s, y: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
        (0, T),
        [2.0, 0.0],
        method="Radau",
        t_eval=t.numpy(),
        rtol=1e-11,
        atol=1e-12,
    )
    assert torch.allclose(sol.ys[:, 0], torch.as_tensor(ref.y[0]), rtol=0, atol=1e-4)
    # per method: the same solve with tsit5 alone takes an order of magnitude more evaluations
    assert sol.stats.nfe < 20_000


def _loss(gradient, f, y0, t, rtol=1e-8):
    y = y0.clone().requires_grad_(True)
    f.zero_grad()
    sol = neuralode.solve(f, y, t, method="auto", gradient=gradient, rtol=rtol, atol=rtol)
    (sol.ys**2).sum().backward()
    return torch.cat([f.mu.grad.reshape(1), y.grad.reshape(-1)]), sol


@pytest.mark.slow
def test_gradients_through_switches():
    f = VdP(30.0)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5]], dtype=D)
    t = torch.linspace(0, 40, 5, dtype=D)
    g_bp, sol = _loss("backprop", f, y0, t)
    assert [m for m, _, _ in sol.stats.methods][:3] == ["tsit5", "rodas4", "tsit5"]
    # checkpointed gradients replay every step with the method that took it: those of the same discrete solve
    for mode in ("checkpoint", neuralode.Checkpoint(checkpoints=6)):
        g_ck, _ = _loss(mode, f, y0, t)
        assert torch.allclose(g_ck, g_bp, rtol=1e-8, atol=0), mode
    # and the discrete solve's gradient is the true one to the tolerance: central differences of tight dopri8 solves

    def L(mu: float, y0_: torch.Tensor) -> float:
        with torch.no_grad():
            s = neuralode.solve(VdP(mu), y0_, t, method="dopri8", rtol=1e-12, atol=1e-12)
            return float((s.ys**2).sum())

    eps = 1e-5
    fd = [(L(30.0 + eps, y0) - L(30.0 - eps, y0)) / (2 * eps)]
    for i in (0, 3):  # (one position and one velocity, of different samples)
        dy = torch.zeros(4, dtype=D)
        dy[i] = eps
        fd.append((L(30.0, y0 + dy.view(2, 2)) - L(30.0, y0 - dy.view(2, 2))) / (2 * eps))
    assert torch.allclose(g_bp[[0, 1, 4]], torch.tensor(fd, dtype=D), rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_adjoint_through_switches():
    # the adjoint re-solves the state backwards from each output time: with outputs close together the
    # backward re-solve of this dissipative problem stays stable; its backward solve switches too
    f = VdP(30.0)
    y0 = torch.tensor([[2.0, 0.0]], dtype=D)
    t = torch.linspace(0, 40, 801, dtype=D)
    g_bp, _ = _loss("backprop", f, y0, t, rtol=1e-6)
    g_adj, sol = _loss("adjoint", f, y0, t, rtol=1e-6)
    assert len(sol.stats.methods) >= 3
    assert torch.allclose(g_adj, g_bp, rtol=1e-3, atol=1e-6)


@pytest.mark.slow
def test_events_and_dense_output_across_switches():
    f = VdP(30.0)
    y0 = torch.tensor([2.0, 0.0], dtype=D)
    with torch.no_grad():
        # x first crosses -1 after the slow phase and during the jump (stiff, then not): a terminal event
        t_ev, y_ev = neuralode.odeint_event(
            f, y0, torch.tensor(0.0, dtype=D), event_fn=lambda t, y: y[0] + 1.0, method="auto", rtol=1e-10, atol=1e-10
        )
        t_ref, _ = neuralode.odeint_event(
            f, y0, torch.tensor(0.0, dtype=D), event_fn=lambda t, y: y[0] + 1.0, method="rodas4", rtol=1e-10, atol=1e-10
        )
        assert float(t_ev) == pytest.approx(float(t_ref), rel=1e-7)
        assert float(y_ev[-1, 0]) == pytest.approx(-1.0, abs=1e-9)
        sol = neuralode.solve(f, y0, torch.tensor([0.0, 40.0], dtype=D), method="auto", rtol=1e-6, atol=1e-6)
        mid = torch.linspace(1.0, 39.0, 39, dtype=D)
        dense = sol.interpolate(mid)
        fine = neuralode.solve(
            f, y0, torch.cat([torch.zeros(1, dtype=D), mid]), method="rodas4", rtol=1e-10, atol=1e-10
        )
    assert len(sol.stats.methods) >= 3
    # (the stiff phases' Hermite interpolant is rodas4's own: as accurate as rodas4's dense output here, 2.6e-3)
    assert torch.allclose(dense, fine.ys[1:], atol=4e-3)


def test_auto_errors_name_the_fix():
    f = VdP(1.0)
    y0 = torch.tensor([[2.0, 0.0]], dtype=D)
    t = torch.linspace(0, 1, 3, dtype=D)
    with pytest.raises(ValueError, match="options\\['nonstiff'\\]"):
        neuralode.solve(f, y0, t, method="auto", options=dict(nonstiff="bosh3"))
    # dopri5 as the explicit method works (its last two nodes are 1 too)
    sol = neuralode.solve(f, y0, t, method="auto", options=dict(nonstiff="dopri5"))
    assert sol.stats.methods[0][0] == "dopri5"


class VdPBatch(torch.nn.Module):
    """A batch of van der Pol oscillators, one μ per sample (a parameter of shape (batch,))."""

    def __init__(self, mus) -> None:
        super().__init__()
        self.mu = torch.nn.Parameter(torch.as_tensor(mus, dtype=D).clone())

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


@pytest.mark.slow
def test_per_sample_switches_each_sample_as_if_alone():
    mus = [1.0, 30.0, 300.0, 1000.0]
    y0 = torch.tensor([[2.0, 0.0], [1.5, 0.1], [2.0, 0.0], [1.0, 0.0]], dtype=D)
    t = torch.linspace(0, 300, 16, dtype=D)
    with torch.no_grad():
        sol = neuralode.solve(VdPBatch(mus), y0, t, method="auto", per_sample=True, rtol=1e-6, atol=1e-6)
        phases = sol.sample_stats["methods"]
        assert [p[0][0] for p in phases] == ["tsit5"] * 4
        assert len(phases[0]) == 1 and len(phases[3]) >= 2  # only the stiff samples switch
        for b, mu in enumerate(mus):
            alone = neuralode.solve(VdPBatch([mu]), y0[b : b + 1], t, method="auto", rtol=1e-6, atol=1e-6)
            # the same phases and values as the joint solver on that sample alone (which evaluates f once more
            # at each switch)
            assert [p[0] for p in phases[b]] == [p[0] for p in alone.stats.methods]
            starts = [p[1] for p in phases[b]]
            assert starts == pytest.approx([p[1] for p in alone.stats.methods], rel=1e-6, abs=1e-12)
            assert torch.allclose(sol.ys[:, b], alone.ys[:, 0], rtol=1e-9, atol=1e-9)
            assert int(sol.sample_stats["n_steps"][b]) == alone.stats.n_steps
        # a batch that is nowhere stiff is per-sample tsit5, bit for bit
        easy = VdPBatch([1.0, 2.0])
        a = neuralode.solve(easy, y0[:2], t[:5], method="auto", per_sample=True, rtol=1e-7, atol=1e-7)
        b_ = neuralode.solve(easy, y0[:2], t[:5], method="tsit5", per_sample=True, rtol=1e-7, atol=1e-7)
        assert torch.equal(a.ys, b_.ys)


def test_per_sample_backprop_matches_each_sample_alone():
    mus = [1.0, 30.0, 300.0]
    y0 = torch.tensor([[2.0, 0.0], [1.5, 0.1], [2.0, 0.0]], dtype=D)
    t = torch.linspace(0, 40, 5, dtype=D)
    f = VdPBatch(mus)
    y = y0.clone().requires_grad_(True)
    sol = neuralode.solve(f, y, t, method="auto", per_sample=True, rtol=1e-7, atol=1e-7)
    (sol.ys**2).sum().backward()
    assert len(sol.sample_stats["methods"][1]) >= 3
    for b, mu in enumerate(mus):
        g = VdPBatch([mu])
        yb = y0[b : b + 1].clone().requires_grad_(True)
        alone = neuralode.solve(g, yb, t, method="auto", rtol=1e-7, atol=1e-7)
        (alone.ys**2).sum().backward()
        assert float(f.mu.grad[b]) == pytest.approx(float(g.mu.grad[0]), rel=1e-8)
        assert torch.allclose(y.grad[b], yb.grad[0], rtol=1e-8, atol=1e-12)


def _per_sample_grads(gradient, mus, y0, t):
    f = VdPBatch(mus)
    y = y0.clone().requires_grad_(True)
    sol = neuralode.solve(f, y, t, method="auto", per_sample=True, gradient=gradient, rtol=1e-7, atol=1e-7)
    (sol.ys**2).sum().backward()
    return torch.cat([f.mu.grad, y.grad.reshape(-1)]), sol


@pytest.mark.slow
def test_per_sample_checkpoint_replays_each_samples_method():
    mus = [1.0, 30.0, 300.0]
    y0 = torch.tensor([[2.0, 0.0], [1.5, 0.1], [2.0, 0.0]], dtype=D)
    t = torch.linspace(0, 40, 41, dtype=D)
    g_bp, sol = _per_sample_grads("backprop", mus, y0, t)
    phases = sol.sample_stats["methods"]
    assert len(phases[0]) == 1 and all(len(p) >= 2 for p in phases[1:])
    # every attempt replayed with the method each sample used, in any budget of states
    for mode in ("checkpoint", neuralode.Checkpoint(checkpoints=4)):
        g_ck, _ = _per_sample_grads(mode, mus, y0, t)
        assert torch.allclose(g_ck, g_bp, rtol=1e-9, atol=0), mode


def test_per_sample_adjoint():
    # its backward solve runs the explicit method per sample; outputs close together keep the backward
    # re-solve of the state stable
    mus = [1.0, 30.0]
    y0 = torch.tensor([[2.0, 0.0], [1.5, 0.1]], dtype=D)
    t = torch.linspace(0, 10, 101, dtype=D)
    g_bp, sol = _per_sample_grads("backprop", mus, y0, t)
    assert len(sol.sample_stats["methods"][1]) >= 2
    g_adj, _ = _per_sample_grads("adjoint", mus, y0, t)
    assert torch.allclose(g_adj, g_bp, rtol=1e-3, atol=1e-6)


def test_per_sample_auto_refuses_events():
    f = VdPBatch([1.0, 2.0])
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=D)
    t = torch.linspace(0, 1, 2, dtype=D)
    with pytest.raises(ValueError, match="per_sample=True with method='auto' does not locate events"):
        neuralode.solve(f, y0, t, method="auto", per_sample=True, event_fn=lambda t, y: y[:, 0])


def test_moderately_stiff_linear_problem_switches():
    # y' = -λ (y - sin t) + cos t, solution sin t + exp(-λ t): stiff once the transient is over. tsit5's
    # controller holds λh near 2.5-3 on such problems, under 0.9 of its stability boundary: detection must fire
    def f(t, y):
        return -200.0 * (y - torch.sin(t)) + torch.cos(t)

    t = torch.tensor([0.0, 10.0], dtype=D)
    y0 = torch.ones(1, dtype=D)
    auto = neuralode.solve(f, y0, t, method="auto", rtol=1e-6, atol=1e-6)
    rodas = neuralode.solve(f, y0, t, method="rodas4", rtol=1e-6, atol=1e-6)
    tsit = neuralode.solve(f, y0, t, method="tsit5", rtol=1e-6, atol=1e-6)
    assert [m for m, _, _ in auto.stats.methods] == ["tsit5", "rodas4"]
    assert auto.stats.nfe <= 1.2 * rodas.stats.nfe < tsit.stats.nfe
    assert float(auto.ys[-1, 0]) == pytest.approx(math.sin(10.0), abs=1e-4)


def test_max_num_steps_counts_every_phase():
    f = VdP(1000.0)
    y0 = torch.tensor([2.0, 0.0], dtype=D)
    t = torch.tensor([0.0, 1000.0], dtype=D)  # (about 300 attempts)
    with torch.no_grad():
        for budget in range(10, 60):  # (the first phase ends within these: every budget holds exactly)
            sol = neuralode.solve(
                f, y0, t, method="auto", rtol=1e-6, atol=1e-6, options=dict(max_num_steps=budget), on_failure="return"
            )
            assert sol.status == neuralode.Status.MAX_STEPS
            assert sol.stats.n_steps + sol.stats.n_rejected == budget, budget
            assert f"max_num_steps={budget} exceeded" in sol.message


def test_per_sample_auto_keeps_no_dense_output_and_says_so():
    f = VdPBatch([1.0, 2.0])
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=D)
    t = torch.linspace(0, 1, 3, dtype=D)
    with pytest.raises(ValueError, match="keeps no dense output"):
        neuralode.solve(f, y0, t, method="auto", per_sample=True, dense=True)
    sol = neuralode.solve(f, y0, t, method="auto", per_sample=True)
    with pytest.raises(RuntimeError, match="method='auto' keep no dense output"):
        sol.interpolate(torch.tensor([0.5], dtype=D))
