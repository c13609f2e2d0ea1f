"""The ``neuralode`` command: one subcommand per experiment, plus ``bench``."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Callable

# ------------------------------------------------------------------------------------------------ argument types
# Each flag is checked by the parser, so that a bad value stops the command with one line naming the flag
# before any data is loaded or any training starts.


def _int_at_least(low: int, high: int | None = None) -> Callable[[str], int]:
    expected = f"an integer >= {low}" if high is None else f"an integer from {low} to {high}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


def _float_in(low: float, high: float = math.inf, *, low_open: bool = False) -> Callable[[str], float]:
    if high == math.inf:
        expected = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        expected = f"a number in {'(' if low_open else '['}{low:g}, {high:g}]"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not math.isfinite(value) or value < low or (low_open and value == low) or value > high:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    parse.__name__ = expected
    return parse


positive_int = _int_at_least(1)
nonnegative_int = _int_at_least(0)
seed_int = _int_at_least(0, 2**32 - 1)  # the range every generator involved (torch, NumPy) accepts
positive_float = _float_in(0.0, low_open=True)
nonnegative_float = _float_in(0.0)
fraction = _float_in(0.0, 1.0)


def group_norm_channels(text: str) -> int:
    """Channels of the classifiers, which normalise in min(32, channels) groups."""
    value = positive_int(text)
    if value > 32 and value % 32:
        raise argparse.ArgumentTypeError(
            f"expected at most 32 or a multiple of 32 (GroupNorm uses min(32, channels) groups), got {text!r}"
        )
    return value


def solver_method(text: str) -> str:
    from . import METHODS

    if text not in METHODS:
        raise argparse.ArgumentTypeError(f"unknown method {text!r}; choose one of {', '.join(METHODS)}")
    return text


def _available_devices() -> list[str]:
    import torch

    names = ["cpu"]
    if torch.cuda.is_available():
        names += ["cuda"] + [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        names.append("mps")
    return names


def device_name(text: str) -> str:
    """A device this machine has: cpu, cuda or cuda:N when CUDA is available, mps on Apple silicon."""
    import torch

    available = _available_devices()
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        dev = None
    ok = dev is not None and (
        dev.type == "cpu"
        or (dev.type in ("cuda", "mps") and (dev.type if dev.index is None else f"{dev.type}:{dev.index}") in available)
    )
    if not ok:
        raise argparse.ArgumentTypeError(f"device {text!r} is not available here; available: {', '.join(available)}")
    return text


def _writable_folder(path: str, text: str) -> None:
    """Raise ArgumentTypeError unless ``path`` is, or can be made as, a folder this process can write in."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):  # the folder that makedirs would create the rest under
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {existing!r} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no write permission in {existing!r}")


