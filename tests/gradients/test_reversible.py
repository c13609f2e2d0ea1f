"""Reversible solvers and ``gradient="reversible"``.

The schemes: observed convergence order on a problem with a known solution. The gradient: equal to backprop
through the same method (the same discrete solve) in float64, and to central differences of that discrete
solve on a fixed grid; what it keeps does not grow with the steps beyond the grid; a reversal that loses
accuracy warns; combinations it does not support are refused by name.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import neuralode
from neuralode.experiments.classify import _cpu_peak

D = torch.float64


def _oscillator(t, y):
    return torch.stack([y[..., 1], -y[..., 0]], -1)


@pytest.mark.parametrize(
    "method, options, order",
    [
        ("reversible_heun", {}, 2),
        ("reversible_rk", {"base": "rk4"}, 4),
        ("reversible_rk", {"base": "midpoint"}, 2),
        ("reversible_rk", {"base": "rk4", "coupling": 1.0}, 4),
    ],
)
def test_observed_order(method, options, order):
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.tensor([0.0, 2.0], dtype=D)
    exact = torch.tensor([math.cos(2.0), -math.sin(2.0)], dtype=D)
    errs = []
    for h in (0.02, 0.01):
        ys = neuralode.odeint(_oscillator, y0, t, method=method, options={**options, "step_size": h})
        errs.append(float((ys[-1] - exact).abs().max()))
    observed = math.log2(errs[0] / errs[1])
    assert abs(observed - order) < 0.25, (errs, observed)


def test_adaptive_steps_meet_the_tolerance():
    y0 = torch.tensor([1.0, 0.0], dtype=D)
    t = torch.linspace(0, 3, 4, dtype=D)
    exact = torch.stack([torch.cos(t), -torch.sin(t)], -1)
    for method in ("reversible_heun", "reversible_rk"):
        for tol in (1e-4, 1e-7):
            sol = neuralode.solve(_oscillator, y0, t, method=method, rtol=tol, atol=tol)
            assert float((sol.ys - exact).abs().max()) < 30 * tol, (method, tol)
            assert sol.stats.n_steps >= 3


class _Field(torch.nn.Module):
    """A small MLP field, modest enough in contraction for a reversible scheme."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(2, 16).double()
        self.l2 = torch.nn.Linear(16, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(0.5 * torch.randn(p.shape, generator=g, dtype=D))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) + torch.stack([y[..., 1], -y[..., 0]], -1)


def _grads(method, options, mode, t, **kw):
    f = _Field()
    y0 = torch.randn(4, 2, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    tol = 1e-5 if method == "reversible_heun" else 1e-8  # (second order: tight tolerances take many steps)
    sol = neuralode.solve(f, y0, t, method=method, options=options, gradient=mode, rtol=tol, atol=tol, **kw)
    loss = (sol.ys**2).sum() + sol.ys[..., 0].sum()
    return torch.autograd.grad(loss, [y0, *f.parameters()]), sol


CASES = [
    ("reversible_heun", {"step_size": 0.01}),
    ("reversible_heun", None),
    ("reversible_rk", None),
    ("reversible_rk", {"base": "tsit5", "coupling": 0.99}),
    ("reversible_rk", {"base": "rk4", "step_size": 0.05}),
]


@pytest.mark.parametrize("method, options", CASES)
def test_gradient_equals_backprop_through_the_same_method(method, options):
    t = torch.tensor([0.0, 0.3, 1.1, 2.0], dtype=D)
    ref, sol_ref = _grads(method, options, "backprop", t)
    got, sol = _grads(method, options, "reversible", t)
    torch.testing.assert_close(sol.ys, sol_ref.ys, rtol=0, atol=0)
    assert sol.stats.n_steps == sol_ref.stats.n_steps > 3
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)


