"""``method="auto"`` against dopri5 and rodas4 on van der Pol oscillators from non-stiff to very stiff.

    python benchmarks/auto_switching.py [--out docs/data/auto_switching.json] [--rounds 3] [--plot-only]

For each μ in 1, 10, 100, 1000: a batch of 16 oscillators (x0 from 0.5 to 2.0, v0 = 0), solved together over
two periods (T = max(20, 2 (3 − 2 ln 2) μ), the relaxation period for large μ), 50 output times, rtol = atol =
1e-6, float64, one thread. Then one batch mixing μ = 1 … 1000 (16 values, log-spaced) on [0, 1000], solved
together and with per-sample stepping (dopri5 and auto). Each method's wall time is the minimum over
interleaved rounds (one round for the mixed batch); a method that fails (too many steps: the default
max_num_steps of 100,000 attempts) is run once and marked failed. Reported: evaluations of f (NFE), accepted
and rejected steps, time, the largest deviation from scipy's Radau at rtol 1e-10 (one oscillator per batch),
and auto's NFE and time relative to the better of dopri5 and rodas4.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(__file__))
from common import machine, save_json  # noqa: E402

import neuralode  # noqa: E402

METHODS = ("dopri5", "rodas4", "auto")
MUS = (1.0, 10.0, 100.0, 1000.0)


class VdP(torch.nn.Module):
    def __init__(self, mu: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("mu", mu)

    def forward(self, t, y):
        x, v = y[..., 0], y[..., 1]
        return torch.stack([v, self.mu * (1 - x * x) * v - x], -1)


def horizon(mu: float) -> float:
    return max(20.0, 2 * (3 - 2 * math.log(2)) * mu)


def reference(mu: float, x0: float, t) -> torch.Tensor:
    from scipy.integrate import solve_ivp

    def f(_, y):
        return [y[1], mu * (1 - y[0] ** 2) * y[1] - y[0]]

    def jac(_, y):
        return [[0.0, 1.0], [-2 * mu * y[0] * y[1] - 1, mu * (1 - y[0] ** 2)]]

    sol = solve_ivp(f, (0, float(t[-1])), [x0, 0.0], method="Radau", t_eval=t.numpy(), rtol=1e-10, atol=1e-10, jac=jac)
    return torch.as_tensor(sol.y.T)


#: (label, method, per_sample) of each row
JOINT = (("dopri5", "dopri5", False), ("rodas4", "rodas4", False), ("auto", "auto", False))
MIXED = JOINT + (("dopri5 per-sample", "dopri5", True), ("auto per-sample", "auto", True))


def case(name: str, mu: torch.Tensor, T: float, rounds: int, ref_index: int, configs) -> dict:
    B = mu.shape[0]
    y0 = torch.stack([torch.linspace(0.5, 2.0, B, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)], -1)
    t = torch.linspace(0, T, 50, dtype=torch.float64)
    f = VdP(mu.view(B))
    ref = reference(float(mu[ref_index]), float(y0[ref_index, 0]), t)
    out: dict = {label: {"times": []} for label, _, _ in configs}
    for _ in range(rounds):
        for label, m, per_sample in configs:
            rec = out[label]
            if rec.get("failed"):
                continue
            start = time.perf_counter()
            with torch.no_grad():
                sol = neuralode.solve(
                    f, y0, t, method=m, rtol=1e-6, atol=1e-6, on_failure="return", per_sample=per_sample
                )
            rec["times"].append(time.perf_counter() - start)
            rec.update(nfe=sol.stats.nfe, n_steps=sol.stats.n_steps, n_rejected=sol.stats.n_rejected)
            if sol.status != neuralode.Status.SUCCESS:
                rec.update(failed=True, message=sol.message[:160])
                continue
            rec["max_error"] = float((sol.ys[:, ref_index] - ref).abs().max())
            if m == "auto":
                phases = sol.sample_stats["methods"] if per_sample else sol.stats.methods
                rec["switches"] = sum(len(p) - 1 for p in phases) if per_sample else len(phases) - 1
            if per_sample:  # (each sample's own evaluations: the batch evaluates f once per attempt)
                rec["nfe_per_sample_max"] = int(sol.sample_stats["nfe"].max())
    for label, _, _ in configs:
        out[label]["time_s"] = min(out[label].pop("times"))
    row = {"case": name, "T": T, **out}
    ok = [out[m] for m in ("dopri5", "rodas4") if not out[m].get("failed")]
    auto = out["auto"]
    if ok and not auto.get("failed"):
        row["auto_nfe_ratio"] = auto["nfe"] / min(r["nfe"] for r in ok)
        row["auto_time_ratio"] = auto["time_s"] / min(r["time_s"] for r in ok)
    return row


def _table(rows: list, labels: list) -> None:
    print(f"{'case':<18}" + "".join(f"{lb + ' NFE':>20}{lb + ' ms':>18}" for lb in labels))
    for r in rows:
        cells = "".join(
            f"{'failed':>20}{'':>18}" if r[lb].get("failed") else f"{r[lb]['nfe']:>20}{r[lb]['time_s'] * 1e3:>18.1f}"
            for lb in labels
        )
        print(f"{r['case']:<18}{cells}")


def plot(result: dict, path: str) -> None:
    """Evaluations and time per μ for each method (failed runs drawn as missing bars), log scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["rows"] if r["case"].startswith("mu=")]
    labels = [r["case"][3:] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.27
    for ax, key, title in ((axes[0], "nfe", "evaluations of f"), (axes[1], "time_s", "seconds")):
        for i, (label, _, _) in enumerate(JOINT):
            vals = [math.nan if r[label].get("failed") else r[label][key] for r in rows]
            ax.bar([x + (i - 1) * width for x in range(len(rows))], vals, width, label=label)
        ax.set_yscale("log")
        for x, r in enumerate(rows):
            for i, (label, _, _) in enumerate(JOINT):
                if r[label].get("failed"):
                    ax.annotate(
                        f"{label} failed",
                        (x + (i - 1) * width, 0.03),
                        xycoords=("data", "axes fraction"),
                        rotation=90,
                        ha="center",
                        va="bottom",
                        fontsize=8,
                    )
        ax.set_xticks(range(len(rows)), [f"μ = {lb}" for lb in labels])
        ax.set_title(title)
    axes[0].legend()
    fig.suptitle("van der Pol, batch of 16, rtol = atol = 1e-6")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="docs/data/auto_switching.json")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--plot-only", action="store_true", help="redraw the figure from --out's JSON")
    args = p.parse_args(argv)
    png = os.path.splitext(args.out)[0] + ".png"
    if args.plot_only:
        with open(args.out) as fh:
            plot(json.load(fh), png)
        return
    torch.set_num_threads(1)
    rows = []
    cases = [(f"mu={mu:g}", torch.full((16,), mu, dtype=torch.float64), horizon(mu), 15, JOINT) for mu in MUS]
    # one batch of 16 oscillators with μ log-spaced from 1 to 1000, over [0, 1000] (the stiffest sample's first
    # relaxation jump is at t ≈ 807)
    cases.append(("mixed mu=1..1000", torch.logspace(0, 3, 16, dtype=torch.float64), 1000.0, 15, MIXED))
    for name, mu, T, ref_index, configs in tqdm(cases, desc="cases"):
        # (the mixed batch's solves take a minute each: one round)
        rows.append(case(name, mu, T, args.rounds if configs is JOINT else 1, ref_index, configs))
    _table(rows[:-1], [c[0] for c in JOINT])
    for r in rows[:-1]:
        print(
            f"{r['case']}: auto / best of dopri5 and rodas4: NFE {r.get('auto_nfe_ratio', math.nan):.2f}, time "
            f"{r.get('auto_time_ratio', math.nan):.2f}"
        )
    _table(rows[-1:], [c[0] for c in MIXED])
    save_json(
        {
            "benchmark": "auto_switching",
            "date": time.strftime("%Y-%m-%d"),
            "command": "python benchmarks/auto_switching.py",
            "machine": machine(),
            "settings": {"rtol": 1e-6, "atol": 1e-6, "batch": 16, "outputs": 50, "rounds": args.rounds},
            "rows": rows,
        },
        args.out,
    )
    with open(args.out) as fh:
        plot(json.load(fh), png)


if __name__ == "__main__":
    main()
