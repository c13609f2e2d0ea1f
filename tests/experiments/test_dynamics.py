"""Built-in systems against analytic or scipy solutions; hybrid models recover physical parameters."""

import math

import numpy as np
import pytest
import torch

from neuralode.data.systems import SYSTEMS, observe
from neuralode.experiments.dynamics import HybridField, _trajectory_mae, _windows, train

scipy_integrate = pytest.importorskip("scipy.integrate")


def scipy_reference(system, t):
    def rhs(tt, yy):
        return system.true_field(None, torch.tensor(yy)).numpy()

    sol = scipy_integrate.solve_ivp(
        rhs, (0, float(t[-1])), system.y0, t_eval=t.numpy(), method="DOP853", rtol=1e-12, atol=1e-12
    )
    return torch.tensor(sol.y.T)


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(SYSTEMS))
def test_each_system_matches_scipy(name):
    system = SYSTEMS[name]
    t, clean, _ = observe(system, n=50, dtype=torch.float64)
    assert torch.allclose(clean, scipy_reference(system, t), atol=1e-7)


def test_falling_object_matches_its_closed_form():
    system = SYSTEMS["falling"]
    t, clean, _ = observe(system, n=40, dtype=torch.float64)
    exact = system.analytic(t, system.y0, system.params)
    assert torch.allclose(clean, exact, atol=1e-8)
    # terminal velocity g m / γ
    assert abs(float(clean[-1, 1]) - 9.81 / 0.5) < 0.2


def test_pendulum_small_angles_follow_the_damped_oscillator():
    system = SYSTEMS["pendulum"]
    t, clean, _ = observe(system, n=30, y0=(1e-4, 0.0), dtype=torch.float64)
    mu, w0 = 0.3, math.sqrt(9.81)
    wd = math.sqrt(w0**2 - mu**2 / 4)
    exact = 1e-4 * torch.exp(-mu * t / 2) * (torch.cos(wd * t) + mu / (2 * wd) * torch.sin(wd * t))
    assert torch.allclose(clean[:, 0], exact, atol=1e-10)


def test_noise_and_irregular_times():
    t, clean, noisy = observe("lotka_volterra", n=100, noise=0.1, irregular=True, seed=3)
    assert t[0] == 0 and bool((t[1:] > t[:-1]).all()) and not torch.allclose(t[1:] - t[:-1], t[1] - t[0])
    assert 0.05 < float((noisy - clean).std()) < 0.15


def test_windows_gather_each_window_at_its_own_times():
    t = torch.tensor([[0.0, 0.3, 0.5, 1.2, 1.3, 2.0]])
    ys = torch.arange(6.0)[None, :, None]
    y0, union, idx, target = _windows(t, ys, batch_time=3, batch_size=8)
    for b in range(8):
        s = int(y0[b, 0])
        assert torch.allclose(union[idx[b]], t[0, s : s + 3] - t[0, s])
        assert torch.equal(target[b, :, 0], ys[0, s : s + 3, 0])


@pytest.mark.slow
def test_hybrid_model_recovers_a_known_parameter_on_clean_data(tmp_path):
    # the pendulum from half its true g/L and μ, clean observations, physics-only start (NN output zero)
    m = train(
        system="pendulum",
        hybrid=True,
        iters=150,
        data_size=100,
        noise=0.0,
        batch_time=30,
        eval_every=50,
        lr=0.05,
        rtol=1e-5,
        atol=1e-6,
        out_dir=str(tmp_path),
        show_progress=False,
    )
    assert m["physical_parameters"]["g_over_L"]["relative_error"] < 0.02, m["physical_parameters"]
    assert m["physical_parameters"]["mu"]["relative_error"] < 0.1, m["physical_parameters"]


@pytest.mark.slow
def test_final_mae_is_the_returned_models_error_and_the_average_is_named_as_one(tmp_path):
    # a short hybrid run whose error is still falling: the last evaluations' average lags the final model
    kw = dict(system="falling", hybrid=True, data_size=40, batch_time=10, rtol=1e-5, atol=1e-6)
    m, func = train(**kw, iters=40, eval_every=5, out_dir=str(tmp_path), show_progress=False, return_model=True)
    t, clean, _ = observe("falling", n=40)
    fresh = _trajectory_mae(func, t[None], clean[None], "dopri5", 1e-5, 1e-6)
    assert m["final_mae"] == fresh
    maes = [h["trajectory_mae"] for h in m["history"]]
    assert m["mae_mean_last_evals_count"] == len(maes) == 8
    assert m["mae_mean_last_evals"] == pytest.approx(sum(maes) / len(maes))
    assert m["final_mae"] < m["mae_mean_last_evals"], maes
    assert "seconds" not in m and m["train_seconds"] > 0 and m["eval_seconds"] > 0


def test_hybrid_field_equals_the_true_field_at_the_true_parameters():
    system = SYSTEMS["pendulum"]
    f = HybridField(system, init=system.params)
    y = torch.randn(5, 2)
    assert torch.allclose(f(0, y), system.true_field(0, y), atol=1e-6)
    _ = np
