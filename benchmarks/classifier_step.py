"""Training-step cost of the Table 1 classifiers on 28×28 inputs, measured in one quiet process.

For each model: parameters, seconds per training step (median of ``--steps`` after ``--warmup``), the
seconds an epoch of 60,000 images would take at that rate, forward/backward NFE, and peak memory of a step.
This is the clean timing for the README table (the training runs' own epoch times are wall clock, which
other work on the machine inflates).

    python benchmarks/classifier_step.py [--batch 128] [--steps 10] [--out runs/bench/classifier_step.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time

import torch
import torch.nn.functional as F

from neuralode import _methods
from neuralode.experiments._io import load_checkpoint
from neuralode.experiments.classify import _cpu_peak, peak_step_memory
from neuralode.models.classifier import build_classifier, count_parameters


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", nargs="+", default=["odenet", "resnet", "resnet-12", "rknet", "deq"])
    ap.add_argument(
        "--checkpoint-dir",
        default=None,
        help="folder with <model>/checkpoint.pt from training runs: time the trained weights",
    )
    ap.add_argument("--out", default="runs/bench/classifier_step.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28)
    y = torch.randint(0, 10, (args.batch,))
    rows = []
    print(f"{'model':>8} {'params':>9} {'s/step':>8} {'s/epoch':>8} {'NFE f/b':>9} {'peak MiB':>9} {'block MiB':>9}")
    for name in args.models:
        kind, _, blocks = name.partition("-")  # "resnet-12": a deeper ResNet, to show memory growing with depth
        model = build_classifier(kind, **({"blocks": int(blocks)} if blocks else {}))
        ckpt = os.path.join(args.checkpoint_dir or "", kind, "checkpoint.pt")
        if args.checkpoint_dir and os.path.exists(ckpt) and not blocks:
            model.load_state_dict(load_checkpoint(ckpt, keys=("model",))["model"])
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step's cost, not a change of weights
        times = []
        for i in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            if i >= args.warmup:
                times.append(time.perf_counter() - t0)
        nfe = model.nfe() if hasattr(model, "nfe") else (0, 0)
        step = statistics.median(times)
        peak = peak_step_memory(model, x, y)
        # the block alone: forward + backward through body and head from the (detached) stem output
        h = model.stem(x).detach().requires_grad_(True)
        _methods._STEPPERS.clear()
        block = _cpu_peak(lambda model=model, h=h: F.cross_entropy(model.head(model.body(h)), y).backward())
        row = {
            "model": name,
            "parameters": count_parameters(model),
            "seconds_per_step": step,
            "seconds_per_epoch": step * math.ceil(60000 / args.batch),
            "nfe_forward": nfe[0],
            "nfe_backward": nfe[1],
            "peak_memory_mib": peak,
            "block_peak_mib": block,
        }
        rows.append(row)
        print(
            f"{name:>8} {row['parameters']:>9,} {step:>8.3f} {row['seconds_per_epoch']:>8.0f} "
            f"{nfe[0]:>4}/{nfe[1]:<4} {peak:>9.1f} {block:>9.1f}"
        )
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as fh:
        json.dump({"batch": args.batch, "threads": torch.get_num_threads(), "rows": rows}, fh, indent=2)
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