def out_folder(text: str) -> str:
    """A run folder: checked before training so that a run does not end unable to write its results."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    _writable_folder(text, text)
    return text


def out_file(text: str) -> str:
    if not text or text.endswith(("/", os.sep)) or os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"expected a file path (such as runs/bench/overhead.json), got {text!r}")
    _writable_folder(os.path.dirname(os.path.abspath(text)), text)
    return text


BENCH_CASES = ("tiny", "tiny_long", "medium", "large")  # the keys of experiments.bench.CASES
LATENT_WINDOW = 100  # observed times per sequence in the latent experiment: the first half of 200


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

    argv = ["--threads", str(args.threads), "--out", args.out, "--device", args.device]
    argv += ["--back-to-back", str(args.back_to_back)]
    if args.cases:
        argv += ["--cases", *args.cases]
    if args.compile:
        argv.append("--compile")
    bench_main(argv)
    return 0


def _classify(args: argparse.Namespace) -> int:
    import os

    from .experiments.classify import ClassifyConfig, tolerance_sweep, train

    cfg = ClassifyConfig(
        model=args.model,
        dataset=args.dataset,
        data_dir=args.data_dir,
        epochs=args.epochs,
        batch_size=args.batch_size,
        test_batch_size=args.test_batch_size,
        lr=args.lr,
        channels=args.channels,
        method=args.method,
        rtol=args.tol,
        atol=args.tol,
        gradient=args.gradient,
        rk_steps=args.rk_steps,
        deq_solver=args.deq_solver,
        deq_tol=args.deq_tol,
        deq_max_iter=args.deq_max_iter,
        jac_reg=args.jac_reg,
        kinetic=args.kinetic,
        jac_fro=args.jac_fro,
        limit_train=args.limit_train,
        limit_test=args.limit_test,
        seed=args.seed,
        device=args.device,
        out_dir=args.out,
    )
    metrics = train(cfg, resume=args.resume, show_progress=not args.no_progress)
    rank = int(os.environ.get("RANK", "0"))
    if rank == 0:
        summary = {k: v for k, v in metrics.items() if k not in ("history", "config")}
        print(json.dumps(summary, indent=2))
        print(
            f"metrics, checkpoint and plots in {args.out}/ (metrics.json, metrics.csv, checkpoint.pt, nfe.png, "
            "error.png)"
        )
        if args.sweep:
            tolerance_sweep(args.out, args.tolerances, show_progress=not args.no_progress)
            print(f"tolerance sweep in {args.out}/ (sweep.json, sweep.csv, sweep.png)")
    return 0


def _flow(args: argparse.Namespace) -> int:
    from .experiments.flow import match_density, match_table, nll_reference, train_flow

    reg = {k: v for k, v in (("kinetic", args.kinetic), ("jacobian", args.jac_fro)) if v}
    train_args = dict(  # maximum likelihood: one run, or the default against a longer reference
        regularization=reg or None,
        lr_schedule=args.lr_schedule,
        batch_size=args.batch_size,
        hidden=args.hidden,
        layers=args.layers,
        trace=args.trace,
        lr=args.lr,
        tol=args.tol,
        gradient=args.gradient,
        n_test=args.n_test,
        eval_every=args.eval_every,
        seed=args.seed,
        out_dir=args.out,
        show_progress=not args.no_progress,
    )
    if args.nll_reference:
        nll_reference(iters=args.iters, factor=args.factor, **train_args)
        print(f"table in {args.out}/table.md, curves in {args.out}/curves.png")
        return 0
    if args.match_table:
        match_table(
            iters=args.iters,
            hidden=args.hidden,
            layers=args.layers,
            out_dir=args.out,
            seed=args.seed,
            show_progress=not args.no_progress,
        )
        print(f"table in {args.out}/table.md")
        return 0
    if args.target:
        m = match_density(
            target=args.target,
            model=args.model,
            iters=args.iters,
            batch_size=args.batch_size,
            hidden=args.hidden,
            layers=args.layers,
            K=args.K,
            width=args.width,
            lr=args.lr,
            lr_schedule=args.lr_schedule,
            anneal=args.anneal,
            tol=args.tol,
            seed=args.seed,
            out_dir=args.out,
            show_progress=not args.no_progress,
        )
        print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
        print(f"metrics and plot in {args.out}/ (metrics.json, metrics.csv, match.png)")
        return 0
    m = train_flow(data=args.data, iters=args.iters, **train_args)
    print(json.dumps({k: v for k, v in m.items() if k != "history"}, indent=2))
    print(f"metrics and plots in {args.out}/ (metrics.json, metrics.csv, density.png, transport.png)")
    return 0


def _augmented(args: argparse.Namespace) -> int:
    from .experiments.augmented import compare

    res = compare(iters=args.iters, out_dir=args.out, seed=args.seed, show_progress=not args.no_progress)
    for r in res["runs"]:
        print(
            f"{r['model']:<10} test loss {r['test_loss']:.4f}  accuracy {r['test_accuracy']:.3f}  "
            f"NFE forward {r['nfe_forward_last10pct']:.1f}  backward {r['nfe_backward_last10pct']:.1f}"
        )
    print(f"results in {args.out}/ (metrics.json, metrics.csv, training.png, features.png)")
    return 0


def _latent(args: argparse.Namespace) -> int:
    from .experiments.latent import table

    table(
        ns=tuple(args.n),
        iters=args.iters,
        out_dir=args.out,
        encoder=args.encoder,
        n_spirals=args.n_spirals,
        seed=args.seed,
        show_progress=not args.no_progress,
        n_val=args.n_val,
        rnn_hidden=tuple(args.rnn_hidden),
        rnn_lr=tuple(args.rnn_lr),
        rnn_feedback=tuple(args.rnn_feedback),
    )
    print(f"results in {args.out}/ (results.json, results.csv, table.md, PNG plots)")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (exit status 2): the flag, what it expects, and where the help is."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _check_dynamics(args: argparse.Namespace) -> str | None:
    if args.batch_time >= args.data_size:
        return (
            f"argument --batch-time: windows of {args.batch_time} observations need --data-size above "
            f"{args.batch_time}, got {args.data_size}"
        )
    if args.hybrid and args.system == "spiral":
        return "argument --hybrid: needs a system with physical parameters (--system pendulum, falling, lotka_volterra)"
    return None


def _check_classify(args: argparse.Namespace) -> str | None:
    if args.sweep and args.model != "odenet":
        return f"argument --sweep: the tolerance sweep needs --model odenet, not {args.model}"
    return None


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="neuralode", description="Neural ODEs in PyTorch: experiments and benchmarks.")
    p.add_argument("--version", action="version", version=f"neuralode {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def dynamics_args(d: argparse.ArgumentParser, iters: int, out: str, system: str = "spiral") -> None:
        d.add_argument("--system", default=system, choices=["spiral", "pendulum", "falling", "lotka_volterra"])
        d.add_argument("--hybrid", action="store_true", help="f = f_known(y; physical parameters) + NN(y)")
        d.add_argument("--iters", type=positive_int, default=iters)
        d.add_argument("--data-size", type=positive_int, default=1000, help="observations per trajectory")
        d.add_argument("--trajectories", type=positive_int, default=1, help="observed trajectories (different y0)")
        d.add_argument("--noise", type=nonnegative_float, default=0.0, help="std of Gaussian observation noise")
        d.add_argument("--irregular", action="store_true", help="observe at random times")
        d.add_argument(
            "--batch-time", type=_int_at_least(2), default=10, help="window length (observations, below --data-size)"
        )
        d.add_argument("--batch-size", type=positive_int, default=20, help="windows per iteration")
        d.add_argument("--method", type=solver_method, default="dopri5")
        d.add_argument("--gradient", default="backprop", choices=["backprop", "adjoint", "checkpoint"])
        d.add_argument("--out", type=out_folder, default=out, help="run folder for metrics and plots")
        d.add_argument("--seed", type=seed_int, default=0)
        d.add_argument("--no-progress", action="store_true", help="no progress bar")
        d.set_defaults(fn=_dynamics, check=_check_dynamics, subparser=d)

    dynamics_args(
        sub.add_parser("demo", help="short run: learn the cubic spiral from one trajectory (no download)"),
        iters=1000,
        out="runs/demo",
    )
    dynamics_args(
        sub.add_parser("dynamics", help="learn a built-in system's dynamics, optionally with physics"),
        iters=2000,
        out="runs/dynamics",
    )

    c = sub.add_parser(
        "classify",
        help="image classification: ODE-Net, ResNet, RK-Net (Table 1) or DEQ; --sweep: test-time tolerances",
    )
    c.add_argument("--model", default="odenet", choices=["odenet", "resnet", "rknet", "deq"])
    c.add_argument(
        "--dataset",
        default="digits",
        choices=["digits", "fashion-mnist", "mnist"],
        help="digits: scikit-learn's 8x8 digits (built in); fashion-mnist: IDX files, by default from "
        "/usr/share/datasets/fashion-mnist; mnist: IDX files in --data-dir",
    )
    c.add_argument("--data-dir", default=None, help="folder with the four IDX files (raw or .gz)")
    c.add_argument("--epochs", type=positive_int, default=5)
    c.add_argument("--batch-size", type=positive_int, default=128)
    c.add_argument("--test-batch-size", type=positive_int, default=1000)
    c.add_argument("--lr", type=positive_float, default=1e-3, help="Adam learning rate (cosine decay to 0)")
    c.add_argument(
        "--channels", type=group_norm_channels, default=64, help="feature channels (at most 32, or a multiple of 32)"
    )
    c.add_argument("--method", type=solver_method, default="dopri5", help="ODE-Net solver")
    c.add_argument("--tol", type=positive_float, default=1e-3, help="ODE-Net rtol = atol during training")
    c.add_argument("--gradient", default="adjoint", choices=["adjoint", "backprop", "checkpoint"])
    c.add_argument("--rk-steps", type=positive_int, default=2, help="RK-Net: rk4 steps on [0, 1]")
    c.add_argument(
        "--kinetic", type=nonnegative_float, default=0.0, help="ODE-Net: weight of the kinetic-energy regulariser"
    )
    c.add_argument(
        "--jac-fro",
        type=nonnegative_float,
        default=0.0,
        help="ODE-Net: weight of the Jacobian Frobenius regulariser (Hutchinson)",
    )
    c.add_argument("--deq-solver", default="anderson", choices=["anderson", "broyden"])
    c.add_argument("--deq-tol", type=positive_float, default=1e-3, help="DEQ: relative residual of the fixed point")
    c.add_argument("--deq-max-iter", type=positive_int, default=30)
    c.add_argument("--jac-reg", type=nonnegative_float, default=0.0, help="DEQ: weight of the Jacobian regulariser")
    c.add_argument("--limit-train", type=positive_int, default=None, help="use the first N training images")
    c.add_argument("--limit-test", type=positive_int, default=None, help="use the first N test images")
    c.add_argument(
        "--device", type=device_name, default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)"
    )
    c.add_argument("--out", type=out_folder, default="runs/classify", help="run folder (metrics, checkpoint, plots)")
    c.add_argument("--resume", action="store_true", help="continue from the run folder's checkpoint")
    c.add_argument("--sweep", action="store_true", help="then evaluate the ODE-Net at --tolerances")
    c.add_argument("--tolerances", type=positive_float, nargs="+", default=[1e-1, 1e-2, 1e-3, 1e-4, 1e-5, 1e-6])
    c.add_argument("--seed", type=seed_int, default=0)
    c.add_argument("--no-progress", action="store_true")
    c.set_defaults(fn=_classify, check=_check_classify, subparser=c)

    f = sub.add_parser("flow", help="continuous normalizing flow on a built-in 2-D distribution (max. likelihood)")
    f.add_argument(
        "--data",
        default="moons",
        choices=["8gaussians", "checkerboard", "2spirals", "moons", "pinwheel", "rings", "circles", "swissroll"],
    )
    f.add_argument(
        "--target",
        default=None,
        choices=["U1", "U2", "U3", "U4"],
        help="density matching: fit an unnormalised target by the reverse KL instead of data",
    )
    f.add_argument(
        "--model",
        default="cnf",
        choices=["cnf", "planar_cnf", "planar"],
        help="with --target: the flow (MLP CNF, the paper's planar CNF of --width units, planar flow of --K layers)",
    )
    f.add_argument(
        "--match-table",
        action="store_true",
        help="density matching on U1–U4: MLP CNF (--hidden, --layers), planar CNF and planar flow at equal "
        "parameter count",
    )
    f.add_argument(
        "--nll-reference",
        action="store_true",
        help="held-out NLL on circles, moons, 8gaussians: --iters against a --factor times longer reference run",
    )
    # a factor of 1 would make the reference run the default run itself
    f.add_argument(
        "--factor", type=_int_at_least(2), default=2, help="with --nll-reference: reference length / --iters"
    )
    f.add_argument("--K", type=positive_int, default=16, help="with --model planar: number of planar layers")
    f.add_argument("--width", type=positive_int, default=16, help="with --model planar_cnf: number of planar units")
    f.add_argument(
        "--anneal", type=fraction, default=0.5, help="with --target: fraction of --iters over which β rises to 1"
    )
    f.add_argument("--iters", type=positive_int, default=2000)
    f.add_argument("--batch-size", type=positive_int, default=512)
    f.add_argument("--hidden", type=positive_int, default=64)
    f.add_argument("--layers", type=positive_int, default=3)
    f.add_argument("--trace", default="hutchinson", choices=["hutchinson", "exact"], help="during training")
    f.add_argument("--lr", type=positive_float, default=5e-3)
    f.add_argument(
        "--lr-schedule", default="cosine", choices=["cosine", "constant"], help="cosine: decay to 0 over --iters"
    )
    f.add_argument("--tol", type=positive_float, default=1e-5, help="rtol = atol")
    f.add_argument("--gradient", default="adjoint", choices=["adjoint", "backprop", "checkpoint"])
    f.add_argument("--kinetic", type=nonnegative_float, default=0.0, help="weight of ∫‖f‖² dt (Finlay et al. 2020)")
    f.add_argument(
        "--jac-fro", type=nonnegative_float, default=0.0, help="weight of ∫‖∂f/∂z‖_F² dt (Finlay et al. 2020)"
    )
    f.add_argument("--n-test", type=positive_int, default=5000, help="held-out samples (NLL with the exact trace)")
    f.add_argument("--eval-every", type=positive_int, default=100, help="iterations between held-out evaluations")
    f.add_argument("--seed", type=seed_int, default=0)
    f.add_argument("--out", type=out_folder, default="runs/flow")
    f.add_argument("--no-progress", action="store_true")
    f.set_defaults(fn=_flow)

    au = sub.add_parser("augmented", help="plain vs augmented neural ODE on concentric circles (Dupont et al.)")
    au.add_argument("--iters", type=positive_int, default=400)
    au.add_argument("--seed", type=seed_int, default=0)
    au.add_argument("--out", type=out_folder, default="runs/augmented")
    au.add_argument("--no-progress", action="store_true")
    au.set_defaults(fn=_augmented)

    la = sub.add_parser("latent", help="latent ODE vs RNN on irregularly sampled spirals (Table 2 of the paper)")
    la.add_argument(
        "--n",
        type=_int_at_least(1, LATENT_WINDOW),
        nargs="+",
        default=[30, 50, 100],
        help=f"observed points per sequence (of {LATENT_WINDOW} times)",
    )
    la.add_argument("--iters", type=positive_int, default=5000)
    la.add_argument("--encoder", default="odernn", choices=["gru", "odernn"], help="recognition network")
    # the experiment holds out test and validation spirals (at least one each) and trains on the rest
    la.add_argument("--n-spirals", type=_int_at_least(3), default=1000)
    la.add_argument(
        "--n-val",
        type=positive_int,
        default=None,
        help="validation spirals that choose the RNN's settings (default: half the test set)",
    )
    la.add_argument(
        "--rnn-hidden", type=positive_int, nargs="+", default=[25, 64], help="RNN hidden sizes tried on validation data"
    )
    la.add_argument(
        "--rnn-lr",
        type=positive_float,
        nargs="+",
        default=[3e-3, 1e-2, 3e-2],
        help="RNN learning rates tried on validation data",
    )
    la.add_argument(
        "--rnn-feedback",
        type=nonnegative_float,
        nargs="+",
        default=[0.0, 0.5, 1.0, 2.0],
        help="RNN extrapolation feedback gaps tried on validation data, in multiples of the mean gap between "
        "training observations (0: feed back at every query time)",
    )
    la.add_argument("--seed", type=seed_int, default=0)
    la.add_argument("--out", type=out_folder, default="runs/latent")
    la.add_argument("--no-progress", action="store_true")
    la.set_defaults(fn=_latent)

    b = sub.add_parser("bench", help="solver overhead against torchdiffeq and torchode (those installed)")
    b.add_argument("--threads", type=positive_int, default=1)
    b.add_argument("--cases", nargs="*", choices=BENCH_CASES, help="tiny tiny_long medium large (default: all)")
    b.add_argument("--compile", action="store_true", help="also time neuralode with compile=True")
    b.add_argument("--device", type=device_name, default="cpu", help="cpu or cuda")
    b.add_argument(
        "--back-to-back",
        type=positive_int,
        default=3,
        help="per round, time this many calls of each solver in a row",
    )
    b.add_argument(
        "--out", type=out_file, default="runs/bench/overhead.json", help="JSON file (a PNG is written beside)"
    )
    b.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    check = getattr(args, "check", None)
    problem = check(args) if check is not None else None
    if problem:
        args.subparser.error(problem)  # exits with status 2, as the parser's own checks do
    try:
        return args.fn(args)
    except (OSError, ValueError) as exc:  # bad input, unusable checkpoint, unwritable output: one line
        print(f"neuralode {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
