"""Benchmark helpers and the solver-overhead benchmark (``neuralode bench``; ``benchmarks/overhead.py``).

    overhead = wall time / (NFE × time of one func call)      (1.0 is the limit)

The same MLP problems run through neuralode, torchdiffeq and torchode (when installed) in one process;
dopri5 at rtol = atol = 1e-6, forward only, one thread by default. Timings are the minimum over repeats,
taken in interleaved rounds so that a slow spell of the machine hits every library alike.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from typing import Callable

import torch

from .. import odeint, solve


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


CASES = {  # name: (state dim, hidden, batch, t1, repeats)
    "tiny": (2, 32, 16, 1.0, 200),
    "tiny_long": (2, 32, 16, 10.0, 100),
    "medium": (32, 256, 128, 1.0, 200),
    "large": (256, 1024, 512, 1.0, 10),
}


def synchronizer(device: str | torch.device) -> Callable[[], None]:
    """What a timer must call before reading the clock: waiting for the device's queued kernels (CUDA
    launches return at once), nothing on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def interleaved_min(
    calls: dict[str, Callable[[], object]],
    rounds: int,
    inner: dict[str, int] | None = None,
    sync: Callable[[], None] | None = None,
    each: dict[str, int] | None = None,
    first: dict[str, float] | None = None,
) -> dict[str, float]:
    """Minimum time per call of each callable, timed in alternating rounds (one warm-up call each).
    ``sync`` (see ``synchronizer``) runs before each clock reading. The order rotates from round to round, so
    that no callable always runs right after the same other one. ``inner[k]``: time ``k`` as the mean of that
    many calls in a row; ``each[k]``: make that many calls in a row, each timed on its own (the first of them
    runs right after another callable, with its code and data evicted from the caches by it, the others warm);
    ``first``, if given, receives each callable's minimum over the first timing of each round."""
    inner, each = inner or {}, each or {}
    sync = sync or (lambda: None)
    for fn in calls.values():
        fn()
    best = {k: float("inf") for k in calls}
    items = list(calls.items())
    for r in range(rounds):
        for k, fn in items[r % len(items) :] + items[: r % len(items)]:
            n = inner.get(k, 1)
            for j in range(each.get(k, 1)):
                sync()
                a = time.perf_counter()
                for _ in range(n):
                    fn()
                sync()
                dt = (time.perf_counter() - a) / n
                best[k] = min(best[k], dt)
                if j == 0 and first is not None:
                    first[k] = min(first.get(k, float("inf")), dt)
    return best


def run_case(
    name: str,
    dim: int,
    hidden: int,
    batch: int,
    t1: float,
    repeats: int,
    rtol: float,
    libs: list[str],
    compile: bool = False,
    device: str = "cpu",
    back_to_back: int = 3,
) -> list[dict]:
    torch.manual_seed(0)
    field = MLPField(dim, hidden).to(device)
    y0 = torch.randn(batch, dim).to(device)
    t = torch.tensor([0.0, t1], device=device)
    makers: dict[str, Callable] = {
        "neuralode": lambda f: lambda: odeint(f, y0, t, rtol=rtol, atol=rtol, method="dopri5"),
    }
    if "torchdiffeq" in libs:
        import torchdiffeq

        makers["torchdiffeq"] = lambda f: lambda: torchdiffeq.odeint(f, y0, t, rtol=rtol, atol=rtol, method="dopri5")
    if "torchode" in libs:

        def torchode_call(f):
            solver = torchode_solver(f, rtol, rtol)
            return lambda: solver(y0, t)

        makers["torchode"] = torchode_call
    first_call: dict[str, float] = {}  # seconds of one warm-up call, to choose how many to time in a row
    with torch.no_grad():
        nfe = {}
        for lib, make in makers.items():
            counted = Counted(field)
            make(counted)()
            nfe[lib] = counted.n
            first_call[lib] = best_time(make(field), 2)
        calls = {"func": lambda: field(t[0], y0)}
        calls.update({lib: make(field) for lib, make in makers.items()})
        first = {}
        if compile:  # the fused loop; NFE from the solver's statistics (a counter inside it is traced)
            lib = "neuralode compile=True"
            a = time.perf_counter()
            nfe[lib] = solve(field, y0, t, rtol=rtol, atol=rtol, method="dopri5", compile=True, dense=False).stats.nfe
            first[lib] = time.perf_counter() - a
            calls[lib] = lambda: solve(field, y0, t, rtol=rtol, atol=rtol, method="dopri5", compile=True, dense=False)
            makers[lib] = None
            first_call[lib] = best_time(calls[lib], 2)  # (the second solve compiles the starting step)
        # each library: ``back_to_back`` calls in a row, each timed, so that its minimum is a warm call, as
        # func's time is (the mean of 10 in a row). A single call right after another library's Python-heavy
        # solve finds its code and data evicted from the caches: on this CPU a compiled tiny solve then takes
        # up to 3x its warm time, and a ratio to a warm func would mix the two. Slow calls (the large case,
        # where caches do not matter) once per round.
        reps = {lib: back_to_back if first_call.get(lib, 0.0) < 0.02 else 1 for lib in makers}
        cold: dict[str, float] = {}
        best = interleaved_min(calls, repeats, inner={"func": 10}, each=reps, sync=synchronizer(device), first=cold)
    rows = []
    for lib in makers:
        rows.append(
            {
                "case": name,
                "library": lib,
                "wall_ms": best[lib] * 1e3,
                "nfe": nfe[lib],
                "func_us": best["func"] * 1e6,
                "overhead": best[lib] / (nfe[lib] * best["func"]),
                # the first of each round's calls in a row: right after another library's solve (cold caches)
                "overhead_first_in_row": cold[lib] / (nfe[lib] * best["func"]),
                **({"first_call_s": first[lib]} if lib in first else {}),
            }
        )
    base = {r["library"]: r for r in rows}
    for r in rows:
        if "torchdiffeq" in base:
            r["wall_vs_torchdiffeq"] = r["wall_ms"] / base["torchdiffeq"]["wall_ms"]
    return rows


