"""Memory of an equilibrium layer's training step against the number of solver iterations.

The DEQ's implicit gradient keeps one application of f, whatever the iteration count; backprop through the
unrolled iterations keeps every one. The ODE-Net's adjoint behaves the same way in the number of steps.
Prints peak MiB above the resting process (PyTorch profiler's allocator events) and writes JSON.

    python benchmarks/implicit_memory.py [--batch 64] [--out runs/bench/implicit_memory.json]
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from neuralode.experiments.classify import _cpu_peak
from neuralode.models.deq import DEQBlock, DEQConvCell


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--channels", type=int, default=64)
    ap.add_argument("--iterations", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--out", default="runs/bench/implicit_memory.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cell = DEQConvCell(args.channels)
    x = torch.randn(args.batch, args.channels, 7, 7)
    rows = []
    print(f"{'iterations':>10} {'implicit MiB':>13} {'unrolled MiB':>13} {'ratio':>7}")
    for k in args.iterations:
        block = DEQBlock(cell, tol=1e-30, max_iter=k, on_failure="ignore")
        implicit = _cpu_peak(lambda block=block: block(x).square().mean().backward())

        def unrolled(k=k):
            z = torch.zeros_like(x)
            for _ in range(k):
                z = cell(z, x)
            z.square().mean().backward()

        unrolled_mib = _cpu_peak(unrolled)
        rows.append({"iterations": k, "implicit_mib": implicit, "unrolled_mib": unrolled_mib})
        print(f"{k:>10} {implicit:>13.1f} {unrolled_mib:>13.1f} {unrolled_mib / implicit:>7.1f}")
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"batch": args.batch, "channels": args.channels, "rows": rows}, fh, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