def test_gradient_equals_central_differences_of_the_discrete_solve():
    y0 = torch.tensor([0.7, -0.2], dtype=D)
    t = torch.tensor([0.0, 1.5], dtype=D)
    w = torch.tensor([0.3, -1.1], dtype=D)
    k = torch.tensor(0.8, dtype=D)

    def loss(y0_, k_, mode="backprop"):
        f = lambda t, y: torch.stack([y[..., 1], -k_ * y[..., 0] - 0.1 * y[..., 1] ** 3], -1)  # noqa: E731
        kw = dict(params=(k_,)) if mode == "reversible" else {}
        ys = neuralode.solve(
            f, y0_, t, method="reversible_rk", options=dict(base="rk4", step_size=0.1), gradient=mode, **kw
        ).ys
        return ys[-1] @ w

    y0g, kg = y0.clone().requires_grad_(True), k.clone().requires_grad_(True)
    g = torch.autograd.grad(loss(y0g, kg, "reversible"), [y0g, kg])
    h = 1e-6
    for i in range(2):
        e = torch.zeros(2, dtype=D)
        e[i] = h
        fd = (loss(y0 + e, k) - loss(y0 - e, k)) / (2 * h)
        assert abs(float(g[0][i] - fd)) < 1e-8
    fd = (loss(y0, k + h) - loss(y0, k - h)) / (2 * h)
    assert abs(float(g[1] - fd)) < 1e-8


