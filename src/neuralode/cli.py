"""The ``neuralode`` command: one subcommand per experiment, plus ``bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _dynamics(args: argparse.Namespace) -> int:
    from .experiments.dynamics import train

    metrics = train(
        system=args.system,
        hybrid=args.hybrid,
        iters=args.iters,
        data_size=args.data_size,
        trajectories=args.trajectories,
        noise=args.noise,
        irregular=args.irregular,
        batch_time=args.batch_time,
        batch_size=args.batch_size,
        method=args.method,
        gradient=args.gradient,
        seed=args.seed,
        out_dir=args.out,
        show_progress=not args.no_progress,
    )
    summary = {k: v for k, v in metrics.items() if k != "history"}
    last = metrics["history"][-1]
    summary.update(nfe_forward=last["nfe_forward"], nfe_backward=last["nfe_backward"])
    print(json.dumps(summary, indent=2))
    print(f"metrics and plots in {args.out}/ (metrics.json, metrics.csv, loss.png, trajectories.png, phase.png)")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from .experiments.bench import main as bench_main

    argv = ["--threads", str(args.threads), "--out", args.out]
    if args.cases:
        argv += ["--cases", *args.cases]
    bench_main(argv)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="neuralode", description="Neural ODEs in PyTorch: experiments and benchmarks.")
    sub = p.add_subparsers(dest="command", required=True)

    def dynamics_args(d: argparse.ArgumentParser, iters: int, out: str, system: str = "spiral") -> None:
        d.add_argument("--system", default=system, choices=["spiral", "pendulum", "falling", "lotka_volterra"])
        d.add_argument("--hybrid", action="store_true", help="f = f_known(y; physical parameters) + NN(y)")
        d.add_argument("--iters", type=int, default=iters)
        d.add_argument("--data-size", type=int, default=1000, help="observations per trajectory")
        d.add_argument("--trajectories", type=int, default=1, help="observed trajectories (different y0)")
        d.add_argument("--noise", type=float, default=0.0, help="std of Gaussian observation noise")
        d.add_argument("--irregular", action="store_true", help="observe at random times")
        d.add_argument("--batch-time", type=int, default=10, help="window length (observations)")
        d.add_argument("--batch-size", type=int, default=20, help="windows per iteration")
        d.add_argument("--method", default="dopri5")
        d.add_argument("--gradient", default="backprop", choices=["backprop", "adjoint", "checkpoint"])
        d.add_argument("--out", default=out, help="run folder for metrics and plots")
        d.add_argument("--seed", type=int, default=0)
        d.add_argument("--no-progress", action="store_true", help="no progress bar")
        d.set_defaults(fn=_dynamics)

    dynamics_args(
        sub.add_parser("demo", help="short run: learn the cubic spiral from one trajectory (no download)"),
        iters=300,
        out="runs/demo",
    )
    dynamics_args(
        sub.add_parser("dynamics", help="learn a built-in system's dynamics, optionally with physics"),
        iters=2000,
        out="runs/dynamics",
    )

    b = sub.add_parser("bench", help="solver overhead against torchdiffeq and torchode (those installed)")
    b.add_argument("--threads", type=int, default=1)
    b.add_argument("--cases", nargs="*", help="tiny tiny_long medium large (default: all)")
    b.add_argument("--out", default="runs/bench/overhead.json")
    b.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
