"""How far the adjoint's backward re-solve drifts, and what that does to its gradients.

The adjoint method (Chen et al. 2018, Alg. 1) does not keep the forward trajectory: it solves the state
backwards alongside the adjoint. Where the dynamics contract (dissipative, stiff, or attracted to a limit
cycle) that backward solve amplifies errors, the re-solved state drifts from the forward one, and the
gradients computed along it drift too. For a few problems, in float64, this script records

* the drift: at each output time, the RMS over components of (y_back − y_fwd) / (|y_fwd| + atol/rtol) — the
  error control's own scale — where y_back is the adjoint's re-solved state (read from the check
  ``neuralode.gradients.adjoint`` makes at every output time) and y_fwd the forward solution; also as a
  multiple of rtol, and whether the library's ``RuntimeWarning`` fired;
* the gradients of a loss by backprop, checkpoint, adjoint and adjoint with the seminorm, each compared with
  central finite differences of tight solves (dopri5 at rtol = atol = 1e-12: the exact flow's derivative),
  and the adjoint's with backprop's (the exact derivative of the same discrete solve).

Problems: a seeded tanh MLP field, van der Pol at μ = 2 and μ = 8, and the first zero-crossing time of van
der Pol's x at μ = 8 as an event (d t*/d μ).

    python benchmarks/adjoint_drift.py [--out docs/data/adjoint_drift.json]
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import time
import warnings

import torch

import neuralode as node
from neuralode.experiments.bench import save_json
from neuralode.gradients import adjoint as adjoint_module
from neuralode.gradients import common

D = torch.float64
MODES = ("backprop", "checkpoint", "adjoint", "adjoint_seminorm")
TIGHT = dict(rtol=1e-12, atol=1e-12)


class VdP(torch.nn.Module):
    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=D))

    def forward(self, t, y):
        return torch.stack([y[..., 1], self.mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 64), torch.nn.Tanh(), torch.nn.Linear(64, 2)).to(D)

    def forward(self, t, y):
        return self.net(y)


# ------------------------------------------------------------------------------------------ instrumentation


class DriftRecorder:
    """Wraps the adjoint's per-output-time drift check: records every output time's drift (the library checks
    until its first warning; here every segment is measured) and whether the library's check would warn."""

    def __init__(self) -> None:
        self.records: list[dict] = []
        self.original = adjoint_module.warn_on_drift

    def __enter__(self):
        def hook(y_back, y_fwd, rtol, atol, t_from, t_to, key=None):
            with torch.no_grad():
                scaled = (y_back - y_fwd) / (y_fwd.abs() + atol / rtol)
                rel = float(scaled.square().mean().sqrt())
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                self.original(y_back, y_fwd, rtol, atol, t_from, t_to, key=None)
            self.records.append(
                {
                    "t_from": float(t_from),
                    "t_to": float(t_to),
                    "drift": rel,
                    "drift_over_rtol": rel / float(rtol),
                    "warns": any("re-solved the state" in str(w.message) for w in caught),
                }
            )
            return False  # (keep checking every segment)

        adjoint_module.warn_on_drift = hook
        return self

    def __exit__(self, *exc):
        adjoint_module.warn_on_drift = self.original


# ------------------------------------------------------------------------------------------------ problems


def solve_kw(mode: str, tol: dict) -> dict:
    if mode == "adjoint_seminorm":
        return dict(gradient="adjoint", adjoint_options={"norm": "seminorm"}, **tol)
    return dict(gradient=mode, **tol)


