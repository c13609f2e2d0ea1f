"""Gradients of a batch whose samples differ in stiffness: joint or per-sample stepping; backprop, adjoint or
checkpoint.

A van der Pol batch (μ from 0.5 to 5, one learnable μ per sample, t in [0, 7], dopri5 at
rtol = atol = 1e-5); the loss is a weighted sum of the states at 20 output times. For each of the six
combinations, the joint adjoint with the seminorm too (and each again with ``compile=True`` but the joint adjoint
with its default norm, whose compiled backward needs an ``nn.Module`` func: this one is a closure over μ), in
one process: forward + backward wall time (median; the first call, which compiles, is timed
apart), function evaluations per sample
(forward and backward; joint stepping evaluates every sample at every step), and the bytes kept between the
forward and the backward pass: the tensors autograd saves (counted by a saved-tensors hook), plus the
checkpoint mode's saved states (``stats.checkpoint_bytes``). That memory grows with the number of steps for
backprop (every stage's graph) and for the checkpoint (one state per step or attempt, a fraction of it), and
stays at the outputs for the adjoint. Gradients of every
combination are checked against joint backprop at the end.

    python benchmarks/per_sample_adjoint.py [--batch 256] [--repeats 3] [--out runs/bench/per_sample_adjoint.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import neuralode
from neuralode.experiments.bench import machine, save_json

COMBOS = [  # (name, per_sample, gradient, compile); "adjoint/seminorm": adjoint_options=dict(norm="seminorm")
    ("joint backprop", False, "backprop", False),
    ("joint adjoint", False, "adjoint", False),
    ("joint adjoint, seminorm", False, "adjoint/seminorm", False),
    ("per-sample backprop", True, "backprop", False),
    ("per-sample adjoint", True, "adjoint", False),
    ("joint checkpoint", False, "checkpoint", False),
    ("per-sample checkpoint", True, "checkpoint", False),
    ("joint backprop, compile", False, "backprop", True),
    ("joint adjoint, seminorm, compile", False, "adjoint/seminorm", True),
    ("joint checkpoint, compile", False, "checkpoint", True),
    ("per-sample backprop, compile", True, "backprop", True),
    ("per-sample adjoint, compile", True, "adjoint", True),
    ("per-sample checkpoint, compile", True, "checkpoint", True),
]


def vdp(mus: torch.Tensor):
    def f(t, y):
        return torch.stack([y[:, 1], mus * (1 - y[:, 0] ** 2) * y[:, 1] - y[:, 0]], 1)

    return f


def one(per_sample: bool, gradient: str, compile: bool, mus, func, y0, t, w, tol: float) -> dict:
    saved = [0]

    def pack(x):
        saved[0] += x.numel() * x.element_size()
        return x

    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        sol = neuralode.solve(
            func,
            y0,
            t,
            rtol=tol,
            atol=tol,
            per_sample=per_sample,
            gradient=gradient.split("/")[0],
            params=(mus,),
            adjoint_options=dict(norm="seminorm") if gradient == "adjoint/seminorm" else None,
            dense=False,
            compile=compile,
        )
    loss = (sol.ys * w).sum()
    (grad,) = torch.autograd.grad(loss, mus)
    wall = time.perf_counter() - start
    B = y0.shape[0]
    fwd = float(sol.sample_stats["nfe"].float().mean()) if per_sample else float(sol.stats.nfe)
    # backward: batched calls of the augmented dynamics (or of backprop's recorded evaluations); per sample
    # that is the same count, as every sample is evaluated in each call
    return {
        "wall_s": wall,
        "nfe_forward_per_sample": fwd,
        "nfe_backward_batched_calls": sol.stats.nfe_backward,
        "kept_MiB": (saved[0] + sol.stats.checkpoint_bytes) / 2**20,
        "grad": grad,
        "batch": B,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="runs/bench/per_sample_adjoint.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    B = args.batch
    mus = torch.linspace(0.5, 5.0, B, dtype=torch.float64)
    y0 = torch.cat([2 * torch.rand(B, 1, generator=g, dtype=torch.float64), torch.zeros(B, 1, dtype=torch.float64)], 1)
    t = torch.linspace(0, 7, 20, dtype=torch.float64)
    w = torch.randn(20, B, 2, generator=g, dtype=torch.float64)
    rows, first = {}, {}
    # one func (and μ) per combination, made once: compiled solvers are cached per func
    funcs = {}
    for name, per_sample, gradient, compile in COMBOS:
        m = mus.clone().requires_grad_(True)
        funcs[name] = (m, vdp(m))
        start = time.perf_counter()  # the first call (compilation where compile=True), not in the timing
        one(per_sample, gradient, compile, *funcs[name], y0, t, w, 1e-5)
        first[name] = time.perf_counter() - start
    for _ in range(args.repeats):  # interleaved rounds
        for name, per_sample, gradient, compile in COMBOS:
            r = one(per_sample, gradient, compile, *funcs[name], y0, t, w, 1e-5)
            rows.setdefault(name, []).append(r)
    ref = rows["joint backprop"][0]["grad"]
    out = []
    print(f"van der Pol, batch {B}, μ in [0.5, 5], dopri5 rtol = atol = 1e-5, float64")
    print(
        f"{'':<32}{'fwd+bwd s':>10}{'first s':>9}{'NFE fwd/sample':>16}{'bwd calls':>11}{'kept MiB':>11}"
        f"{'max rel. Δgrad':>16}"
    )
    for name, *_ in COMBOS:
        rs = rows[name]
        row = {k: v for k, v in rs[0].items() if k != "grad"}
        row["wall_s"] = statistics.median(r["wall_s"] for r in rs)
        row["grad_rel_diff_vs_joint_backprop"] = float((rs[0]["grad"] - ref).abs().max() / ref.abs().max())
        row["name"] = name
        row["first_call_s"] = first[name]
        out.append(row)
        print(
            f"{name:<32}{row['wall_s']:>10.3f}{row['first_call_s']:>9.1f}{row['nfe_forward_per_sample']:>16.0f}"
            f"{row['nfe_backward_batched_calls']:>11d}{row['kept_MiB']:>11.2f}"
            f"{row['grad_rel_diff_vs_joint_backprop']:>16.1e}"
        )
    save_json({"machine": machine(), "rows": out}, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
