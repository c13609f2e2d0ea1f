"""Print the README's Table 1 from training runs and the clean step benchmark.

python benchmarks/table1.py --runs runs/fmnist --bench runs/bench/classifier_step.json
"""

from __future__ import annotations

import argparse
import json
import os


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", default="runs/fmnist")
    ap.add_argument("--bench", default="runs/bench/classifier_step.json")
    args = ap.parse_args(argv)
    bench = {}
    if os.path.exists(args.bench):
        bench = {r["model"]: r for r in json.load(open(args.bench))["rows"]}
    print(
        "| model | test error | parameters | peak memory of a training step (MiB) | of the block alone (MiB) | "
        "s/epoch (run) | s/epoch (quiet, benchmark) | NFE forward / backward per batch |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in ("odenet", "resnet", "rknet", "deq"):
        path = os.path.join(args.runs, name, "metrics.json")
        ckpt = os.path.join(args.runs, name, "checkpoint.pt")
        if os.path.exists(path):
            m = json.load(open(path))
        elif os.path.exists(ckpt):  # a run still going: the epochs it has finished
            from neuralode.experiments._io import load_checkpoint

            state = load_checkpoint(ckpt, map_location="cpu", keys=("history",))
            h = state["history"]
            m = {
                "history": h,
                "test_error": h[-1]["test_error"],
                "peak_memory_mib": h[-1]["peak_memory_mib"],
                "seconds_per_epoch": sum(r["seconds"] for r in h) / len(h),
                "parameters": sum(v.numel() for k, v in state["model"].items() if "running" not in k),
            }
            name = f"{name} ({len(h)} of {state['config']['epochs']} epochs)"
        else:
            continue
        b = bench.get(name, {})
        h = m["history"]
        nfe = f"{h[-1]['nfe_forward']:.1f} / {h[-1]['nfe_backward']:.1f}" if h[-1]["nfe_forward"] else "—"
        mem = f"{b['peak_memory_mib']:.1f}" if b else f"{m['peak_memory_mib']:.1f}"
        block = f"{b['block_peak_mib']:.1f}" if b else "—"
        quiet = f"{b['seconds_per_epoch']:.0f}" if b else "—"
        print(
            f"| {name} | {100 * m['test_error']:.2f}% | {m['parameters'] / 1e6:.3f}M | {mem} | {block} | "
            f"{m['seconds_per_epoch']:.0f} | {quiet} | {nfe} |"
        )
    for name, b in bench.items():
        if "-" in name:
            print(
                f"| {name} (not trained: memory only) | | {b['parameters'] / 1e6:.3f}M | {b['peak_memory_mib']:.1f} | "
                f"{b['block_peak_mib']:.1f} | | {b['seconds_per_epoch']:.0f} | |"
            )
    sweep = os.path.join(args.runs, "odenet", "sweep.json")
    if os.path.exists(sweep):
        rows = json.load(open(sweep))["rows"]
        print()
        print("| rtol = atol at test time | " + " | ".join(f"{r['tolerance']:.0e}" for r in rows) + " |")
        print("|---|" + "---|" * len(rows))
        print("| NFE per batch | " + " | ".join(f"{r['nfe_forward']:.0f}" for r in rows) + " |")
        print("| test-set seconds | " + " | ".join(f"{r['seconds']:.1f}" for r in rows) + " |")
        print("| test error | " + " | ".join(f"{100 * r['test_error']:.2f}%" for r in rows) + " |")


if __name__ == "__main__":
    main()