def flatten(gs) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in gs])


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def trajectory_problem(name: str, description: str, func, y0, t, tol: dict, loss, direction=None) -> dict:
    """Gradients of ``loss(ys)`` with respect to y0 and the parameters (along a random direction in parameter
    space for finite differences when there are many parameters)."""
    params = [p for p in func.parameters()]
    n_params = sum(p.numel() for p in params)

    rows = {}
    for mode in MODES:
        y = y0.clone().requires_grad_(True)
        common._DRIFT_WARNED.discard(id(func))
        t0 = time.perf_counter()
        try:
            with DriftRecorder() as rec:
                sol = node.solve(func, y, t, **solve_kw(mode, tol))
                gs = torch.autograd.grad(loss(sol.ys), [y, *params])
        except node.SolverError as exc:  # the adjoint's backward re-solve may not get through at all
            rows[mode] = {"error": f"{type(exc).__name__}: {str(exc).split('. ')[0]}", "drift": rec.records}
            continue
        rows[mode] = {
            "seconds": round(time.perf_counter() - t0, 3),
            "nfe": sol.stats.nfe,
            "nfe_backward": sol.stats.nfe_backward,
            "grad_y0": gs[0],
            "grad_params": flatten(gs[1:]),
            "drift": rec.records,
        }

    def tight_loss(y, shift):
        with torch.no_grad():
            if shift is not None:
                for p, s in zip(params, shift):
                    p.add_(s)
            try:
                return float(loss(node.odeint(func, y, t, method="dopri5", **TIGHT)))
            finally:
                if shift is not None:
                    for p, s in zip(params, shift):
                        p.sub_(s)

    h = 1e-6
    fd_y0 = torch.zeros_like(y0)
    for i in range(y0.numel()):
        e = torch.zeros_like(y0).reshape(-1)
        e[i] = h
        e = e.view_as(y0)
        fd_y0.view(-1)[i] = (tight_loss(y0 + e, None) - tight_loss(y0 - e, None)) / (2 * h)
    if direction is None:  # every parameter (few of them)
        fd_p = []
        for p in params:
            for i in range(p.numel()):
                shift_plus = [torch.zeros_like(q) for q in params]
                shift_plus[params.index(p)].view(-1)[i] = h
                shift_minus = [-s for s in shift_plus]
                fd_p.append((tight_loss(y0, shift_plus) - tight_loss(y0, shift_minus)) / (2 * h))
        fd_params = torch.tensor(fd_p, dtype=D)
        project = lambda g: g
        what = "every parameter"
    else:  # a directional derivative along a fixed random direction v
        v = direction
        chunks = list(torch.split(v, [p.numel() for p in params]))
        shift = [c.view_as(p) * h for c, p in zip(chunks, params)]
        fd_params = torch.tensor([(tight_loss(y0, shift) - tight_loss(y0, [-s for s in shift])) / (2 * h)], dtype=D)
        project = lambda g: (g * v).sum().reshape(1)
        what = "directional derivative along a seeded random unit direction in parameter space"

    out_rows = []
    bp = rows["backprop"]
    for mode in MODES:
        r = rows[mode]
        drifts = r["drift"]
        if "error" in r:
            out_rows.append(
                {
                    "mode": mode,
                    "error": r["error"],
                    "max_drift": max((d["drift"] for d in drifts), default=None),
                    "drift_per_output": drifts,
                }
            )
            continue
        out_rows.append(
            {
                "mode": mode,
                "nfe_forward": r["nfe"],
                "nfe_backward": r["nfe_backward"],
                "max_drift": max((d["drift"] for d in drifts), default=None),
                "max_drift_over_rtol": max((d["drift_over_rtol"] for d in drifts), default=None),
                "warns": any(d["warns"] for d in drifts) if drifts else None,
                "grad_y0_rel_err_vs_fd": rel_err(r["grad_y0"], fd_y0),
                "grad_params_rel_err_vs_fd": rel_err(project(r["grad_params"]), fd_params),
                "grad_rel_diff_vs_backprop": rel_err(
                    torch.cat([r["grad_y0"].reshape(-1), r["grad_params"]]),
                    torch.cat([bp["grad_y0"].reshape(-1), bp["grad_params"]]),
                ),
                "grad_params": project(r["grad_params"]).tolist() if project(r["grad_params"]).numel() <= 4 else None,
                "drift_per_output": drifts,
                "seconds": r["seconds"],
            }
        )
    return {
        "description": description,
        "t": t.tolist(),
        "tolerances": tol,
        "n_params": n_params,
        "params_checked": what,
        "fd_reference": f"central differences, h = {h:g}, of dopri5 solves at rtol = atol = 1e-12",
        "fd_grad_params": fd_params.tolist() if fd_params.numel() <= 4 else None,
        "rows": out_rows,
    }