def plot_overhead(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover
        return
    cases = list(dict.fromkeys(r["case"] for r in rows))
    libs = list(dict.fromkeys(r["library"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.8 / len(libs)
    for j, lib in enumerate(libs):
        vals = [next((r["overhead"] for r in rows if r["case"] == c and r["library"] == lib), 0) for c in cases]
        ax.bar([i + j * width for i in range(len(cases))], vals, width, label=lib)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_xticks([i + width * (len(libs) - 1) / 2 for i in range(len(cases))], cases)
    ax.set_ylabel("wall / (NFE × func time)")
    ax.set_title("Solver overhead, dopri5 (1.0 = only func)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rtol", type=float, default=1e-6)
    p.add_argument("--cases", nargs="*", default=list(CASES))
    p.add_argument("--libs", nargs="*", default=["neuralode", "torchdiffeq", "torchode"])
    p.add_argument("--compile", action="store_true", help="add neuralode with compile=True (compiles per case)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    p.add_argument(
        "--back-to-back",
        type=int,
        default=3,
        help="per round, call each library this many times in a row, each timed (the minimum is then a warm "
        "call, as func's time is); 1 = one call per round, right after another library's (cold caches)",
    )
    p.add_argument("--out", default="runs/bench/overhead.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    libs = [lib for lib in args.libs if lib == "neuralode" or _importable(lib)]
    rows = []
    for name in args.cases:
        rows += run_case(
            name,
            *CASES[name],
            rtol=args.rtol,
            libs=libs,
            compile=args.compile,
            device=args.device,
            back_to_back=args.back_to_back,
        )
    print(
        f"{'case':<10} {'library':<22} {'wall ms':>9} {'NFE':>5} {'func µs':>8} {'overhead':>9} {'vs tdq':>7} "
        f"{'overhead, 1st in row':>21}"
    )
    for r in rows:
        print(
            f"{r['case']:<10} {r['library']:<22} {r['wall_ms']:9.2f} {r['nfe']:5d} {r['func_us']:8.1f} "
            f"{r['overhead']:9.2f} {r.get('wall_vs_torchdiffeq', float('nan')):7.2f} "
            f"{r['overhead_first_in_row']:21.2f}"
        )
    result = {"machine": machine(), "rtol": args.rtol, "back_to_back": args.back_to_back, "rows": rows}
    save_json(result, args.out)
    plot_overhead(rows, os.path.splitext(args.out)[0] + ".png")
    print(f"wrote {args.out} and its .png")
    return result


def _importable(name: str) -> bool:
    try:
        __import__(name)
        return True
    except ImportError:
        print(f"({name} not installed: skipped)")
        return False
