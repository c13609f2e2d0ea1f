"""How low can the solver overhead go in a Python loop? The `medium` case of `overhead.py` timed three ways in
one process: neuralode's `odeint`; a bare dopri5 loop that takes the same steps with every piece of solver
arithmetic in NumPy on the tensors' memory (no input checks, no statistics, no dense output, no failure
handling: a floor for any eager solver, not a usable one); and `func` alone (20 calls back to back).

    python benchmarks/overhead_floor.py [--rounds 600] [--case medium]

Prints each one's overhead = wall / (NFE × func time).
"""

from __future__ import annotations

import argparse
import math

import numpy as np
import torch

from neuralode import odeint
from neuralode.experiments.bench import CASES, Counted, MLPField, interleaved_min
from neuralode.solvers.tableaus import TABLEAUS


def bare_dopri5(func, y0: torch.Tensor, t1: float, rtol: float, atol: float):
    """dopri5 from 0 to t1 (Hairer's initial step, integral controller), arithmetic in NumPy, float32 state."""
    tab = TABLEAUS["dopri5"]
    S, shape, n = tab.stages, y0.shape, y0.numel()
    a = [None] + [np.array(r, dtype=np.float32) for r in tab.a[1:]]
    b_err = np.array(tab.b_err, dtype=np.float32)
    K = np.empty((S, n), np.float32)
    scratch = np.empty(n, np.float32)
    scratch_t = torch.from_numpy(scratch).view(shape)
    tmp = np.empty(n, np.float32)
    y = y0.reshape(-1).numpy().copy()
    K[0] = func(torch.scalar_tensor(0.0), y0).reshape(-1).numpy()
    shift = np.float32(atol / rtol)
    scale = np.abs(y) + shift

    def rms(x):
        return math.sqrt(float(np.dot(x, x)) / n) / rtol

    d0, d1 = rms(y / scale), rms(K[0] / scale)
    h0 = 0.01 * d0 / d1
    f1 = func(torch.scalar_tensor(h0), torch.from_numpy(y + np.float32(h0) * K[0]).view(shape)).reshape(-1).numpy()
    d2 = rms((f1 - K[0]) / scale) / h0
    dt = min(100 * h0, (0.01 / max(d1, d2)) ** (1 / (tab.order + 1)))
    t, y_abs = 0.0, np.abs(y)
    while True:
        last = t + dt >= t1
        if last:
            dt = t1 - t
        for i in range(1, S):
            ti = torch.scalar_tensor(t + tab.c[i] * dt)
            np.dot(a[i] * np.float32(dt), K[:i], out=tmp)
            if i == S - 1:
                y1 = y + tmp
                k = func(ti, torch.from_numpy(y1).view(shape))
            else:
                np.add(y, tmp, out=scratch)
                k = func(ti, scratch_t)
            np.copyto(K[i], k.reshape(-1).numpy())
        e = np.dot(b_err, K)
        y1_abs = np.abs(y1)
        e /= np.maximum(y_abs, y1_abs) + shift
        ratio = abs(dt) * rms(e)
        factor = 0.9 * max(ratio, 1e-10) ** (-1 / tab.order)
        if ratio <= 1:
            t, y, y_abs = t + dt, y1, y1_abs
            K[0] = K[S - 1]
            if last:
                return torch.from_numpy(y).view(shape)
            dt *= min(10.0, max(1.0, factor))
        else:
            dt *= min(1.0, max(0.2, factor))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", default="medium", choices=list(CASES))
    p.add_argument("--rounds", type=int, default=600)
    args = p.parse_args()
    torch.set_num_threads(1)
    dim, hidden, batch, t1, _ = CASES[args.case]
    torch.manual_seed(0)
    field = MLPField(dim, hidden)
    y0 = torch.randn(batch, dim)
    t = torch.tensor([0.0, t1])
    with torch.no_grad():
        ours, bare = Counted(field), Counted(field)
        ref = odeint(ours, y0, t, rtol=1e-6, atol=1e-6)[-1]
        got = bare_dopri5(bare, y0, t1, 1e-6, 1e-6)
        assert ours.n == bare.n, (ours.n, bare.n)  # the same steps
        print(f"{args.case}: NFE {ours.n}, bare loop vs odeint max |Δy| = {float((got - ref).abs().max()):.2e}")
        calls = {
            "func": lambda: field(t[0], y0),
            "neuralode odeint": lambda: odeint(field, y0, t, rtol=1e-6, atol=1e-6),
            "bare NumPy loop": lambda: bare_dopri5(field, y0, t1, 1e-6, 1e-6),
        }
        # (both solvers warm, as func: three calls in a row per round, each timed, as in ``neuralode bench``)
        each = {"neuralode odeint": 3, "bare NumPy loop": 3}
        best = interleaved_min(calls, args.rounds, inner={"func": ours.n}, each=each)
    for name in ("neuralode odeint", "bare NumPy loop"):
        print(f"{name:<18} {best[name] * 1e3:7.2f} ms   overhead {best[name] / (ours.n * best['func']):.3f}")
    print(f"{'func':<18} {best['func'] * 1e6:7.1f} µs per call")


if __name__ == "__main__":
    main()
