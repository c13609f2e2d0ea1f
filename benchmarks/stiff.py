"""Batched stiff solve: 256 Robertson problems with different rate constants, rtol 1e-6, atol 1e-10, t ∈ [0, 1e5].

neuralode solves the batch together (one Jacobian per sample, batched LU; with compile=True the whole rodas4
step is one compiled function, its first-call compile time reported); scipy loops over the batch with
Radau, BDF and LSODA. Every implicit solver gets an exact Jacobian: neuralode's by autograd or from
``func.jacobian``, scipy's from the analytic Jacobian passed as ``solve_ivp(jac=...)`` (without it scipy
approximates the Jacobian by finite differences, 3 extra evaluations of f each time, and the comparison
measures that rather than the solvers; ``--scipy-fd`` adds those rows for reference). Reports wall time, the
Jacobian each solver used, and the worst error relative to the tolerance against scipy's Radau at rtol 1e-12
per problem (a subset of ``--check`` problems), and what dopri5 does on the same batch.

    python benchmarks/stiff.py [--batch 256] [--check 16] [--scipy-fd] [--out runs/bench/stiff.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from scipy.integrate import solve_ivp

import neuralode as node

SCIPY_METHODS = ("Radau", "BDF", "LSODA")


def robertson_np(k) -> tuple:
    """One Robertson problem with rate constants ``k = (k1, k2, k3)`` for scipy: the vector field and its
    analytic Jacobian (both plain Python/numpy, as solve_ivp calls them)."""
    k1, k2, k3 = k

    def f(_, y):
        return [-k1 * y[0] + k2 * y[1] * y[2], k1 * y[0] - k2 * y[1] * y[2] - k3 * y[1] ** 2, k3 * y[1] ** 2]

    def jac(_, y):
        return np.array(
            [
                [-k1, k2 * y[2], k2 * y[1]],
                [k1, -k2 * y[2] - 2 * k3 * y[1], -k2 * y[1]],
                [0.0, 2 * k3 * y[1], 0.0],
            ]
        )

    return f, jac


def run_scipy(rates: np.ndarray, t_eval: np.ndarray, method: str, rtol: float, atol: float, jacobian: bool = True):
    """Solve each problem of the batch (rows of ``rates``) with solve_ivp; ``jacobian`` passes the analytic
    Jacobian as ``jac=``. Returns (states (batch, len(t_eval), 3), total nfev, total njev, seconds)."""
    out, nfev, njev = [], 0, 0
    t0 = time.perf_counter()
    for k in rates:
        f, jac = robertson_np(k)
        kw = {"jac": jac} if jacobian else {}
        r = solve_ivp(f, (0, t_eval[-1]), [1.0, 0, 0], method=method, rtol=rtol, atol=atol, t_eval=t_eval, **kw)
        out.append(r.y.T)
        nfev, njev = nfev + int(r.nfev), njev + int(r.njev)
    return np.stack(out), nfev, njev, time.perf_counter() - t0


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--check", type=int, default=16, help="problems checked against the tight reference")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument(
        "--scipy-fd", action="store_true", help="also time scipy with finite-difference Jacobians (no jac=)"
    )
    ap.add_argument("--out", default="runs/bench/stiff.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    scale = torch.exp(torch.empty(args.batch, 3, dtype=torch.float64).uniform_(-0.5, 0.5, generator=g))
    rates = torch.tensor([0.04, 1e4, 3e7], dtype=torch.float64) * scale
    y0 = torch.tensor([[1.0, 0.0, 0.0]], dtype=torch.float64).repeat(args.batch, 1)
    t_eval = np.array([0.0, 1e-3, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
    t = torch.tensor(t_eval, dtype=torch.float64)
    rtol, atol = 1e-6, 1e-10

    def f_batch(_, y):
        k1, k2, k3 = rates[:, 0], rates[:, 1], rates[:, 2]
        y1, y2, y3 = y[:, 0], y[:, 1], y[:, 2]
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2**2, k3 * y2**2], 1)

    def robertson_jacobian(_, y):  # analytic Jacobians, one 3×3 block per problem (func.jacobian hook)
        k1, k2, k3 = rates[:, 0], rates[:, 1], rates[:, 2]
        y2, y3 = y[:, 1], y[:, 2]
        z = torch.zeros_like(y2)
        return torch.stack(
            [
                torch.stack([-k1, k2 * y3, k2 * y2], 1),
                torch.stack([k1, -k2 * y3 - 2 * k3 * y2, -k2 * y2], 1),
                torch.stack([z, 2 * k3 * y2, z], 1),
            ],
            1,
        )

    class WithJacobian:
        def __call__(self, t, y):
            return f_batch(t, y)

        def jacobian(self, t, y):
            return robertson_jacobian(t, y)

    refs = list(run_scipy(rates[: args.check].numpy(), t_eval, "Radau", rtol=1e-12, atol=1e-16)[0])

    def worst(ys: np.ndarray) -> float:
        return max(float((np.abs(ys[b] - refs[b]) / (atol + rtol * np.abs(refs[b]))).max()) for b in range(args.check))

    rows = []
    for method, func, label, options in (
        ("rodas4", f_batch, "rodas4 compile=True", {"compile": True}),
        ("rodas4", WithJacobian(), "rodas4 + jacobian, compile", {"compile": True}),
        ("rodas4", f_batch, "rodas4 (batched)", None),
        ("rodas4", WithJacobian(), "rodas4 + func.jacobian", None),
        ("rosenbrock23", f_batch, "rosenbrock23 (batched)", None),
    ):
        jacobian = "analytic (func.jacobian)" if isinstance(func, WithJacobian) else "autograd"
        first = None
        with torch.no_grad():
            if options:  # compiled: the first call compiles (reported), the second is the steady state
                t0 = time.perf_counter()
                node.solve(func, y0, t, method=method, rtol=rtol, atol=atol, options=options)
                first = time.perf_counter() - t0
            t0 = time.perf_counter()
            sol = node.solve(func, y0, t, method=method, rtol=rtol, atol=atol, options=options)
            wall = time.perf_counter() - t0
        ys = sol.ys.permute(1, 0, 2).numpy()
        rows.append(
            {
                "solver": f"neuralode {label}",
                "seconds": wall,
                "first_call_seconds": first,
                "worst_error_over_tol": worst(ys),
                "steps": sol.stats.n_steps,
                "jacobian": jacobian,
                "status": "ok",
            }
        )
    with torch.no_grad():
        t0 = time.perf_counter()
        sol = node.solve(
            f_batch, y0, t, method="dopri5", rtol=rtol, atol=atol, on_failure="return", options={"max_num_steps": 5000}
        )
        wall = time.perf_counter() - t0
    rows.append(
        {
            "solver": "neuralode dopri5 (batched)",
            "seconds": wall,
            "worst_error_over_tol": float("nan"),
            "steps": sol.stats.n_steps,
            "jacobian": "none (explicit)",
            "status": f"{sol.status.name} at t={sol.t_fail:.3g}" if sol.t_fail is not None else sol.status.name,
        }
    )
    rate_rows = rates.numpy()
    for jac in (True, False) if args.scipy_fd else (True,):
        for method in SCIPY_METHODS:
            ys, nfev, njev, wall = run_scipy(rate_rows, t_eval, method, rtol, atol, jacobian=jac)
            rows.append(
                {
                    "solver": f"scipy {method} (loop{'' if jac else ', FD jac'})",
                    "seconds": wall,
                    "worst_error_over_tol": worst(ys),
                    "steps": None,
                    "jacobian": "analytic (jac=)" if jac else "finite differences",
                    "nfev": nfev,
                    "njev": njev,
                    "status": "ok",
                }
            )
    # the reference is the fastest scipy run, whichever Jacobian it had (for a 3x3 system LSODA's finite
    # differences can cost no more than a Python jac= callback)
    best_scipy = min(r["seconds"] for r in rows if r["solver"].startswith("scipy"))
    print(f"{args.batch} Robertson problems, rtol {rtol:g}, atol {atol:g}, {args.threads} thread(s)")
    print("every implicit solver has an exact Jacobian (scipy's passed as jac=); 'vs best scipy' is against the")
    print("fastest scipy row")
    print(
        f"{'solver':<34} {'seconds':>8} {'vs best scipy':>13} {'worst err/tol':>13} {'steps':>6}  "
        f"{'jacobian':<24} status"
    )
    for r in rows:
        r["speedup_vs_best_scipy"] = best_scipy / r["seconds"]
        steps = "" if r["steps"] is None else r["steps"]
        first = "" if r.get("first_call_seconds") is None else f" (first call {r['first_call_seconds']:.1f} s)"
        print(
            f"{r['solver']:<34} {r['seconds']:>8.3f} {r['speedup_vs_best_scipy']:>12.2f}x "
            f"{r['worst_error_over_tol']:>13.3g} {steps:>6}  {r['jacobian']:<24} {r['status']}{first}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        meta = {"batch": args.batch, "rtol": rtol, "atol": atol, "scipy_jacobian": "analytic, passed as jac="}
        json.dump({**meta, "rows": rows}, fh, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
