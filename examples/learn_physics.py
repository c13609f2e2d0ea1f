"""Learn a damped pendulum's physics from noisy observations with a hybrid model.

    θ'' = -(g/L) sin θ - μ θ'

The model is f = f_known(y; g/L, μ) + NN(y): the physical parameters are learned with the network (whose
output is penalised to stay small) by backprop through ``odeint_adjoint``. Torchdiffeq-style interface only.

    python examples/learn_physics.py --niters 300 [--viz] [--out runs/learn_physics]
"""

import argparse
import json
import os

import torch

from neuralode import odeint, odeint_adjoint

parser = argparse.ArgumentParser("learn physics")
parser.add_argument("--niters", type=int, default=300)
parser.add_argument("--noise", type=float, default=0.01)
parser.add_argument("--lr", type=float, default=0.03)
parser.add_argument("--viz", action="store_true", help="also draw the figure, learn_physics.png, in --out")
parser.add_argument("--out", type=str, default="runs/learn_physics")

TRUE_G_OVER_L, TRUE_MU = 9.81, 0.3


class Pendulum(torch.nn.Module):
    def __init__(self, g_over_l=TRUE_G_OVER_L, mu=TRUE_MU, correction=False):
        super().__init__()
        self.log_g = torch.nn.Parameter(torch.tensor(float(g_over_l)).log())
        self.log_mu = torch.nn.Parameter(torch.tensor(float(mu)).log())
        self.nn = (
            torch.nn.Sequential(torch.nn.Linear(2, 32), torch.nn.Tanh(), torch.nn.Linear(32, 2)) if correction else None
        )
        if self.nn is not None:
            torch.nn.init.zeros_(self.nn[2].weight)
            torch.nn.init.zeros_(self.nn[2].bias)

    def forward(self, t, y):
        theta, omega = y[..., 0], y[..., 1]
        known = torch.stack([omega, -self.log_g.exp() * torch.sin(theta) - self.log_mu.exp() * omega], -1)
        return known if self.nn is None else known + self.nn(y)


def plot(log, path):
    """Relative error of the two physical parameters, and the training loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [r["iter"] for r in log]
    last = log[-1]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax.semilogy(its, [r["g_rel_err"] for r in log], "C0", label=f"g/L: {last['g_over_L']:.2f} (true {TRUE_G_OVER_L})")
    ax.semilogy(its, [r["mu_rel_err"] for r in log], "C1", label=f"μ: {last['mu']:.3f} (true {TRUE_MU})")
    ax.set_xlabel("iteration")
    ax.set_ylabel("relative error")
    ax.legend(fontsize=8)
    ax.set_title("Physical parameters of the hybrid model")
    ax2.semilogy(its, [r["loss"] for r in log])
    ax2.set_xlabel("iteration")
    ax2.set_ylabel("training loss")
    ax2.set_title("Mean squared error (+ penalty on the network)")
    fig.tight_layout()
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    t = torch.linspace(0, 4, 60)
    y0 = torch.tensor([[1.2, 0.0], [-0.5, 1.5], [2.5, -0.5]])
    with torch.no_grad():
        # the observations: the true pendulum solved in float64 to far below the noise
        clean = odeint(Pendulum().double(), y0.double(), t.double(), rtol=1e-10, atol=1e-10).float()
        data = clean + args.noise * torch.randn_like(clean)
    model = Pendulum(g_over_l=5.0, mu=0.1, correction=True)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    log = []
    for itr in range(1, args.niters + 1):
        opt.zero_grad()
        pred = odeint_adjoint(model, y0, t, rtol=1e-5, atol=1e-6)
        penalty = sum(p.pow(2).sum() for p in model.nn.parameters())
        loss = (pred - data).pow(2).mean() + 1e-4 * penalty
        loss.backward()
        opt.step()
        g, mu = model.log_g.exp().item(), model.log_mu.exp().item()
        log.append(
            {
                "iter": itr,
                "loss": loss.item(),
                "g_over_L": g,
                "mu": mu,
                "g_rel_err": abs(g - TRUE_G_OVER_L) / TRUE_G_OVER_L,
                "mu_rel_err": abs(mu - TRUE_MU) / TRUE_MU,
            }
        )
        if itr % 25 == 0 or itr == 1:
            print(
                f"Iter {itr:04d} | loss {loss.item():.2e} | g/L {g:.3f} (true {TRUE_G_OVER_L}) | mu {mu:.3f} "
                f"(true {TRUE_MU})"
            )
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    if args.viz:
        plot(log, os.path.join(args.out, "learn_physics.png"))
    return log


if __name__ == "__main__":
    main()
