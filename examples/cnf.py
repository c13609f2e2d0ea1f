"""A continuous normalizing flow on 2-D data by the instantaneous change of variables (Chen et al. 2018, §4):

    d z/dt = f(z, t),   d log p(z(t))/dt = -tr(∂f/∂z)

with the exact trace (two autograd passes in 2-D), trained by maximum likelihood through ``odeint_adjoint``
on a tuple state (z, log p). Torchdiffeq-style interface only.

    python examples/cnf.py --niters 1000 [--viz] [--out runs/cnf]
"""

import argparse
import json
import math
import os

import torch

from neuralode import odeint, odeint_adjoint

parser = argparse.ArgumentParser("continuous normalizing flow")
parser.add_argument("--niters", type=int, default=1000)
parser.add_argument("--batch", type=int, default=256)
parser.add_argument("--hidden", type=int, default=32)
parser.add_argument("--lr", type=float, default=3e-3)
parser.add_argument("--viz", action="store_true", help="also draw the figure, cnf.png, in --out")
parser.add_argument("--out", type=str, default="runs/cnf")


def circles(n, noise=0.05):
    angle = 2 * math.pi * torch.rand(n)
    radius = torch.where(torch.rand(n) < 0.5, torch.full((n,), 1.0), torch.full((n,), 2.0))
    pts = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)
    return pts + noise * torch.randn_like(pts)


class CNFField(torch.nn.Module):
    def __init__(self, hidden):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(3, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.Tanh(),
            torch.nn.Linear(hidden, 2),
        )

    def velocity(self, t, z):
        return self.net(torch.cat([z, t.expand(z.shape[0], 1)], -1))

    def forward(self, t, state):
        z, _ = state
        with torch.enable_grad():
            z = z.requires_grad_(True)
            dz = self.velocity(t, z)
            trace = sum(torch.autograd.grad(dz[:, i].sum(), z, create_graph=True)[0][:, i] for i in range(2))
        return dz, -trace[:, None]


def log_prob(field, x, integrate=odeint_adjoint):
    """log p(x): flow x from t=1 back to the N(0, I) base at t=0, accumulating the log-determinant."""
    t = torch.tensor([1.0, 0.0])
    z, delta = integrate(field, (x, torch.zeros(x.shape[0], 1)), t, rtol=1e-5, atol=1e-5)
    z0, dlogp = z[-1], delta[-1]
    base = -0.5 * (z0.pow(2).sum(-1) + 2 * math.log(2 * math.pi))
    return base - dlogp[:, 0]


def plot(log, field, path):
    """Data, learned density, samples flowed from the base, and the negative log-likelihood."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(1)
    data = circles(2000)
    lim, n = 3.0, 80
    xs = torch.linspace(-lim, lim, n)
    grid = torch.stack(torch.meshgrid(xs, xs, indexing="xy"), -1).reshape(-1, 2)
    with torch.no_grad():
        density = log_prob(field, grid, integrate=odeint).exp().reshape(n, n)
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
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    field = CNFField(args.hidden)
    opt = torch.optim.Adam(field.parameters(), lr=args.lr)
    held_out = circles(512)
    log = []
    for itr in range(1, args.niters + 1):
        opt.zero_grad()
        loss = -log_prob(field, circles(args.batch)).mean()
        loss.backward()
        opt.step()
        if itr % 20 == 0 or itr == 1 or itr == args.niters:
            with torch.no_grad():
                nll = -log_prob(field, held_out, integrate=odeint).mean().item()
            log.append({"iter": itr, "train_nll": loss.item(), "heldout_nll": nll})
            print(f"Iter {itr:04d} | train NLL {loss.item():.3f} | held-out NLL {nll:.3f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    if args.viz:
        plot(log, field, os.path.join(args.out, "cnf.png"))
    return log


if __name__ == "__main__":
    main()
