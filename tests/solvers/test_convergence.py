"""Observed order of every fixed-step method and of the dense output, on problems with exact solutions."""

import math

import numpy as np
import pytest
import torch

import neuralode as nd


def f_nonlinear(t, y):  # y' = -2 t y², y(0) = 1  ->  y = 1 / (1 + t²): nonlinear and time-dependent
    return -2 * t * y * y


def exact_nonlinear(t):
    return 1.0 / (1.0 + t * t)


def observed_order(method, options_for, T=1.0, ns=(16, 32, 64, 128)):
    """Slope of log(max error over 9 grid times) against log(h)."""
    y0 = torch.tensor([1.0], dtype=torch.float64)
    t = torch.linspace(0, T, 9, dtype=torch.float64)  # on the grid for every n (multiples of 8)
    errs = []
    for n in ns:
        ys = nd.odeint(f_nonlinear, y0, t, method=method, options=options_for(T / n))
        errs.append(float((ys[:, 0] - exact_nonlinear(t)).abs().max()))
    hs = [T / n for n in ns]
    slope = np.polyfit(np.log(hs), np.log(errs), 1)[0]
    return slope, errs


THEORY = {
    "euler": 1,
    "midpoint": 2,
    "heun2": 2,
    "heun3": 3,
    "rk4": 4,
    "explicit_adams": 4,
    "implicit_adams": 4,
    "fixed_adams": 4,
}


@pytest.mark.parametrize("method", sorted(THEORY))
def test_fixed_step_methods_converge_at_their_theoretical_order(method):
    # (the Adams methods at order 4: implicit_adams otherwise rises to its default max_order of 12)
    extra = {"max_order": 4} if "adams" in method else {}
    slope, errs = observed_order(method, lambda h: {"step_size": h, **extra})
    assert abs(slope - THEORY[method]) <= 0.3, (method, slope, errs)


@pytest.mark.parametrize("max_order", [1, 2, 3])
@pytest.mark.parametrize("method", ["explicit_adams", "implicit_adams"])
def test_adams_max_order_sets_the_order(method, max_order):
    slope, errs = observed_order(method, lambda h: {"step_size": h, "max_order": max_order}, ns=(32, 64, 128, 256))
    assert abs(slope - max_order) <= 0.3, (slope, errs)


def test_adams_weights_are_exact_on_an_irregular_grid():
    # a grid with irregular spacing: variable-step Adams keeps its order where fixed coefficients would not
    rng = np.random.default_rng(0)
    errs = []
    for n in (32, 64, 128):
        base = np.linspace(0, 2, n + 1)
        jitter = (rng.random(n + 1) - 0.5) * 0.3 * (2 / n)
        jitter[0] = jitter[-1] = 0
        grid = torch.tensor(np.sort(base + jitter))
        ys = nd.odeint(
            f_nonlinear,
            torch.tensor([1.0], dtype=torch.float64),
            torch.tensor([0.0, 2.0], dtype=torch.float64),
            method="explicit_adams",
            options={"grid_constructor": lambda f, y0, t, g=grid: g},
        )
        errs.append(abs(float(ys[-1, 0]) - exact_nonlinear(2.0)))
    slope = math.log(errs[0] / errs[-1]) / math.log(4)
    assert slope > 3.6, errs


@pytest.mark.parametrize("method,order", [("dopri5", 4), ("tsit5", 4), ("bosh3", 3)])
def test_dense_output_has_its_order_between_steps(method, order):
    # y' = cos(t) y, y = exp(sin t): compare the interpolant inside one step of size h
    errs = []
    for h in (0.2, 0.1, 0.05):
        sol = nd.solve(
            lambda t, y: torch.cos(t) * y,
            torch.tensor([1.0], dtype=torch.float64),
            torch.tensor([0.0, h], dtype=torch.float64),
            method=method,
            options={"first_step": h},
            rtol=1.0,
            atol=1.0,
        )
        assert sol.stats.n_steps == 1
        tq = torch.linspace(0.1 * h, 0.9 * h, 9, dtype=torch.float64)
        err = (sol.interpolate(tq)[:, 0] - torch.exp(torch.sin(tq))).abs().max()
        errs.append(float(err))
    slopes = [math.log(errs[i] / errs[i + 1], 2) for i in range(2)]
    assert min(slopes) > order + 1 - 0.3, (errs, slopes)  # local interpolation error O(h^{order+1})


def test_cubic_interp_is_fourth_order_between_grid_points():
    # interp="cubic" on a fixed grid is fourth-order accurate between grid points
    errs = []
    for h in (0.1, 0.05, 0.025):
        t = torch.tensor([0.0, 0.37, 1.13, 2.0], dtype=torch.float64)
        ys = nd.odeint(
            f_nonlinear,
            torch.tensor([1.0], dtype=torch.float64),
            t,
            method="rk4",
            options={"step_size": h, "interp": "cubic"},
        )
        errs.append(float((ys[1:3, 0] - exact_nonlinear(t[1:3])).abs().max()))
    slope = math.log(errs[0] / errs[-1]) / math.log(4)
    assert slope > 3.6, errs
    lin = nd.odeint(
        f_nonlinear,
        torch.tensor([1.0], dtype=torch.float64),
        t,
        method="rk4",
        options={"step_size": 0.025, "interp": "linear"},
    )
    assert float((lin[1:3, 0] - exact_nonlinear(t[1:3])).abs().max()) > 10 * errs[-1]
