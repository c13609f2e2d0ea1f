"""The adjoint's memory does not grow with the number of steps, through every entry point.

Measured, not assumed: the peak of the bytes allocated by one forward + backward pass (PyTorch's profiler on
CPU, the allocator's statistics on CUDA), for a short span and for a long one that takes many times as many
steps. Keeping every step's dense-output record (what ``solve``'s adjoint did by default) makes the peak grow
in proportion to the steps; the control case below shows that the measurement sees it.
"""

from __future__ import annotations

import pytest
import torch

import neuralode
from neuralode.experiments.classify import _cpu_peak
from neuralode.models import CNF
from neuralode.nn import ODEBlock

N = 10_000  # rows of the state: 2·N float64 values, 160 kB per state-sized tensor


class Oscillator(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(1.0, dtype=torch.float64))

    def forward(self, t, y):
        return torch.stack([y[..., 1], -self.w * y[..., 0]], -1)


def _peak_and_steps(run, T: float) -> tuple[float, int]:
    torch.manual_seed(0)
    f = Oscillator()
    y0 = torch.randn(N, 2, dtype=torch.float64)
    box = {}

    def step() -> None:
        out, stats = run(f, y0, T)
        box["steps"] = stats.n_steps
        out.square().sum().backward()

    peak = _cpu_peak(step)
    return peak, box["steps"]


def _times(T: float) -> torch.Tensor:
    return torch.tensor([0.0, T], dtype=torch.float64)


def _solve(dense=None, **kw):
    def run(f, y0, T):
        sol = neuralode.solve(f, y0, _times(T), gradient="adjoint", rtol=1e-8, atol=1e-8, dense=dense, **kw)
        return sol.ys, sol.stats

    return run


def _odeint_adjoint(f, y0, T):
    stats = neuralode.SolveStats()
    ys = neuralode.odeint_adjoint(f, y0, _times(T), rtol=1e-8, atol=1e-8)
    # (odeint_adjoint returns no statistics: count the steps with a solve of the same problem)
    with torch.no_grad():
        stats = neuralode.solve(f, y0, _times(T), rtol=1e-8, atol=1e-8, dense=False).stats
    return ys, stats


def _ode_block(f, y0, T):
    block = ODEBlock(f, t=_times(T), rtol=1e-8, atol=1e-8, gradient="adjoint")
    return block(y0), block.stats


ENTRY_POINTS = {
    "solve": _solve(),
    "solve_per_sample": _solve(per_sample=True),
    "odeint_adjoint": _odeint_adjoint,
    "ODEBlock": _ode_block,
}


@pytest.mark.slow
@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_adjoint_memory_does_not_grow_with_the_steps(entry):
    run = ENTRY_POINTS[entry]
    short, n_short = _peak_and_steps(run, 0.5)
    long, n_long = _peak_and_steps(run, 20.0)
    assert n_long > 10 * n_short
    assert long < 1.5 * short + 1.0, f"{entry}: peak {short:.1f} MiB over {n_short} steps, {long:.1f} over {n_long}"


def test_compiled_adjoint_memory_does_not_grow_with_the_steps():
    run = _solve(compile="aot_eager")
    _peak_and_steps(run, 0.5)  # (compiles outside the measurement)
    short, n_short = _peak_and_steps(run, 0.5)
    long, n_long = _peak_and_steps(run, 20.0)
    assert n_long > 10 * n_short
    assert long < 1.5 * short + 1.0, f"peak {short:.1f} MiB over {n_short} steps, {long:.1f} over {n_long}"


def test_the_measurement_sees_dense_output_kept_by_the_adjoint():
    short, n_short = _peak_and_steps(_solve(dense=True), 0.5)
    long, n_long = _peak_and_steps(_solve(dense=True), 20.0)
    assert long > 5 * short  # dense output asked for: a record per step


@pytest.mark.slow
def test_continuous_normalizing_flow_memory_does_not_grow_with_the_steps():
    torch.manual_seed(0)
    x = torch.randn(500, 2, dtype=torch.float64)

    def peak(T: float) -> tuple[float, int]:
        torch.manual_seed(0)
        flow = CNF(2, hidden=16, layers=2, T=T, rtol=1e-7, atol=1e-7).double()
        with torch.no_grad():  # (livelier dynamics than at initialisation: the long span takes many steps)
            for p in flow.parameters():
                p.mul_(3.0)
        box = {}

        def step() -> None:
            flow.log_prob(x).mean().backward()
            box["steps"] = flow.stats.n_steps

        return _cpu_peak(step), box["steps"]

    short, n_short = peak(0.1)
    long, n_long = peak(3.0)
    assert n_long > 4 * n_short
    assert long < 1.5 * short + 1.0, f"peak {short:.1f} MiB over {n_short} steps, {long:.1f} over {n_long}"
