"""Exact gradients in bounded memory: the checkpoint budget against memory and time, and reversible solvers
on a problem where the adjoint fails.

    python benchmarks/exact_gradients.py [--out docs/data] [--parts budget vdp]

``budget``: one forward + backward of an MLP field (dopri5, ``max_step`` 1e-4 on [0, 1]: 10,000 adaptive
steps) with ``gradient="checkpoint", checkpoints=N`` for several N, beside backprop, one checkpoint per step,
the adjoint and reversible Heun with ``gradient="reversible"``. Peak memory is the peak resident set size of a
fresh subprocess per point, above its footprint before the solve; time is the backward pass's wall clock.

``vdp``: van der Pol at μ = 8 from (2, 0) on [0, 7.4] in float64, the loss a fixed random linear function of
y(7.4); dL/dy0 and dL/dμ by each mode, against backprop through the same method (the exact gradient of the
same discrete solve) and against central differences of dopri5 at rtol = atol = 1e-12 (the exact flow's).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import MLPField, machine, save_json  # noqa: E402

import neuralode  # noqa: E402

STEPS = 10_000
BUDGETS = (4, 8, 16, 32, 64, 128, 256)


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    """This process's peak resident set size (VmHWM: unlike getrusage's ru_maxrss it is not carried over from
    the parent across fork and exec)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # pragma: no cover - not Linux


