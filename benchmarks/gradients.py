"""Cost of gradients: memory per mode against the number of steps, adjoint time against torchdiffeq, and
the backward evaluations the seminorm saves.

    python benchmarks/gradients.py [--out runs/bench] [--parts memory time seminorm]

Memory is the peak of forward + backward above the process's footprint before the solve: on CUDA from
torch.cuda.max_memory_allocated, on CPU from the peak resident set size of a fresh subprocess per point.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Counted, MLPField, machine, median_time, save_json  # noqa: E402

import neuralode  # noqa: E402

MODES = ("backprop", "checkpoint", "adjoint")


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def memory_point(mode: str, steps: int, dim: int, hidden: int, batch: int, device: str) -> dict:
    """One forward + backward; run in a fresh process (CPU) so that the peak RSS belongs to it."""
    torch.manual_seed(0)
    field = MLPField(dim, hidden).to(device)
    y0 = torch.randn(batch, dim, device=device, requires_grad=True)
    t = torch.tensor([0.0, 1.0], device=device)
    opts = {"step_size": 1.0 / steps}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mib()
    sol = neuralode.solve(field, y0, t, method="rk4", options=opts, gradient=mode, dense=False)
    sol.ys[-1].square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "mode": mode,
        "steps": steps,
        "peak_mib": peak - base,
        "nfe": sol.stats.nfe,
        "nfe_backward": sol.stats.nfe_backward,
    }


def memory(out: str, steps=(10, 100, 1000), dim=64, hidden=2048, batch=16, device="cpu") -> list[dict]:
    rows = []
    for mode in MODES:
        for n in steps:
            if device == "cuda":
                row = memory_point(mode, n, dim, hidden, batch, device)
            else:
                code = (
                    f"import sys, json; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
                    f"import gradients as g; print(json.dumps(g.memory_point({mode!r}, {n}, {dim}, {hidden}, "
                    f"{batch}, 'cpu')))"
                )
                res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                row = json.loads(res.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(
                f"memory  {mode:<10} steps={n:<5d} peak={row['peak_mib']:9.1f} MiB  "
                f"nfe={row['nfe']} nfe_backward={row['nfe_backward']}",
                flush=True,
            )
    by = {(r["mode"], r["steps"]): r["peak_mib"] for r in rows}
    ratio = by[("adjoint", steps[-1])] / max(by[("adjoint", steps[0])], 1e-9)
    print(f"adjoint peak at {steps[-1]} steps / at {steps[0]} steps: {ratio:.2f}")
    _plot_memory(rows, steps, os.path.join(out, "gradients_memory.png"))
    return rows


def _plot_memory(rows, steps, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for mode in MODES:
        ys = [next(r["peak_mib"] for r in rows if r["mode"] == mode and r["steps"] == n) for n in steps]
        ax.plot(steps, ys, "o-", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("solver steps (rk4)")
    ax.set_ylabel("peak memory, forward + backward (MiB)")
    ax.set_title("Gradient memory by mode")
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def adjoint_time(dim=16, hidden=128, batch=64, rtol=1e-6, repeats=5) -> list[dict]:
    """Forward + backward of odeint_adjoint in neuralode and torchdiffeq, same model and tolerances."""
    torch.manual_seed(0)
    field = MLPField(dim, hidden)
    y0 = torch.randn(batch, dim)
    t = torch.linspace(0, 1, 5)
    rows = []
    libs = {"neuralode": neuralode}
    try:
        import torchdiffeq

        libs["torchdiffeq"] = torchdiffeq
    except ImportError:
        print("(torchdiffeq not installed: skipped)")
    for name, lib in libs.items():
        counted = Counted(field)

        def run(lib=lib, f=counted):
            f.zero_grad()
            ys = lib.odeint_adjoint(f, y0, t, rtol=rtol, atol=rtol)
            ys.square().sum().backward()

        counted.n = 0
        run()
        nfe_total = counted.n
        counted.n = 0
        with torch.no_grad():
            lib.odeint(counted, y0, t, rtol=rtol, atol=rtol)
        nfe_fwd = counted.n
        wall = median_time(run, repeats)
        rows.append(
            {"library": name, "wall_ms": wall * 1e3, "nfe_forward": nfe_fwd, "nfe_backward": nfe_total - nfe_fwd}
        )
        print(
            f"adjoint {name:<12} fwd+bwd {wall * 1e3:8.1f} ms  NFE forward {nfe_fwd}  backward {nfe_total - nfe_fwd}",
            flush=True,
        )

    # compile=True: both solves in the compiled loop (NFE from the solver's statistics: a Python counter in
    # func would be traced away)
    def run_compiled():
        field.zero_grad()
        sol = neuralode.solve(field, y0, t, rtol=rtol, atol=rtol, gradient="adjoint", compile=True)
        sol.ys.square().sum().backward()
        return sol.stats

    start = time.perf_counter()
    stats = run_compiled()
    first = time.perf_counter() - start
    wall = median_time(run_compiled, repeats)
    rows.append(
        {
            "library": "neuralode compile=True",
            "wall_ms": wall * 1e3,
            "first_call_s": first,
            "nfe_forward": stats.nfe,
            "nfe_backward": stats.nfe_backward,
        }
    )
    print(
        f"adjoint neuralode compile=True fwd+bwd {wall * 1e3:8.1f} ms  NFE forward {stats.nfe}  backward "
        f"{stats.nfe_backward}  (first call {first:.1f} s)",
        flush=True,
    )
    if len(rows) == 3:
        print(f"adjoint wall time ratio neuralode / torchdiffeq: {rows[0]['wall_ms'] / rows[1]['wall_ms']:.2f}")
        print(f"adjoint wall time ratio neuralode compile=True / torchdiffeq: {wall * 1e3 / rows[1]['wall_ms']:.2f}")
    return rows


def seminorm(dim=32, hidden=256, batch=64, rtol=1e-6) -> list[dict]:
    torch.manual_seed(0)
    field = MLPField(dim, hidden)
    y0 = torch.randn(batch, dim)
    t = torch.tensor([0.0, 1.0])
    rows = []
    for norm in ("default", "seminorm"):
        sol = neuralode.solve(
            field,
            y0,
            t,
            gradient="adjoint",
            rtol=rtol,
            atol=rtol,
            dense=False,
            adjoint_options=None if norm == "default" else {"norm": "seminorm"},
        )
        sol.ys[-1].square().sum().backward()
        rows.append(
            {
                "norm": norm,
                "nfe_backward": sol.stats.nfe_backward,
                "steps_backward": sol.stats.n_steps_backward,
                "rejected_backward": sol.stats.n_rejected_backward,
            }
        )
        print(
            f"seminorm {norm:<9} backward NFE {sol.stats.nfe_backward}  steps {sol.stats.n_steps_backward} "
            f"rejected {sol.stats.n_rejected_backward}",
            flush=True,
        )
    saving = 1 - rows[1]["nfe_backward"] / rows[0]["nfe_backward"]
    print(
        f"seminorm saves {100 * saving:.0f}% of backward evaluations "
        f"({sum(p.numel() for p in field.parameters())} parameters)"
    )
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/bench")
    p.add_argument("--parts", nargs="*", default=["memory", "time", "seminorm"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result: dict = {"machine": machine()}
    if "memory" in args.parts:
        result["memory"] = memory(args.out, device=args.device)
    if "time" in args.parts:
        result["adjoint_time"] = adjoint_time()
    if "seminorm" in args.parts:
        result["seminorm"] = seminorm()
    save_json(result, os.path.join(args.out, "gradients.json"))
    return result


if __name__ == "__main__":
    main()
