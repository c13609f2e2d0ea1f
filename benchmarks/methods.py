"""Which method for which problem: evaluations, steps and error of neuralode's methods on standard problems.

For each problem (a harmonic oscillator, van der Pol at μ = 1 and μ = 1000, Robertson's kinetics, a neural
MLP vector field) the relevant methods run at a few tolerances (adaptive) or step sizes (fixed step), forward
only, in float64. Each row records the evaluations of ``func`` (``sol.stats.nfe``, Jacobians by autograd
included), the accepted and rejected steps, and the error at the requested times against a tight reference:
the exact solution for the oscillator, otherwise scipy's ``solve_ivp`` at rtol 1e-12 (DOP853 for non-stiff
problems, Radau for stiff ones). ``err_over_tol`` is max |y − y_ref| / (atol + rtol·|y_ref|) over the requested
times and components: 1 means the error is as large as the tolerance asked for. Counts and errors are
deterministic (seeded MLP, one thread); wall times are recorded for information only.

    python benchmarks/methods.py [--out docs/data/methods.json] [--markdown]
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time

import numpy as np
import scipy
import torch
from scipy.integrate import solve_ivp

import neuralode as node
from neuralode.experiments.bench import save_json

D = torch.float64


# ------------------------------------------------------------------------------------------------ problems


def oscillator():
    def f(t, y):
        return torch.stack([y[..., 1], -y[..., 0]], -1)

    t = np.linspace(0.0, 10.0, 11)
    exact = np.stack([np.cos(t), -np.sin(t)], 1)
    return dict(
        name="oscillator",
        description="harmonic oscillator x'' = -x, x(0) = 1, x'(0) = 0, t in [0, 10] (11 outputs)",
        kind="non-stiff",
        func=f,
        y0=[1.0, 0.0],
        t=t,
        reference=("exact", exact),
        atol_factor=1.0,
        adaptive=[(m, tol) for m in ("dopri5", "tsit5", "bosh3", "dopri8") for tol in (1e-3, 1e-6, 1e-9)],
        fixed=[("euler", 0.01), ("midpoint", 0.01), ("rk4", 0.1), ("rk4", 0.01)],
    )


def _vdp(mu: float):
    def f(t, y):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    def f_np(t, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    def jac_np(t, y):
        return [[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1.0, mu * (1 - y[0] ** 2)]]

    return f, f_np, jac_np


def vdp1():
    f, f_np, _ = _vdp(1.0)
    return dict(
        name="vdp_mu1",
        description="van der Pol, mu = 1, y0 = (2, 0), t in [0, 20] (21 outputs)",
        kind="non-stiff",
        func=f,
        y0=[2.0, 0.0],
        t=np.linspace(0.0, 20.0, 21),
        reference=("DOP853", f_np, None),
        atol_factor=1.0,
        adaptive=[(m, tol) for m in ("dopri5", "tsit5", "bosh3", "dopri8") for tol in (1e-3, 1e-6, 1e-9)]
        + [("rodas4", 1e-3), ("rodas4", 1e-6)],
        fixed=[("rk4", 0.01)],
    )


def vdp1000():
    f, f_np, jac_np = _vdp(1000.0)
    return dict(
        name="vdp_mu1000",
        description="van der Pol, mu = 1000 (stiff), y0 = (2, 0), t in [0, 3000] (31 outputs)",
        kind="stiff",
        func=f,
        y0=[2.0, 0.0],
        t=np.linspace(0.0, 3000.0, 31),
        reference=("Radau", f_np, jac_np),
        atol_factor=1.0,
        adaptive=[
            ("rodas4", 1e-3),
            ("rodas4", 1e-6),
            ("rodas4", 1e-8),
            ("rosenbrock23", 1e-3),
            ("rosenbrock23", 1e-6),
            ("adaptive_trbdf2", 1e-3),
            ("adaptive_trbdf2", 1e-5),
        ],
        fixed=[],
        failing=[("dopri5", 1e-6, 5000)],
    )


def robertson():
    k1, k2, k3 = 0.04, 1e4, 3e7

    def f(t, y):
        y1, y2, y3 = y[..., 0], y[..., 1], y[..., 2]
        return torch.stack([-k1 * y1 + k2 * y2 * y3, k1 * y1 - k2 * y2 * y3 - k3 * y2**2, k3 * y2**2], -1)

    def f_np(t, y):
        return [-k1 * y[0] + k2 * y[1] * y[2], k1 * y[0] - k2 * y[1] * y[2] - k3 * y[1] ** 2, k3 * y[1] ** 2]

    def jac_np(t, y):
        return [
            [-k1, k2 * y[2], k2 * y[1]],
            [k1, -k2 * y[2] - 2 * k3 * y[1], -k2 * y[1]],
            [0.0, 2 * k3 * y[1], 0.0],
        ]

    t = np.array([0.0, 1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1e3, 1e4, 1e5])

    def geometric(per_decade: int):
        def grid(func, y0, tt):  # 0, then per_decade points per decade from 1e-6 to 1e5
            g = torch.logspace(-6, 5, 11 * per_decade + 1, dtype=D)
            return torch.cat([torch.zeros(1, dtype=D), g])

        return grid

    return dict(
        name="robertson",
        description="Robertson's kinetics (stiff), y0 = (1, 0, 0), t in [0, 1e5] (10 outputs, log-spaced); "
        "atol = 1e-4 * rtol",
        kind="stiff",
        func=f,
        y0=[1.0, 0.0, 0.0],
        t=t,
        reference=("Radau", f_np, jac_np),
        atol_factor=1e-4,
        adaptive=[
            ("rodas4", 1e-4),
            ("rodas4", 1e-6),
            ("rodas4", 1e-8),
            ("rosenbrock23", 1e-4),
            ("rosenbrock23", 1e-6),
            ("adaptive_trbdf2", 1e-4),
            ("adaptive_trbdf2", 1e-6),
        ],
        # fixed-step implicit methods on a geometric grid (no error control: the grid decides the error)
        fixed=[
            ("implicit_euler", ("geometric grid, 40 points per decade", geometric(40))),
            ("radauIIA5", ("geometric grid, 10 points per decade", geometric(10))),
            ("radauIIA5", ("geometric grid, 40 points per decade", geometric(40))),
        ],
        failing=[("dopri5", 1e-6, 5000)],
    )


def mlp():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4)).to(D)
    y0 = torch.randn(8, 4, dtype=D)

    def f(t, y):
        return net(y)

    def f_np(t, y):
        with torch.no_grad():
            return net(torch.from_numpy(y).view(8, 4)).reshape(-1).numpy()

    return dict(
        name="mlp",
        description="neural vector field: a seeded tanh MLP 4 -> 32 -> 4 (PyTorch's default initialisation), "
        "batch of 8 states, t in [0, 5] (11 outputs)",
        kind="non-stiff",
        func=f,
        y0=y0,
        t=np.linspace(0.0, 5.0, 11),
        reference=("DOP853", f_np, None),
        atol_factor=1.0,
        adaptive=[
            (m, tol)
            for m in ("dopri5", "tsit5", "bosh3", "dopri8", "adaptive_heun", "fehlberg2")
            for tol in (1e-3, 1e-6, 1e-9)
            if not (m in ("adaptive_heun", "fehlberg2") and tol < 1e-6)
        ],
        fixed=[("euler", 0.01), ("midpoint", 0.05), ("rk4", 0.25), ("rk4", 0.1)],
    )


PROBLEMS = (oscillator, vdp1, vdp1000, robertson, mlp)
REF_RTOL = 1e-12


def reference(p: dict, y0: np.ndarray) -> tuple[np.ndarray, dict]:
    if p["reference"][0] == "exact":
        return p["reference"][1], {"kind": "exact solution"}
    method, f_np, jac = p["reference"]
    atol = 1e-16 if p["name"] == "robertson" else 1e-14
    kw = {"jac": jac} if jac is not None else {}
    t = p["t"]
    r = solve_ivp(f_np, (t[0], t[-1]), y0, method=method, rtol=REF_RTOL, atol=atol, t_eval=t, **kw)
    if not r.success:
        raise RuntimeError(f"reference failed on {p['name']}: {r.message}")
    return r.y.T, {"kind": f"scipy solve_ivp {method}", "rtol": REF_RTOL, "atol": atol}


def measure(p: dict, ref: np.ndarray, method: str, rtol=None, step=None, max_num_steps=None) -> dict:
    y0 = torch.as_tensor(p["y0"], dtype=D)
    t = torch.as_tensor(p["t"], dtype=D)
    row: dict = {"method": method}
    options: dict = {}
    if rtol is not None:
        atol = rtol * p["atol_factor"]
        row.update(rtol=rtol, atol=atol)
    else:
        rtol = atol = 1e-7  # (fixed step: ignored)
        if isinstance(step, tuple):
            row["grid"] = step[0]
            options["grid_constructor"] = step[1]
        else:
            row["step_size"] = step
            options["step_size"] = step
    if max_num_steps is not None:
        options["max_num_steps"] = max_num_steps
        row["max_num_steps"] = max_num_steps
    t0 = time.perf_counter()
    with torch.no_grad():
        sol = node.solve(
            p["func"], y0, t, method=method, rtol=rtol, atol=atol, options=options, on_failure="return", dense=False
        )
    row["seconds"] = round(time.perf_counter() - t0, 4)
    row.update(nfe=sol.stats.nfe, n_steps=sol.stats.n_steps, n_rejected=sol.stats.n_rejected)
    row["status"] = sol.status.name.lower()
    if not sol.success:
        row["t_fail"] = sol.t_fail
        row["message"] = sol.message.split(". ")[0]
        return row
    ys = sol.ys.reshape(len(t), -1).numpy()
    err = np.abs(ys - ref)[1:]
    row["max_abs_err"] = float(err.max())
    if "rtol" in row:
        row["err_over_tol"] = float((err / (row["atol"] + row["rtol"] * np.abs(ref[1:]))).max())
    return row


def markdown(result: dict) -> str:
    out = []
    for name, p in result["problems"].items():
        out.append(f"\n### {name}: {p['description']}\n")
        out.append("| method | rtol / step | NFE | steps (rejected) | max abs error | error / tol |")
        out.append("|---|---|---|---|---|---|")
        for r in p["rows"]:
            how = f"{r['rtol']:.0e}" if "rtol" in r else r.get("grid") or f"h = {r['step_size']:g}"
            if r["status"] != "success":
                out.append(
                    f"| `{r['method']}` | {how} | {r['nfe']} | {r['n_steps']} ({r['n_rejected']}) | "
                    f"{r['status']} at t = {r['t_fail']:.3g} | |"
                )
                continue
            eot = f"{r['err_over_tol']:.2g}" if "err_over_tol" in r else "—"
            out.append(
                f"| `{r['method']}` | {how} | {r['nfe']} | {r['n_steps']} ({r['n_rejected']}) | "
                f"{r['max_abs_err']:.1e} | {eot} |"
            )
    return "\n".join(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/data/methods.json")
    ap.add_argument("--markdown", action="store_true", help="also print the tables as Markdown")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    result: dict = {
        "command": "python benchmarks/methods.py"
        + (f" --out {args.out}" if args.out != "docs/data/methods.json" else ""),
        "date": datetime.date.today().isoformat(),
        "versions": {
            "python": platform.python_version(),
            "neuralode": node.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "scipy": scipy.__version__,
        },
        "dtype": "float64",
        "threads": 1,
        "err_over_tol": "max over requested times (after t0) and components of |y - y_ref| / (atol + rtol*|y_ref|)",
        "nfe": "sol.stats.nfe: calls of func, Jacobians by autograd and the starting-step heuristic included",
        "problems": {},
    }
    for make in PROBLEMS:
        p = make()
        y0 = np.asarray(torch.as_tensor(p["y0"], dtype=D).reshape(-1))
        ref, ref_info = reference(p, y0)
        rows = []
        for method, tol in p["adaptive"]:
            rows.append(measure(p, ref, method, rtol=tol))
        for method, step in p["fixed"]:
            rows.append(measure(p, ref, method, step=step))
        for method, tol, cap in p.get("failing", []):
            rows.append(measure(p, ref, method, rtol=tol, max_num_steps=cap))
        for r in rows:
            print(
                f"{p['name']:<11} {r['method']:<16} {r.get('rtol', r.get('step_size', r.get('grid'))):<10} "
                f"nfe {r['nfe']:>6}  steps {r['n_steps']:>5} ({r['n_rejected']:>4})  "
                + (
                    f"err {r['max_abs_err']:.2e}  err/tol {r.get('err_over_tol', math.nan):.3g}"
                    if r["status"] == "success"
                    else f"{r['status']} at t={r['t_fail']:.4g}"
                )
                + f"  {r['seconds']:.2f} s",
                flush=True,
            )
        result["problems"][p["name"]] = {
            "description": p["description"],
            "kind": p["kind"],
            "t": [float(x) for x in p["t"]],
            "y0": y0.tolist() if y0.size <= 4 else f"{y0.size} values (seeded)",
            "reference": ref_info,
            "rows": rows,
        }
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    save_json(result, args.out)
    if args.markdown:
        print(markdown(result))
    print(f"written {args.out} in {result['total_seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
