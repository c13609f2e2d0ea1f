"""Helpers shared by the benchmark scripts: peers, MLP fields, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from typing import Callable

import torch


class MLPField(torch.nn.Module):
    """dy/dt = W2 tanh(W1 y + b1) + b2, the vector field of the overhead benchmarks."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(dim, hidden)
        self.l2 = torch.nn.Linear(hidden, dim)

    def forward(self, t, y):
        return self.l2(torch.tanh(self.l1(y)))


class Counted(torch.nn.Module):
    """Counts calls (batched function evaluations) of the wrapped field."""

    def __init__(self, f: torch.nn.Module) -> None:
        super().__init__()
        self.f = f
        self.n = 0

    def forward(self, t, y):
        self.n += 1
        return self.f(t, y)


def best_time(fn: Callable[[], object], repeats: int, min_seconds: float = 0.0) -> float:
    """Minimum wall time over ``repeats`` calls after one warm-up call (min: the least disturbed run)."""
    fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - start < min_seconds:
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
    return min(times)


def median_time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        a = time.perf_counter()
        fn()
        times.append(time.perf_counter() - a)
    return statistics.median(times)


def machine() -> dict:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }


def save_json(obj: dict, path: str) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=2)


def torchode_solver(field: torch.nn.Module, rtol: float, atol: float):
    """A torchode dopri5 solve ``(y0, t_eval) -> ys`` (torchode steps each batch element on its own)."""
    import torchode as to

    term = to.ODETerm(lambda t, y: field(t, y))
    step = to.Dopri5(term=term)
    ctrl = to.IntegralController(atol=atol, rtol=rtol, term=term)
    solver = to.AutoDiffAdjoint(step, ctrl)

    def solve(y0: torch.Tensor, t: torch.Tensor):
        t_eval = t[None].expand(y0.shape[0], -1)
        return solver.solve(to.InitialValueProblem(y0=y0, t_eval=t_eval)).ys
    return solve