def event_problem(mu: float, tol: dict) -> dict:
    """t* = first time x crosses zero for van der Pol from (2, 0); d t*/d μ by each mode."""
    f = VdP(mu)
    y0 = torch.tensor([2.0, 0.0], dtype=D)
    t = torch.tensor([0.0, 1.0], dtype=D)  # (the direction of time; the solve runs until the event)

    def event_fn(t, y):
        return y[..., 0]

    rows = []
    for mode in MODES:
        common._DRIFT_WARNED.discard(id(f))
        t0 = time.perf_counter()
        with DriftRecorder() as rec:
            sol = node.solve(f, y0, t, event_fn=event_fn, **solve_kw(mode, tol))
            (g,) = torch.autograd.grad(sol.event_t, f.mu)
        rows.append(
            {
                "mode": mode,
                "event_t": float(sol.event_t.detach()),
                "dt_dmu": float(g),
                "nfe_forward": sol.stats.nfe,
                "nfe_backward": sol.stats.nfe_backward,
                "max_drift": max((d["drift"] for d in rec.records), default=None),
                "max_drift_over_rtol": max((d["drift_over_rtol"] for d in rec.records), default=None),
                "warns": any(d["warns"] for d in rec.records) if rec.records else None,
                "seconds": round(time.perf_counter() - t0, 3),
            }
        )

    def t_star(m):
        with torch.no_grad():
            f.mu.fill_(m)
            try:
                return float(node.solve(f, y0, t, event_fn=event_fn, method="dopri5", **TIGHT).event_t)
            finally:
                f.mu.fill_(mu)

    h = 1e-6
    fd = (t_star(mu + h) - t_star(mu - h)) / (2 * h)
    bp = next(r for r in rows if r["mode"] == "backprop")["dt_dmu"]
    for r in rows:
        r["rel_err_vs_fd"] = abs(r["dt_dmu"] - fd) / abs(fd)
        r["rel_diff_vs_backprop"] = abs(r["dt_dmu"] - bp) / abs(bp)
    return {
        "description": f"van der Pol mu = {mu:g} from (2, 0): the first time t* where x crosses zero "
        "(solve(..., event_fn=lambda t, y: y[..., 0])), and d t*/d mu",
        "tolerances": tol,
        "fd_reference": f"central differences, h = {h:g}, of event times solved by dopri5 at rtol = atol = 1e-12",
        "fd_dt_dmu": fd,
        "rows": rows,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs/data/adjoint_drift.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    start = time.perf_counter()
    tol = dict(rtol=1e-7, atol=1e-7)
    problems = {}

    mlp = MLP()
    g = torch.Generator().manual_seed(1)
    y0 = torch.randn(16, 2, dtype=D, generator=g)
    t = torch.linspace(0.0, 1.0, 5, dtype=D)
    w = torch.randn(5, 16, 2, dtype=D, generator=g)
    n_params = sum(p.numel() for p in mlp.parameters())
    v = torch.randn(n_params, dtype=D, generator=g)
    problems["mlp"] = trajectory_problem(
        "mlp",
        "a seeded tanh MLP field 2 -> 64 -> 2, batch of 16 states, t = 0, 0.25, ..., 1; "
        "L = sum of fixed random weights times the solution at every output time",
        mlp,
        y0,
        t,
        tol,
        lambda ys: (w * ys).sum(),
        direction=v / v.norm(),
    )
    print("mlp done", flush=True)
    w = torch.randn(2, dtype=D, generator=g)
    for mu in (2.0, 8.0):
        for m in (2, 5, 9):
            # the same loss, on y(7.4) only; intermediate output times (weight 0) restart the adjoint's
            # backward re-solve of the state from the forward solution
            y0 = torch.tensor([2.0, 0.0], dtype=D)
            t = torch.linspace(0.0, 7.4, m, dtype=D)
            name = f"vdp_mu{mu:g}_{m}_outputs"
            problems[name] = trajectory_problem(
                name,
                f"van der Pol, mu = {mu:g}, y0 = (2, 0), {m} equally spaced output times on [0, 7.4]; "
                "L = w . y(7.4) (fixed random w); gradients with respect to y0 and mu",
                VdP(mu),
                y0,
                t,
                tol,
                lambda ys: (w * ys[-1]).sum(),
            )
        print(f"{name} done", flush=True)
    problems["vdp_mu8_event"] = event_problem(8.0, tol)
    print("event done", flush=True)

    result = {
        "command": "python benchmarks/adjoint_drift.py"
        + (f" --out {args.out}" if args.out != "docs/data/adjoint_drift.json" else ""),
        "date": datetime.date.today().isoformat(),
        "versions": {"python": platform.python_version(), "neuralode": node.__version__, "torch": torch.__version__},
        "dtype": "float64",
        "method": "dopri5 (forward and backward)",
        "drift": "RMS over components of (y_back - y_fwd) / (|y_fwd| + atol/rtol) at an output time, y_back the "
        "adjoint's re-solved state; the maximum over output times. The library warns (RuntimeWarning) when it "
        f"exceeds {common.DRIFT_WARN[0]:g} and {common.DRIFT_WARN[1]:g} x rtol, or {common.DRIFT_WARN[2]:g}",
        "problems": problems,
    }
    result["total_seconds"] = round(time.perf_counter() - start, 1)
    save_json(result, args.out)
    for name, p in problems.items():
        print(f"\n{name}: {p['description']}")
        for r in p["rows"]:
            if "error" in r:
                print(f"  {r['mode']:<17} {r['error']}")
                continue
            if "dt_dmu" in r:
                extra = f"t* {r['event_t']:.10g}  dt*/dmu {r['dt_dmu']:.6g} (fd {p['fd_dt_dmu']:.6g})"
                err = f"err vs fd {r['rel_err_vs_fd']:.2g}"
            else:
                extra = f"grad y0 err {r['grad_y0_rel_err_vs_fd']:.2g}  params err {r['grad_params_rel_err_vs_fd']:.2g}"
                err = f"vs backprop {r['grad_rel_diff_vs_backprop']:.2g}"
            drift = (
                "" if r["max_drift"] is None else f"drift {r['max_drift']:.2g} ({r['max_drift_over_rtol']:.2g}x rtol)"
            )
            print(
                f"  {r['mode']:<17} nfe {r['nfe_forward']:>5}/{r['nfe_backward']:>6}  {drift:<28} "
                f"warns {r['warns']}  {extra}  {err}"
            )
    print(f"written {args.out} in {result['total_seconds']} s", file=sys.stderr)


if __name__ == "__main__":
    main()
