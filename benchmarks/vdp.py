"""The torchode paper's loop benchmark: van der Pol, batch 256, t ∈ [0, 7], 200 output points, dopri5 at
rtol = atol = 1e-5, one thread, in one process: neuralode (joint and per-sample stepping, eager and
compile=True), torchdiffeq (joint), torchode (per-sample) and, where JAX and diffrax are installed
(``pip install diffrax``), diffrax (joint and per-sample, jit-compiled). Two batches: μ = 2 for every sample (as the
paper), and μ drawn from 0.5 … 5 (samples that differ in stiffness). Prints library × case × (first-call
seconds, steady ms, NFE, ratio to torchdiffeq); writes JSON and a PNG bar chart. Steady ms is the minimum
over ``--rounds`` interleaved rounds (three solves in a row per library per round, each timed): on a noisy
machine five rounds left a compiled solve's minimum 1.5-2 ms above its twenty-round one.

    python benchmarks/vdp.py [--rounds 20] [--device cpu|cuda] [--out runs/bench/vdp.json]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

import neuralode as node
from neuralode.experiments._io import pyplot
from neuralode.experiments.bench import interleaved_min, machine, save_json, synchronizer


def _case(
    case: str, mu: torch.Tensor, y0: torch.Tensor, t: torch.Tensor, batch: int, rounds: int, rtol: float, atol: float
) -> list[dict]:
    rows = []

    def f(tt, y, mu=mu):
        return torch.stack([y[..., 1], mu * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    counts: dict[str, int] = {}

    def ours(per_sample: bool):
        def run():
            with torch.no_grad():
                sol = node.solve(f, y0, t, rtol=rtol, atol=atol, dense=False, per_sample=per_sample)
            counts["neuralode per-sample" if per_sample else "neuralode joint"] = (
                int(sol.sample_stats["nfe"].sum()) if per_sample else sol.stats.nfe * batch
            )

        return run

    def ours_compiled(per_sample: bool):
        def run():
            with torch.no_grad():
                sol = node.solve(f, y0, t, rtol=rtol, atol=atol, compile=True, per_sample=per_sample)
            if per_sample:
                counts["neuralode per-sample compile=True"] = int(sol.sample_stats["nfe"].sum())
            else:
                counts["neuralode joint compile=True"] = sol.stats.nfe * batch

        return run

    calls = {
        "neuralode joint": ours(False),
        "neuralode joint compile=True": ours_compiled(False),
        "neuralode per-sample": ours(True),
        "neuralode per-sample compile=True": ours_compiled(True),
    }
    try:
        import torchdiffeq

        def tdq():
            n = [0]

            def fc(tt, y):
                n[0] += 1
                return f(tt, y)

            with torch.no_grad():
                torchdiffeq.odeint(fc, y0, t, rtol=rtol, atol=atol, method="dopri5")
            counts["torchdiffeq joint"] = n[0] * batch

        calls["torchdiffeq joint"] = tdq
    except ImportError:
        pass
    try:
        import torchode as to

        term = to.ODETerm(lambda tt, y: f(tt, y))
        solver = to.AutoDiffAdjoint(to.Dopri5(term=term), to.IntegralController(atol=atol, rtol=rtol, term=term))

        def tode():
            with torch.no_grad():
                sol = solver.solve(to.InitialValueProblem(y0=y0, t_eval=t[None].expand(batch, -1)))
            counts["torchode per-sample"] = int(sol.stats["n_f_evals"].sum())

        calls["torchode per-sample"] = tode
    except ImportError:
        pass
    calls.update(_diffrax_calls(mu, y0, t, rtol, atol, counts))
    first = {}
    sync = synchronizer(y0.device)
    for name, fn in calls.items():
        sync()
        a = time.perf_counter()
        fn()
        sync()
        first[name] = time.perf_counter() - a
    # per round three calls of each library in a row, each timed: the minimum is a warm solve for every one
    # (a solve right after another library's finds its code and data evicted from the caches)
    best = interleaved_min(calls, rounds, sync=sync, each={name: 3 for name in calls})
    ref = best.get("torchdiffeq joint")
    for name in calls:
        rows.append(
            {
                "case": case,
                "library": name,
                "first_call_s": first[name],
                "ms": 1000 * best[name],
                "nfe_total": counts.get(name),
                "ratio_to_torchdiffeq": best[name] / ref if ref else None,
            }
        )
    return rows


def _diffrax_calls(mu, y0, t, rtol: float, atol: float, counts: dict) -> dict:
    """diffrax (JAX, jit-compiled), where installed: the joint solve of the batch (one RMS error norm over all
    samples, as torchdiffeq) and the per-sample one (``jax.vmap`` of a single-sample solve), Dopri5 with
    diffrax's PID controller at the same tolerances, Hairer's starting step (``dt0=None``), saving at the
    same times, in float32. Its NFE is counted from its steps: 6 evaluations per attempted Dopri5 step (FSAL)
    and 2 for the starting step, summed over the samples. Returns no calls where JAX or diffrax is missing."""
    try:
        import diffrax
        import jax
        import jax.numpy as jnp
    except ImportError:
        return {}

    def vf(tt, y, m):
        return jnp.stack([y[..., 1], m * (1 - y[..., 0] ** 2) * y[..., 1] - y[..., 0]], -1)

    ts = jnp.asarray(t.cpu().numpy())
    t0, t1 = float(t[0]), float(t[-1])

    def one_solve(y, m):
        sol = diffrax.diffeqsolve(
            diffrax.ODETerm(vf),
            diffrax.Dopri5(),
            t0=t0,
            t1=t1,
            dt0=None,
            y0=y,
            args=m,
            saveat=diffrax.SaveAt(ts=ts),
            stepsize_controller=diffrax.PIDController(rtol=rtol, atol=atol),
            max_steps=100_000,
        )
        return sol.ys, sol.stats["num_steps"]

    joint = jax.jit(one_solve)
    per_sample = jax.jit(jax.vmap(one_solve))
    yj, mj = jnp.asarray(y0.cpu().numpy()), jnp.asarray(mu.cpu().numpy())
    platform = jax.devices()[0].platform
    batch = y0.shape[0]

    def run_joint():
        ys, steps = jax.block_until_ready(joint(yj, mj))
        counts[f"diffrax joint (JAX {platform})"] = batch * (6 * int(steps) + 2)

    def run_per_sample():
        ys, steps = jax.block_until_ready(per_sample(yj, mj))
        counts[f"diffrax per-sample (JAX {platform})"] = int(6 * steps.sum() + 2 * batch)

    return {f"diffrax joint (JAX {platform})": run_joint, f"diffrax per-sample (JAX {platform})": run_per_sample}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    ap.add_argument("--out", default="runs/bench/vdp.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.threads == 1 and "XLA_FLAGS" not in os.environ:  # diffrax's JAX on one thread too (read at import)
        os.environ["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    rtol = atol = 1e-5
    dev = torch.device(args.device)
    t = torch.linspace(0, 7, 200, device=dev)
    g = torch.Generator().manual_seed(0)  # (drawn on CPU: the same problems on every device)
    cases = {
        "mu=2": torch.full((args.batch,), 2.0).to(dev),
        "mu~U(0.5,5)": (0.5 + 4.5 * torch.rand(args.batch, generator=g)).to(dev),
    }
    y0 = torch.randn(args.batch, 2, generator=g).to(dev)
    rows = []
    for case, mu in cases.items():
        rows += _case(case, mu, y0, t, args.batch, args.rounds, rtol, atol)
    print(
        f"van der Pol, batch {args.batch}, 200 outputs on [0, 7], dopri5 rtol=atol=1e-5, {args.threads} thread(s), "
        f"{args.device}"
    )
    print(f"{'case':<13} {'library':<34} {'first s':>8} {'ms':>9} {'NFE (sum)':>10} {'÷ torchdiffeq':>13}")
    for r in rows:
        ratio = f"{r['ratio_to_torchdiffeq']:.2f}" if r["ratio_to_torchdiffeq"] else "—"
        print(
            f"{r['case']:<13} {r['library']:<34} {r['first_call_s']:>8.3f} {r['ms']:>9.1f} "
            f"{r['nfe_total'] or 0:>10} {ratio:>13}"
        )
    save_json({"machine": machine(), "rows": rows}, args.out)
    plt = pyplot()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 4))
        libs = sorted({r["library"] for r in rows})
        for j, case in enumerate(cases):
            vals = [next((r["ms"] for r in rows if r["case"] == case and r["library"] == lib), 0) for lib in libs]
            ax.bar([i + 0.4 * j for i in range(len(libs))], vals, width=0.4, label=case)
        ax.set_xticks([i + 0.2 for i in range(len(libs))], libs, rotation=15)
        ax.set_ylabel("ms per solve")
        ax.legend()
        ax.set_title("van der Pol, batch 256, dopri5 1e-5")
        fig.tight_layout()
        fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=110)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
