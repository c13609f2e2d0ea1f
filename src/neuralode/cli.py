"""The ``neuralode`` command: one subcommand per experiment, plus ``bench``."""

from __future__ import annotations

import argparse
import json
import sys


def _demo(args: argparse.Namespace) -> int:
    from .experiments.spiral import train

    metrics = train(
        iters=args.iters,
        method=args.method,
        gradient=args.gradient,
        out_dir=args.out,
        seed=args.seed,
        show_progress=not args.no_progress,
    )
    summary = {k: v for k, v in metrics.items() if k != "history"}
    last = metrics["history"][-1]
    summary.update(nfe_forward=last["nfe_forward"], nfe_backward=last["nfe_backward"])
    print(json.dumps(summary, indent=2))
    print(f"metrics and plots in {args.out}/ (metrics.json, metrics.csv, loss.png, trajectory.png)")
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

    d = sub.add_parser("demo", help="learn the cubic spiral's dynamics from one trajectory (no download)")
    d.add_argument("--iters", type=int, default=300, help="training iterations (2000 for the full demo)")
    d.add_argument("--method", default="dopri5")
    d.add_argument("--gradient", default="backprop", choices=["backprop", "adjoint", "checkpoint"])
    d.add_argument("--out", default="runs/demo", help="run folder for metrics and plots")
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--no-progress", action="store_true", help="no progress bar")
    d.set_defaults(fn=_demo)

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