def budget_point(label: str, dim: int = 16, hidden: int = 64, batch: int = 128) -> dict:
    """One forward + backward (run in a fresh process, so that the peak RSS is this point's)."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    field = MLPField(dim, hidden)
    y0 = torch.randn(batch, dim, requires_grad=True)
    t = torch.tensor([0.0, 1.0])
    kw: dict = dict(method="dopri5", rtol=1e-6, atol=1e-6, options=dict(max_step=1.0 / STEPS), dense=False)
    if label.startswith("checkpoint/"):
        kw.update(gradient="checkpoint", checkpoints=int(label.split("/")[1]))
    elif label == "reversible_heun":
        kw.update(gradient="reversible", method="reversible_heun", options=dict(step_size=1.0 / STEPS))
    else:
        kw.update(gradient=label)
    base = _rss_mib()
    t0 = time.perf_counter()
    sol = neuralode.solve(field, y0, t, **kw)
    t1 = time.perf_counter()
    sol.ys[-1].square().sum().backward()
    t2 = time.perf_counter()
    peak = _peak_rss_mib()
    return {
        "mode": label,
        "steps": sol.stats.n_steps,
        "state_mib": batch * dim * 4 / 2**20,
        "peak_mib": peak - base,
        "forward_s": t1 - t0,
        "backward_s": t2 - t1,
        "nfe": sol.stats.nfe,
        "nfe_backward": sol.stats.nfe_backward,
        "checkpoint_bytes": sol.stats.checkpoint_bytes,
    }


def budget(out: str) -> list[dict]:
    labels = ["backprop", "checkpoint"] + [f"checkpoint/{n}" for n in BUDGETS] + ["adjoint", "reversible_heun"]
    rows = []
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = lambda x, **k: x  # noqa: E731
    for label in tqdm(labels, desc="budget"):
        code = (
            f"import sys, json; sys.path.insert(0, {here!r}); import exact_gradients as e; "
            f"print(json.dumps(e.budget_point({label!r})))"
        )
        res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        row = json.loads(res.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(
            f"{label:<16} steps={row['steps']:<6d} peak={row['peak_mib']:8.1f} MiB  "
            f"backward={row['backward_s']:6.2f} s  nfe_backward={row['nfe_backward']}",
            flush=True,
        )
    _plot_budget(rows, os.path.join(out, "checkpoint_budget.png"))
    return rows


def _plot_budget(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    pts = [r for r in rows if r["mode"].startswith("checkpoint/")]
    ns = [int(r["mode"].split("/")[1]) for r in pts]
    for ax, key, label in ((axes[0], "peak_mib", "peak memory (MiB)"), (axes[1], "backward_s", "backward time (s)")):
        ax.plot(ns, [r[key] for r in pts], "o-", color="C0", label="checkpoint, N states")
        for i, mode in enumerate(("backprop", "checkpoint", "adjoint", "reversible_heun")):
            r = next(r for r in rows if r["mode"] == mode)
            name = "checkpoint, every state" if mode == "checkpoint" else mode
            ax.axhline(r[key], color=f"C{i + 1}", ls="--", label=name)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("checkpoints N")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Forward + backward over {rows[0]['steps']} steps (dopri5, MLP field)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


class VdP(torch.nn.Module):
    def __init__(self, mu: float) -> None:
        super().__init__()
        self.mu = torch.nn.Parameter(torch.tensor(mu, dtype=torch.float64))

    def forward(self, t, y):
        return torch.stack([y[..., 1], self.mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)


def vdp(rtol: float = 1e-7) -> list[dict]:
    """The μ = 8 comparison: each mode's gradient, its error against backprop of the same method and against
    the exact flow's (central differences of tight solves)."""
    D = torch.float64
    t = torch.tensor([0.0, 7.4], dtype=D)
    w = torch.randn(2, dtype=D, generator=torch.Generator().manual_seed(0))

    def loss_of(f, y0, **kw):
        return neuralode.solve(f, y0, t, **kw).ys[-1] @ w

    def grad(mode, method, opts=None, **extra):
        f = VdP(8.0)
        y0 = torch.tensor([2.0, 0.0], dtype=D, requires_grad=True)
        sol = neuralode.solve(
            f, y0, t, method=method, options=opts, rtol=rtol, atol=rtol, gradient=mode, dense=False, **extra
        )
        t0 = time.perf_counter()
        gy, gm = torch.autograd.grad(sol.ys[-1] @ w, [y0, f.mu])
        return torch.cat([gy, gm[None]]), sol.stats, time.perf_counter() - t0

    y0 = torch.tensor([2.0, 0.0], dtype=D)
    fd = []
    with torch.no_grad():
        for i in range(3):
            h = 1e-6
            vals = []
            for s in (1, -1):
                yy, ff = y0.clone(), VdP(8.0)
                if i < 2:
                    yy[i] += s * h
                else:
                    ff.mu += s * h
                vals.append(float(loss_of(ff, yy, rtol=1e-12, atol=1e-12)))
            fd.append((vals[0] - vals[1]) / (2 * h))
    fd = torch.tensor(fd, dtype=D)
    cases = [
        ("dopri5", "backprop", None, {}),
        ("dopri5", "checkpoint", None, {}),
        ("dopri5", "checkpoint", None, {"checkpoints": 8}),
        ("dopri5", "adjoint", None, {}),
        ("reversible_heun", "backprop", None, {}),
        ("reversible_heun", "reversible", None, {}),
        ("reversible_rk", "backprop", None, {}),
        ("reversible_rk", "reversible", None, {}),
        ("reversible_rk", "backprop", {"base": "rk4", "step_size": 1e-3}, {}),
        ("reversible_rk", "reversible", {"base": "rk4", "step_size": 1e-3}, {}),
    ]
    refs, rows = {}, []
    for method, mode, opts, extra in cases:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                g, stats, secs = grad(mode, method, opts, **extra)
            except Exception as e:  # (the solve can fail here: recorded, not hidden)
                rows.append(
                    {
                        "method": method,
                        "options": opts,
                        "mode": mode,
                        **extra,
                        "error": f"{type(e).__name__}: {e}"[:200],
                    }
                )
                print(f"{method:<16} {str(opts or ''):<34} {mode:<12} failed: {type(e).__name__}")
                continue
        warned = sorted({str(w.message).split(":")[0] for w in caught if issubclass(w.category, RuntimeWarning)})
        key = (method, str(opts))
        if mode == "backprop":
            refs[key] = g
        ref = refs[key]
        row = {
            "method": method,
            "options": opts,
            "mode": mode,
            **extra,
            "grad": g.tolist(),
            "rel_err_vs_backprop_same_method": float((g - ref).abs().max() / ref.abs().max()),
            "rel_err_vs_exact_flow": float((g - fd).abs().max() / fd.abs().max()),
            "steps": stats.n_steps,
            "nfe_backward": stats.nfe_backward,
            "kept_bytes": stats.checkpoint_bytes,
            "backward_s": secs,
            "warned": warned,
        }
        rows.append(row)
        print(
            f"{method:<16} {str(opts or ''):<34} {mode:<12} {str(extra or ''):<18} "
            f"vs backprop {row['rel_err_vs_backprop_same_method']:.1e}  "
            f"vs exact flow {row['rel_err_vs_exact_flow']:.1e}  steps {stats.n_steps}  kept {stats.checkpoint_bytes} B",
            flush=True,
        )
    rows.append({"central_differences": fd.tolist(), "rtol": rtol})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/bench")
    ap.add_argument("--parts", nargs="+", default=["budget", "vdp"], choices=["budget", "vdp"])
    args = ap.parse_args()
    torch.set_num_threads(1)
    result: dict = {"machine": machine(), "command": "python benchmarks/exact_gradients.py " + " ".join(sys.argv[1:])}
    if "vdp" in args.parts:
        result["vdp_mu8"] = vdp()
    if "budget" in args.parts:
        result["budget"] = budget(args.out)
    save_json(result, os.path.join(args.out, "exact_gradients.json"))


if __name__ == "__main__":
    main()
