"""Solver overhead: the same MLP problems through neuralode, torchdiffeq and torchode in one process.

    overhead = wall time / (NFE × time of one func call)      (1.0 is the limit)

dopri5 at rtol = atol = 1e-6, forward only (no graph), one thread unless --threads says otherwise.

    python benchmarks/overhead.py [--threads 1] [--out runs/bench/overhead.json]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from common import Counted, MLPField, best_time, machine, save_json, torchode_solver  # noqa: E402

import neuralode  # noqa: E402

CASES = {  # name: (state dim, hidden, batch, t1, repeats)
    "tiny": (2, 32, 16, 1.0, 200),
    "tiny_long": (2, 32, 16, 10.0, 60),
    "medium": (32, 256, 128, 1.0, 60),
    "large": (256, 1024, 512, 1.0, 10),
}


def run_case(name: str, dim: int, hidden: int, batch: int, t1: float, repeats: int, rtol: float, libs: list[str]):
    torch.manual_seed(0)
    field = MLPField(dim, hidden)
    y0 = torch.randn(batch, dim)
    t = torch.tensor([0.0, t1])
    rows = []
    with torch.no_grad():
        t_func = best_time(lambda: field(t[0], y0), repeats=max(200, repeats * 10), min_seconds=0.3)
        solvers = {
            "neuralode": lambda f: (lambda: neuralode.odeint(f, y0, t, rtol=rtol, atol=rtol, method="dopri5")),
        }
        if "torchdiffeq" in libs:
            import torchdiffeq
            solvers["torchdiffeq"] = lambda f: (lambda: torchdiffeq.odeint(f, y0, t, rtol=rtol, atol=rtol,
                                                                            method="dopri5"))
        if "torchode" in libs:
            solvers["torchode"] = lambda f: (lambda s=torchode_solver(f, rtol, rtol): s(y0, t))
        for lib, make in solvers.items():
            counted = Counted(field)
            make(counted)()
            nfe = counted.n
            wall = best_time(make(field), repeats)
            rows.append({"case": name, "library": lib, "wall_ms": wall * 1e3, "nfe": nfe,
                         "func_us": t_func * 1e6, "overhead": wall / (nfe * t_func)})
    base = {r["library"]: r for r in rows}
    for r in rows:
        if "torchdiffeq" in base:
            r["wall_vs_torchdiffeq"] = r["wall_ms"] / base["torchdiffeq"]["wall_ms"]
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--libs", nargs="*", default=["neuralode", "torchdiffeq", "torchode"])
    p.add_argument("--out", default="runs/bench/overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    libs = [lib for lib in args.libs if lib == "neuralode" or _importable(lib)]
    rows = []
    for name in args.cases:
        rows += run_case(name, *CASES[name], rtol=args.rtol, libs=libs)
    print(f"{'case':<10} {'library':<12} {'wall ms':>9} {'NFE':>5} {'func µs':>8} {'overhead':>9} {'vs tdq':>7}")
    for r in rows:
        print(f"{r['case']:<10} {r['library']:<12} {r['wall_ms']:9.2f} {r['nfe']:5d} {r['func_us']:8.1f} "
              f"{r['overhead']:9.2f} {r.get('wall_vs_torchdiffeq', float('nan')):7.2f}")
    result = {"machine": machine(), "rtol": args.rtol, "rows": rows}
    save_json(result, args.out)
    return result


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        print(f"({name} not installed: skipped)")
        return False


if __name__ == "__main__":
    main()