@pytest.mark.parametrize("method, options", [CASES[1], CASES[2], CASES[4]])
def test_per_sample_each_sample_is_its_own_solve_and_gradients_equal_backprop(method, options):
    t = torch.tensor([[0.0, 0.4, 1.0], [0.1, 0.9, 1.7], [0.0, 0.2, 0.5], [-0.3, 0.5, 1.2]], dtype=D)  # (own times)
    ref, sol_ref = _grads(method, options, "backprop", t, per_sample=True)
    got, sol = _grads(method, options, "reversible", t, per_sample=True)
    torch.testing.assert_close(sol.ys, sol_ref.ys, rtol=0, atol=0)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-11)
    f = _Field()
    y0 = torch.randn(4, 2, dtype=D, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for i in range(4):
            tol = 1e-5 if method == "reversible_heun" else 1e-8
            alone = neuralode.solve(f, y0[i : i + 1], t[i], method=method, options=options, rtol=tol, atol=tol)
            torch.testing.assert_close(sol.ys[:, i : i + 1].detach(), alone.ys, rtol=0, atol=1e-10)
    steps = sol.sample_stats["n_steps"]
    assert steps.shape == (4,) and (steps > 0).all()
    if options is None:  # (adaptive: the samples take different numbers of steps)
        assert len(set(steps.tolist())) > 1


def test_time_gradients_equal_backprop():
    def run(mode):
        t = torch.tensor([0.0, 0.5, 1.2], dtype=D, requires_grad=True)
        y0 = torch.tensor([1.0, 0.5], dtype=D)
        kw = dict(params=()) if mode == "reversible" else {}
        ys = neuralode.solve(_oscillator, y0, t, method="reversible_heun", gradient=mode, rtol=1e-8, atol=1e-8, **kw).ys
        return torch.autograd.grad(ys.square().sum(), t)[0]

    torch.testing.assert_close(run("reversible"), run("backprop"), rtol=1e-10, atol=1e-12)


def test_what_is_kept_grows_only_by_the_grid():
    def kept(T):
        f = _Field()
        y0 = torch.randn(64, 2, dtype=D, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        sol = neuralode.solve(
            f,
            y0,
            torch.tensor([0.0, T], dtype=D),
            method="reversible_heun",
            gradient="reversible",
            options=dict(step_size=0.01),
        )
        sol.ys.sum().backward()
        return sol.stats.checkpoint_bytes, sol.stats.n_steps

    short, n_short = kept(0.5)
    long, n_long = kept(5.0)
    assert n_long == 10 * n_short
    assert (long - short) / (n_long - n_short) <= 32  # (a time, a step and two flags per step; a state is 1 KiB)


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_steps():
    N = 10_000

    def peak(T: float) -> tuple[float, int]:
        f = _Field()
        y0 = torch.randn(N, 2, dtype=D, generator=torch.Generator().manual_seed(0))
        box = {}

        def step() -> None:
            sol = neuralode.solve(
                f,
                y0,
                torch.tensor([0.0, T], dtype=D),
                method="reversible_heun",
                gradient="reversible",
                options=dict(step_size=0.01),
                params=tuple(f.parameters()),
            )
            box["steps"] = sol.stats.n_steps
            sol.ys.square().sum().backward()

        return _cpu_peak(step), box["steps"]

    short, n_short = peak(0.2)
    long, n_long = peak(4.0)
    assert n_long >= 20 * n_short
    assert long < 1.5 * short + 1.0, f"peak {short:.1f} MiB over {n_short} steps, {long:.1f} over {n_long}"


def test_a_reversal_that_loses_accuracy_warns():
    k = torch.tensor(50.0, dtype=D, requires_grad=True)  # (strongly dissipative: outside reversible Heun's region)
    y0 = torch.tensor([1.0], dtype=D)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = neuralode.solve(
            lambda t, y: -k * y,
            y0,
            torch.tensor([0.0, 1.0], dtype=D),
            method="reversible_heun",
            options=dict(step_size=0.01),
            gradient="reversible",
            params=(k,),
        )
        sol.ys[-1].sum().backward()
    assert any("came back to y0 only" in str(w.message) for w in caught)
    with warnings.catch_warnings():  # (a benign problem does not warn)
        warnings.simplefilter("error")
        _grads("reversible_heun", {"step_size": 0.01}, "reversible", torch.tensor([0.0, 1.0], dtype=D))


def test_unsupported_combinations_are_refused_by_name():
    f = _Field()
    y0, t = torch.ones(3, 2, dtype=D), torch.tensor([0.0, 1.0], dtype=D)
    with pytest.raises(ValueError, match="reversible_heun"):
        neuralode.solve(f, y0, t, gradient="reversible")
    with pytest.raises(ValueError, match="checkpoint"):
        neuralode.solve(f, y0, t, method="reversible_heun", gradient="checkpoint")
    with pytest.raises(ValueError, match="per-sample adjoint"):
        neuralode.solve(f, y0, t, method="reversible_heun", per_sample=True, gradient="adjoint")
    with pytest.raises(ValueError, match="event_fn"):
        neuralode.solve(f, y0, t, method="reversible_heun", event_fn=lambda t, y: y[0, 0])
    with pytest.raises(ValueError, match="base"):
        neuralode.solve(f, y0, t, method="reversible_rk", options=dict(base="rodas4"))
    with pytest.raises(ValueError, match="base"):
        neuralode.solve(f, y0, t, method="reversible_rk", options=dict(base="no_such_method"))
    with pytest.raises(ValueError, match="step_size"):
        neuralode.solve(f, y0, t, method="reversible_rk", options=dict(base="rk4"))
    for bad in (0.0, 1.5, "x"):
        with pytest.raises(ValueError, match="coupling"):
            neuralode.solve(f, y0, t, method="reversible_rk", options=dict(coupling=bad))
    assert {"reversible_heun", "reversible_rk"} <= set(neuralode.METHODS)


def test_min_step_and_per_sample_options_as_for_the_other_methods():
    def f(t, y):
        return torch.cos(20 * t) * 20 * y

    t = torch.tensor([0.0, 1.0], dtype=D)
    free = neuralode.solve(f, torch.ones(1, dtype=D), t, method="reversible_rk", rtol=1e-8, atol=1e-8)
    floor = neuralode.solve(
        f, torch.ones(1, dtype=D), t, method="reversible_rk", rtol=1e-8, atol=1e-8, options={"min_step": 0.1}
    )
    assert floor.stats.n_steps <= 11 < free.stats.n_steps  # (steps at the floor accepted, none below it)
    with pytest.raises(ValueError, match="not supported with per_sample=True"):
        neuralode.solve(
            f, torch.ones(2, 1, dtype=D), t, method="reversible_heun", per_sample=True, options={"step_t": [0.5]}
        )
