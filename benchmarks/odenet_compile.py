"""An ODE-Net training step (the classifier's model: Fashion-MNIST-sized input, batch 128, dopri5 at 1e-3, adjoint
gradients) with ``compile=True`` against the eager solver, in one process. With the adjoint, the forward
solve runs without a graph, so ``compile=True`` runs it in the compiled device loop; the backward (adjoint)
solve runs there too where func is cheap, and eagerly on CPU where one augmented call takes ≥ 3 ms, as this
model's does (see ``gradients.adjoint``). Prints first-step seconds (compilation), median seconds per step,
the ratio, and the share of an eager step spent in convolution kernels (which compiling does not speed up,
apart from Inductor's channels-last layout in the forward solve): that share bounds the possible speed-up.

    python benchmarks/odenet_compile.py [--batch 128] [--steps 6] [--device cpu|cuda]
                                        [--out runs/bench/odenet_compile.json]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from neuralode.experiments.bench import machine, save_json, synchronizer
from neuralode.models.classifier import ODENet


def _steps(model, x, y, n: int) -> tuple[float, list[float]]:
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # the step's cost, not a change of weights
    sync = synchronizer(x.device)
    times = []
    for _ in range(n + 1):
        sync()
        a = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        sync()
        times.append(time.perf_counter() - a)
    return times[0], times[1:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (timings synchronise the device)")
    ap.add_argument("--out", default="runs/bench/odenet_compile.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28).to(args.device)
    y = torch.randint(0, 10, (args.batch,)).to(args.device)
    rows = []
    for mode in (False, True):
        torch.manual_seed(0)
        model = ODENet().to(args.device)
        model.body.compile = mode
        first, times = _steps(model, x, y, args.steps)
        rows.append(
            {
                "compile": mode,
                "first_step_s": first,
                "median_step_s": statistics.median(times),
                "nfe_forward_backward": list(model.nfe()),
            }
        )
    ratio = rows[0]["median_step_s"] / rows[1]["median_step_s"]
    conv_share = _conv_share(x, y)
    for r in rows:
        print(
            f"compile={str(r['compile']):<5} first step {r['first_step_s']:7.2f} s, "
            f"median {r['median_step_s']:.3f} s/step, NFE f/b {r['nfe_forward_backward']}"
        )
    print(f"speed-up of compile=True: {ratio:.2f}×")
    print(f"share of an eager step in convolution kernels (forward and backward): {conv_share:.0%}")
    save_json(
        {"machine": machine(), "batch": args.batch, "rows": rows, "speedup": ratio, "conv_share_eager": conv_share},
        args.out,
    )


def _conv_share(x, y) -> float:
    """Self CPU time of convolution ops (forward and backward) over all ops', in one eager step; on CUDA the
    device time of their kernels over the step's wall time."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = ODENet().to(x.device)
    _steps(model, x, y, 0)
    cuda = x.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        _steps(model, x, y, 0)
    events = prof.key_averages()
    if cuda:  # device time of the convolution ops' kernels against the step's wall time (launch gaps and host
        # work count as not convolution); op-level rows only, as kernel rows would count the same time again
        conv = sum(e.self_device_time_total for e in events if e.key.startswith("aten::") and "conv" in e.key)
        return conv / 1e6 / statistics.median(_steps(model, x, y, 3)[1])
    total = sum(e.self_cpu_time_total for e in events)
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key)
    return conv / total


if __name__ == "__main__":
    main()
