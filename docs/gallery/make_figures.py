"""Make the examples gallery's figures: run each script under examples/ once and plot what it learned.

    OMP_NUM_THREADS=1 python docs/gallery/make_figures.py            # all five, a few minutes on one core
    OMP_NUM_THREADS=1 python docs/gallery/make_figures.py cnf        # one of them

Each example is run through its own ``main(argv)`` with the settings in ``RUNS`` (its defaults, except where
noted there), writing its outputs to a temporary folder. ``ode_demo.py --viz`` draws its own figure, which is
copied as it is. The other scripts write only their training log (``log.json``); for those this script draws
the figure from that log and from the script's own classes (the trained modules are picked up as the script
creates them). The PNGs land next to this file and are committed, so the documentation build does not train
anything.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from neuralode import odeint  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
EXAMPLES = os.path.join(HERE, os.pardir, os.pardir, "examples")
DPI = 90

# the command-line arguments of each run (besides --out); the gallery pages quote them
RUNS = {
    "ode_demo": ["--viz"],
    "bouncing_ball": [],
    "learn_physics": [],
    "latent_ode": [],
    "cnf": [],
}


def load(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def capture(mod, class_name):
    """Replace ``mod.class_name`` by a subclass that records its instances (so that we get the trained module)."""
    base = getattr(mod, class_name)
    made = []

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    setattr(mod, class_name, Recorded)
    return made


def save(fig, name):
    path = os.path.join(HERE, f"{name}.png")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def ode_demo(mod, out):
    mod.main(RUNS["ode_demo"] + ["--out", out])
    path = os.path.join(HERE, "ode_demo.png")
    shutil.copyfile(os.path.join(out, "phase.png"), path)
    return path


def bouncing_ball(mod, out):
    log = mod.main(RUNS["bouncing_ball"] + ["--out", out])
    n = int(mod.parser.get_default("bounces"))
    target = mod.analytic_bounce_times(10.0, 0.8, n)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    for label, h, e, style in [
        ("initial guess", 5.0, 0.6, "C1--"),
        ("learned", log[-1]["height"], log[-1]["restitution"], "C0-"),
    ]:
        ball = mod.BouncingBall(h, e)
        with torch.no_grad():
            state = (torch.tensor([h], dtype=torch.float64), torch.zeros(1, dtype=torch.float64))
            times = ball.bounce_times(n)
            start = 0.0
            for k, t_hit in enumerate(times.tolist()):
                ts = torch.linspace(start, t_hit, 60, dtype=torch.float64)
                pos, vel = odeint(ball, state, ts, rtol=1e-9, atol=1e-10)
                ax.plot(ts, pos[:, 0], style, label=label if k == 0 else None)
                state = (pos[-1] * 0 + 1e-9, -e * vel[-1])
                start = t_hit
    for k, t in enumerate(target):
        ax.axvline(t, color="0.6", lw=0.8, ls=":", label="target bounce times" if k == 0 else None)
    ax.set_xlabel("t (s)")
    ax.set_ylabel("height (m)")
    ax.set_title("Bounces located by odeint_event")
    ax.legend(fontsize=8, loc="upper right")
    its = [r["iter"] for r in log]
    ax2.semilogy(its, [r["loss"] for r in log])
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("squared error of the bounce times")
    ax2.set_title(f"height {log[-1]['height']:.2f} m (true 10), restitution {log[-1]['restitution']:.2f} (true 0.8)")
    ax2.title.set_fontsize(9)
    fig.tight_layout()
    return save(fig, "bouncing_ball")


def learn_physics(mod, out):
    log = mod.main(RUNS["learn_physics"] + ["--out", out])
    its = [r["iter"] for r in log]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    last = log[-1]
    ax.semilogy(
        its, [r["g_rel_err"] for r in log], "C0", label=f"g/L: {last['g_over_L']:.2f} (true {mod.TRUE_G_OVER_L})"
    )
    ax.semilogy(its, [r["mu_rel_err"] for r in log], "C1", label=f"μ: {last['mu']:.3f} (true {mod.TRUE_MU})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative error")
    ax.legend(fontsize=8)
    ax.set_title("Physical parameters of the hybrid model")
    ax2.semilogy(its, [r["loss"] for r in log])
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("training loss")
    ax2.set_title("Mean squared error (+ penalty on the network)")
    fig.tight_layout()
    return save(fig, "learn_physics")


def latent_ode(mod, out):
    encoders = capture(mod, "Encoder")
    funcs = capture(mod, "LatentODEFunc")
    param_lists = []
    adam = torch.optim.Adam

    class RecordingAdam(adam):
        def __init__(self, params, *args, **kwargs):
            params = list(params)
            param_lists.append(params)
            super().__init__(params, *args, **kwargs)

    torch.optim.Adam = RecordingAdam
    try:
        log = mod.main(RUNS["latent_ode"] + ["--out", out])
    finally:
        torch.optim.Adam = adam
    args = mod.parser.parse_args(RUNS["latent_ode"])
    enc, func = encoders[-1], funcs[-1]
    weight, bias = param_lists[-1][-2:]  # the decoder, a Linear, is the last module in the optimizer's list
    torch.manual_seed(0)
    t, data = mod.make_spirals(args.nspiral, args.nsample, args.noise)  # the script's data (same seed)
    g = torch.Generator().manual_seed(1)
    idx = torch.sort(torch.randperm(args.nsample // 2, generator=g)[: args.nobs]).values
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    with torch.no_grad():
        for ax, i in zip(axes[:2], (0, 1)):
            x = data[i : i + 1, idx]
            mean, _ = enc(x, t[idx][None])
            ts = t[idx[0] :]
            zs = odeint(func, mean, ts - ts[0], rtol=1e-5, atol=1e-6)[:, 0]
            xs = zs @ weight.T + bias
            n_obs_span = int(idx[-1] - idx[0]) + 1
            ax.plot(data[i, :, 0], data[i, :, 1], ".", color="0.8", ms=3, label="noisy spiral")
            ax.plot(x[0, :, 0], x[0, :, 1], "ko", ms=3, label="observed")
            ax.plot(xs[:n_obs_span, 0], xs[:n_obs_span, 1], "C0-", label="reconstruction")
            ax.plot(xs[n_obs_span - 1 :, 0], xs[n_obs_span - 1 :, 1], "C3-", label="extrapolation")
            ax.set_aspect("equal")
            ax.set_title(f"spiral {i} ({'clockwise' if i % 2 == 0 else 'counter-clockwise'})")
            ax.legend(fontsize=7, loc="lower left")
    axes[2].plot([r["iter"] for r in log], [r["neg_elbo"] for r in log], lw=0.8)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration")
    axes[2].set_title("negative ELBO")
    fig.tight_layout()
    return save(fig, "latent_ode")


def cnf(mod, out):
    fields = capture(mod, "CNFField")
    log = mod.main(RUNS["cnf"] + ["--out", out])
    field = fields[-1]
    torch.manual_seed(1)
    data = mod.circles(2000)
    lim = 3.0
    n = 80
    xs = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = mod.log_prob(field, grid, integrate=odeint).exp().reshape(n, n)
        z0 = torch.randn(2000, 2)
        z, _ = odeint(field, (z0, torch.zeros(2000, 1)), torch.tensor([0.0, 1.0]), rtol=1e-5, atol=1e-5)
        samples = z[-1]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.7))
    axes[0].plot(data[:, 0], data[:, 1], ".", ms=1.5, color="k")
    axes[0].set_title("data: two noisy circles")
    axes[1].imshow(density.numpy(), extent=(-lim, lim, -lim, lim), origin="lower", cmap="viridis")
    axes[1].set_title("learned density p(x)")
    axes[2].plot(samples[:, 0], samples[:, 1], ".", ms=1.5, color="C0")
    axes[2].set_title("samples: N(0, I) flowed to t = 1")
    for ax in axes[:3]:
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    its = [r["iter"] for r in log]
    axes[3].plot(its, [r["train_nll"] for r in log], label="training batch")
    axes[3].plot(its, [r["heldout_nll"] for r in log], label="held out")
    axes[3].set_xlabel("iteration")
    axes[3].set_title("negative log-likelihood (nats)")
    axes[3].legend(fontsize=8)
    fig.tight_layout()
    return save(fig, "cnf")


def main(names):
    for name in names or RUNS:
        mod = load(name)
        with tempfile.TemporaryDirectory() as out:
            start = time.time()
            path = globals()[name](mod, out)
        print(f"{name}: {os.path.relpath(path)} ({time.time() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
