"""Checkpointed gradients in a budget of states (``checkpoints=N``).

The schedule on its own: every step is pulled back once, in reverse, from the state the forward would have
had, with never more than the budget held, at a cost close to the offline optimum of binomial checkpointing
(Griewank & Walther 2000: t(l, c) = r·l − β(c + 1, r − 1)). Through ``solve``: the gradient equals backprop's
in float64 for every budget, joint and per-sample, fixed-step and adaptive, with outputs inside steps and at a
discontinuity; the peak memory of a long solve does not grow with its steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import neuralode
from neuralode.experiments.classify import _cpu_peak
from neuralode.gradients.budget import OnlineCheckpoints, reverse_steps


def _run_schedule(n: int, budget: int) -> tuple[int, int]:
    """(advances, most states alive at once) for reversing n steps of a stand-in state (y_i holds i)."""
    live = {"now": 0, "most": 0, "advances": 0}

    class State:
        def __init__(self, i: int) -> None:
            self.i = i
            live["now"] += 1
            live["most"] = max(live["most"], live["now"])

        def __del__(self) -> None:
            live["now"] -= 1

    kept = OnlineCheckpoints(budget)
    for i in range(n):
        kept.add(i, State(i))
        assert len(kept.states) <= budget
    states = kept.states
    del kept
    pulled: list[int] = []

    def advance(i, y):
        assert y.i == i
        live["advances"] += 1
        return State(i + 1)

    def pull(i, y):
        assert y.i == i
        pulled.append(i)

    reverse_steps(n, states, budget, advance, pull)
    assert pulled == list(reversed(range(n)))
    return live["advances"], live["most"]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(n=st.integers(1, 400), budget=st.integers(1, 40))
def test_every_step_is_pulled_back_once_within_the_budget(n, budget):
    _, most = _run_schedule(n, budget)
    assert most <= budget + 2  # (the kept states, and the input and output of the step being taken)


def _offline_optimum(steps: int, c: int) -> int:
    """Fewest step evaluations (first sweep included) to reverse ``steps`` steps with ``c`` checkpoints:
    Griewank & Walther (2000), t(l, c) = r·l − β(c + 1, r − 1) with β(c, r) = C(c + r, c)."""
    r = 1
    while math.comb(c + r, c) < steps:
        r += 1
    return r * steps - math.comb(c + r, c + 1)


@pytest.mark.parametrize("n", [50, 300, 1000, 10_000])
@pytest.mark.parametrize("budget", [4, 16, 64, 128])
def test_recomputation_is_near_the_offline_optimum(n, budget):
    # (the online schedule cannot know n; over this grid it was measured within 1.31x of the optimum)
    advances, _ = _run_schedule(n, budget)
    evaluations = n + advances  # the forward sweep and the recomputation
    assert evaluations <= 1.35 * _offline_optimum(n, budget)


def test_one_state_per_step_without_a_budget_recomputes_nothing():
    advances, _ = _run_schedule(50, 50)
    assert advances == 0


class _Field(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.l1 = torch.nn.Linear(2, 16).double()
        self.l2 = torch.nn.Linear(16, 2).double()
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y))) * (1 + 0.1 * torch.sin(3 * t)).reshape(-1, 1)


def _grads(f, y0, t, **kw):
    y0 = y0.detach().requires_grad_(True)
    sol = neuralode.solve(f, y0, t, **kw)
    loss = (sol.ys**2).sum() + sol.ys.sum()
    return torch.autograd.grad(loss, [y0, *f.parameters()]), sol


CASES = {
    "dopri5": dict(method="dopri5", rtol=1e-9, atol=1e-9),
    "bosh3 at a jump": dict(method="bosh3", rtol=1e-7, atol=1e-7, options=dict(jump_t=[1.3])),
    "rk4 fixed": dict(method="rk4", options=dict(step_size=0.05)),
    "tsit5 per-sample": dict(method="tsit5", rtol=1e-8, atol=1e-8, per_sample=True),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("budget", [1, 2, 5, 17])
def test_gradient_in_a_budget_equals_backprop(case, budget):
    f = _Field()
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.37, 1.0, 2.2, 3.0], dtype=torch.float64)  # (outputs inside steps)
    kw = CASES[case]
    ref, sol_ref = _grads(f, y0, t, **kw)
    got, sol = _grads(f, y0, t, gradient="checkpoint", checkpoints=budget, **kw)
    assert sol.stats.n_steps == sol_ref.stats.n_steps and sol.stats.n_steps > 2 * budget or budget == 17
    torch.testing.assert_close(sol.ys, sol_ref.ys, rtol=0, atol=1e-13)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-11)
    if budget == 1:  # (one kept state: every step recomputed from the start, quadratically many evaluations)
        n = sol.stats.n_steps
        assert sol.stats.nfe_backward > n * (n - 1) / 2


def test_a_budget_costs_recomputation_and_saves_states():
    f = _Field()
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 6.0], dtype=torch.float64)
    _, full = _grads(f, y0, t, gradient="checkpoint", rtol=1e-9, atol=1e-9)
    _, some = _grads(f, y0, t, gradient="checkpoint", checkpoints=4, rtol=1e-9, atol=1e-9)
    assert full.stats.n_steps > 40
    assert some.stats.nfe_backward > full.stats.nfe_backward
    state = y0.numel() * 8
    grid = some.stats.checkpoint_bytes - 4 * state
    assert full.stats.checkpoint_bytes >= full.stats.n_steps * state + grid


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_steps():
    N = 10_000

    class Oscillator(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

        def forward(self, t, y):
            return torch.stack([y[..., 1], -self.w * y[..., 0]], -1)

    def peak(T: float, budget) -> tuple[float, int]:
        f = Oscillator()
        y0 = torch.randn(N, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        box = {}

        def step() -> None:
            sol = neuralode.solve(
                f, y0, torch.tensor([0.0, T]), gradient="checkpoint", checkpoints=budget, rtol=1e-8, atol=1e-8
            )
            box["steps"] = sol.stats.n_steps
            sol.ys.square().sum().backward()

        return _cpu_peak(step), box["steps"]

    short, n_short = peak(1.0, 8)
    long, n_long = peak(20.0, 8)
    assert n_long > 10 * n_short
    assert long < 1.5 * short + 1.0, f"peak {short:.1f} MiB over {n_short} steps, {long:.1f} over {n_long}"
    every, _ = peak(20.0, None)  # control: one state per step, the measurement sees it grow
    assert every > 3 * long


def test_bad_budgets_are_refused_by_name():
    f = _Field()
    y0, t = torch.ones(2, dtype=torch.float64), torch.tensor([0.0, 1.0], dtype=torch.float64)
    for bad in (0, -3, 2.5, "4", True):
        with pytest.raises(ValueError, match="checkpoints"):
            neuralode.solve(f, y0, t, gradient="checkpoint", checkpoints=bad)
    with pytest.raises(ValueError, match="checkpoints"):
        neuralode.solve(f, y0, t, gradient="adjoint", checkpoints=4)
    with pytest.raises(ValueError, match="checkpoints"):
        neuralode.solve(f, y0, t, gradient=neuralode.Checkpoint(checkpoints=3), checkpoints=4)
    with pytest.raises(ValueError, match="checkpoints"):
        neuralode.Checkpoint(checkpoints=0)


@pytest.mark.parametrize("per_sample", [False, True])
def test_a_budget_with_the_compiled_loop_equals_backprop(per_sample):
    """compile=True: the forward runs in the compiled loop and fills the same budgeted trace; the replayed
    steps go through the compiled step."""
    f = _Field()
    y0 = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0.0, 0.37, 1.0, 2.2], dtype=torch.float64)
    kw = dict(method="dopri5", rtol=1e-8, atol=1e-8, per_sample=per_sample)
    ref, _ = _grads(f, y0, t, **kw)
    got, sol = _grads(f, y0, t, gradient="checkpoint", checkpoints=3, compile="aot_eager", **kw)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
