"""Per-sample adaptive stepping: each sample takes exactly the steps it would take alone."""

import pytest
import torch

import neuralode as node


def _vdp(mus):
    def f(t, y):
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    return f


def test_each_sample_takes_the_steps_it_would_take_alone():
    mus = torch.tensor([0.5, 1.0, 2.0, 5.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.5], [0.1, 0.0], [2.0, -1.0]], dtype=torch.float64)
    t = torch.linspace(0, 7, 40, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, method="dopri5", rtol=1e-6, atol=1e-8, per_sample=True)
        for b in range(4):
            alone = node.solve(_vdp(mus[b : b + 1]), y0[b : b + 1], t, rtol=1e-6, atol=1e-8)
            assert int(ps.sample_stats["n_steps"][b]) == alone.stats.n_steps
            assert int(ps.sample_stats["n_rejected"][b]) == alone.stats.n_rejected
            torch.testing.assert_close(ps.ys[:, b], alone.ys[:, 0], rtol=0, atol=1e-10)
    assert ps.ys.shape == (40, 4, 2)


@pytest.mark.parametrize("method", ["tsit5", "bosh3"])
def test_per_sample_solutions_match_scipy(method):
    scipy_integrate = pytest.importorskip("scipy.integrate")
    mus = torch.tensor([0.5, 3.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    t = torch.linspace(0, 5, 11, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, method=method, rtol=1e-8, atol=1e-10, per_sample=True)
    for b, mu in enumerate(mus.tolist()):
        ref = scipy_integrate.solve_ivp(
            lambda _, y, mu=mu: [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]],
            (0, 5),
            [2.0, 0.0],
            rtol=1e-12,
            atol=1e-12,
            t_eval=t.numpy(),
            method="DOP853",
        )
        assert float((ps.ys[:, b] - torch.from_numpy(ref.y.T)).abs().max()) < 1e-5


def test_per_sample_stepping_saves_evaluations_when_samples_differ():
    mus = torch.linspace(0.5, 5.0, 16, dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0]], dtype=torch.float64).repeat(16, 1)
    t = torch.linspace(0, 7, 20, dtype=torch.float64)
    with torch.no_grad():
        joint = node.solve(_vdp(mus), y0, t, rtol=1e-6, atol=1e-8)
        ps = node.solve(_vdp(mus), y0, t, rtol=1e-6, atol=1e-8, per_sample=True)
    assert int(ps.sample_stats["nfe"].sum()) < 0.85 * joint.stats.nfe * 16
    torch.testing.assert_close(ps.ys, joint.ys, rtol=0, atol=1e-4)  # both within tolerance of the truth


def test_gradients_through_per_sample_stepping():
    mus = torch.tensor([0.5, 2.0], dtype=torch.float64, requires_grad=True)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    t = torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64)
    ps = node.solve(_vdp(mus), y0, t, rtol=1e-8, atol=1e-10, per_sample=True)
    ps.ys[-1].sum().backward()
    for b in range(2):
        mu = mus.detach()[b : b + 1].clone().requires_grad_(True)
        alone = node.solve(_vdp(mu), y0[b : b + 1], t, rtol=1e-8, atol=1e-10)
        alone.ys[-1].sum().backward()
        torch.testing.assert_close(mus.grad[b : b + 1], mu.grad, rtol=1e-8, atol=1e-10)


def test_per_sample_bad_input_is_a_clear_error():
    y0 = torch.tensor([1.0, 2.0])
    t = torch.tensor([0.0, 1.0])
    with pytest.raises(ValueError, match=r"shape \(batch, ...\)"):
        node.solve(lambda t, y: -y, y0, t, per_sample=True)
    with pytest.raises(ValueError, match="adaptive"):
        node.solve(lambda t, y: -y, y0[None], t, method="rk4", options={"step_size": 0.1}, per_sample=True)
    with pytest.raises(ValueError, match="backprop"):
        node.solve(lambda t, y: -y, y0[None], t, gradient="adjoint", per_sample=True)


def test_per_sample_backwards_in_time_matches_the_joint_solve_of_each_sample():
    mus = torch.tensor([0.5, 3.0], dtype=torch.float64)
    y0 = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    t = torch.linspace(3, 0, 13, dtype=torch.float64)
    with torch.no_grad():
        ps = node.solve(_vdp(mus), y0, t, rtol=1e-7, atol=1e-9, per_sample=True)
        for b in range(2):
            alone = node.solve(_vdp(mus[b : b + 1]), y0[b : b + 1], t, rtol=1e-7, atol=1e-9)
            assert int(ps.sample_stats["n_steps"][b]) == alone.stats.n_steps
            torch.testing.assert_close(ps.ys[:, b], alone.ys[:, 0], rtol=0, atol=1e-10)
