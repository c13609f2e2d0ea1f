"""Every sample of a batch until its own first event: neuralode's per-sample events against the way a user of
torchdiffeq gets them (``odeint_event`` stops a batch at the first event of any sample, so one solve per
sample), in one process.

A van der Pol batch (μ from 0.5 to 5, random starts on the x-axis), each sample until x first
crosses zero, dopri5 at rtol = atol = 1e-6, float64. Times: the event times alone (no graph), and the event
times with their gradient with respect to μ (backprop). The event times of every approach are compared with
neuralode's per sample.

    python benchmarks/per_sample_events.py [--batch 64] [--repeats 3] [--out runs/bench/per_sample_events.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neuralode
from neuralode.experiments.bench import machine, save_json


def vdp(mus: torch.Tensor):
    def f(t, y):
        return torch.stack([y[..., 1], mus * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    return f


def per_sample(mus, y0, tol, grad: bool):
    m = mus.clone().requires_grad_(grad)
    sol = neuralode.solve(
        vdp(m),
        y0,
        torch.tensor([0.0, 1.0], dtype=y0.dtype),
        per_sample=True,
        event_fn=lambda t, y: y[:, 0],
        rtol=tol,
        atol=tol,
        params=(m,),
    )
    if grad:
        return sol.event_t.detach(), torch.autograd.grad(sol.event_t.sum(), m)[0]
    return sol.event_t.detach(), None


def one_by_one(odeint_event, mus, y0, tol, grad: bool):
    times, grads = [], []
    for b in range(y0.shape[0]):
        m = mus[b].clone().requires_grad_(grad)
        t_ev, _ = odeint_event(
            vdp(m), y0[b], torch.tensor(0.0, dtype=y0.dtype), event_fn=lambda t, y: y[0], rtol=tol, atol=tol
        )
        times.append(t_ev.detach().reshape(()))
        if grad:
            grads.append(torch.autograd.grad(t_ev, m)[0])
    return torch.stack(times), (torch.stack(grads) if grad else None)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/per_sample_events.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B, tol = args.batch, 1e-6
    mus = torch.linspace(0.5, 5.0, B, dtype=torch.float64)
    y0 = torch.stack(
        [0.5 + 1.5 * torch.rand(B, generator=g, dtype=torch.float64), torch.zeros(B, dtype=torch.float64)], 1
    )
    approaches = {"neuralode per-sample events": lambda grad: per_sample(mus, y0, tol, grad)}
    approaches["neuralode odeint_event, one solve per sample"] = lambda grad: one_by_one(
        neuralode.odeint_event, mus, y0, tol, grad
    )
    try:
        import torchdiffeq

        approaches["torchdiffeq odeint_event, one solve per sample"] = lambda grad: one_by_one(
            torchdiffeq.odeint_event, mus, y0, tol, grad
        )
    except ImportError:  # pragma: no cover - a benchmark extra
        print("torchdiffeq not installed: its row is left out")
    rows = []
    ref = per_sample(mus, y0, tol, True)
    for name, fn in approaches.items():
        row = {"approach": name}
        for grad in (False, True):
            times = []
            for _ in range(args.repeats):
                a = time.perf_counter()
                t_ev, dmu = fn(grad)
                times.append(time.perf_counter() - a)
            key = "with_grad" if grad else "no_grad"
            row[f"{key}_s"] = statistics.median(times)
            row["max_abs_diff_event_t"] = float((t_ev - ref[0]).abs().max())
            if grad:
                row["max_rel_diff_dt_dmu"] = float(((dmu - ref[1]).abs() / ref[1].abs().clamp(min=1e-12)).max())
        rows.append(row)
    base = rows[0]
    print(f"van der Pol, batch {B}, μ in [0.5, 5], each sample until x = 0, dopri5 rtol = atol = {tol:g}, float64")
    print(f"{'':<48}{'event times':>12}{'+ dt*/dμ':>10}{'vs ours':>9}{'max |Δt*|':>11}")
    for r in rows:
        r["ratio_to_per_sample_with_grad"] = r["with_grad_s"] / base["with_grad_s"]
        print(
            f"{r['approach']:<48}{r['no_grad_s']:>11.3f}s{r['with_grad_s']:>9.3f}s"
            f"{r['ratio_to_per_sample_with_grad']:>8.1f}×{r['max_abs_diff_event_t']:>11.1e}"
        )
    save_json({"machine": machine(), "batch": B, "rows": rows}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
