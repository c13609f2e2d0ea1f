"""A latent ODE for irregularly sampled spirals (Chen et al. 2018, §5), torchdiffeq-style interface only.

A GRU runs backwards over (observation, time gap) pairs and gives q(z0); the latent ODE is solved at the
observation times; a linear decoder maps back; the loss is the negative ELBO (Gaussian likelihood + KL).

    python examples/latent_ode.py --niters 2000 [--adjoint] [--viz] [--out runs/latent_ode]
"""

import argparse
import json
import math
import os

import torch

parser = argparse.ArgumentParser("latent ODE")
parser.add_argument("--niters", type=int, default=2000)
parser.add_argument("--nspiral", type=int, default=200)
parser.add_argument("--nsample", type=int, default=100)
parser.add_argument("--nobs", type=int, default=30)
parser.add_argument("--latent_dim", type=int, default=4)
parser.add_argument("--lr", type=float, default=1e-2)
parser.add_argument("--noise", type=float, default=0.1)
parser.add_argument("--adjoint", action="store_true")
parser.add_argument("--viz", action="store_true", help="also draw the figure, latent_ode.png, in --out")
parser.add_argument("--out", type=str, default="runs/latent_ode")


def make_spirals(nspiral, nsample, noise, start=0.0, stop=6 * math.pi, a=0.0, b=0.3):
    """Archimedean spirals r = a + bθ, half clockwise, half counter-clockwise, from random starts."""
    theta = torch.linspace(start, stop, nsample)
    r = a + b * theta
    cw = torch.stack([r * torch.cos(theta) + 5, r * torch.sin(theta)], -1)
    ccw = torch.stack([-r * torch.cos(theta) + 5, r * torch.sin(theta)], -1).flip(0)
    t = torch.linspace(0, 1, nsample) * (stop - start) / 10
    trajs = []
    for i in range(nspiral):
        base = cw if i % 2 == 0 else ccw
        trajs.append(base + noise * torch.randn_like(base))
    return t, torch.stack(trajs)


class LatentODEFunc(torch.nn.Module):
    def __init__(self, latent_dim, hidden=20):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(latent_dim, hidden),
            torch.nn.ELU(),
            torch.nn.Linear(hidden, hidden),
            torch.nn.ELU(),
            torch.nn.Linear(hidden, latent_dim),
        )

    def forward(self, t, z):
        return self.net(z)


class Encoder(torch.nn.Module):
    """GRU over (x, Δt), run from the last observation to the first."""

    def __init__(self, obs_dim, latent_dim, hidden=25):
        super().__init__()
        self.gru = torch.nn.GRU(obs_dim + 1, hidden, batch_first=True)
        self.out = torch.nn.Linear(hidden, 2 * latent_dim)

    def forward(self, x, t):
        dt = torch.cat([torch.zeros_like(t[:, :1]), t[:, 1:] - t[:, :-1]], 1)
        inp = torch.cat([x, dt[..., None]], -1).flip(1)
        _, h = self.gru(inp)
        return self.out(h[-1]).chunk(2, -1)


def plot(log, t, data, idx, enc, func, dec, path):
    """Two spirals: observations, reconstruction over the observed span, extrapolation; and the loss."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neuralode import odeint

    fig, axes = plt.subplots(1, 3, figsize=(12, 3.8))
    with torch.no_grad():
        for ax, i in zip(axes[:2], (0, 1)):
            x = data[i : i + 1, idx]
            mean, _ = enc(x, t[idx][None])
            ts = t[idx[0] :]
            xs = dec(odeint(func, mean, ts - ts[0], rtol=1e-5, atol=1e-6)[:, 0])
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
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parser.parse_args(argv)
    if args.adjoint:
        from neuralode import odeint_adjoint as odeint
    else:
        from neuralode import odeint
    torch.manual_seed(0)
    t, data = make_spirals(args.nspiral, args.nsample, args.noise)
    func, enc = LatentODEFunc(args.latent_dim), Encoder(2, args.latent_dim)
    dec = torch.nn.Linear(args.latent_dim, 2)
    params = list(func.parameters()) + list(enc.parameters()) + list(dec.parameters())
    opt = torch.optim.Adam(params, lr=args.lr)
    log = []
    for itr in range(1, args.niters + 1):
        # one shared set of irregular observation times per iteration (the union over the batch)
        idx = torch.sort(torch.randperm(args.nsample // 2)[: args.nobs]).values
        ts = t[idx]
        x = data[:, idx]
        opt.zero_grad()
        mean, logvar = enc(x, ts[None].expand(len(x), -1))
        z0 = mean + torch.randn_like(mean) * (0.5 * logvar).exp()
        zs = odeint(func, z0, ts - ts[0], rtol=1e-4, atol=1e-5).permute(1, 0, 2)
        xs = dec(zs)
        logpx = -0.5 * (((x - xs) / args.noise) ** 2 + 2 * math.log(args.noise) + math.log(2 * math.pi)).sum((1, 2))
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(-1)
        loss = (kl - logpx).mean()
        loss.backward()
        opt.step()
        log.append({"iter": itr, "neg_elbo": loss.item()})
        if itr % 50 == 0 or itr == 1:
            print(f"Iter {itr:04d} | -ELBO {loss.item():.2f}")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "log.json"), "w") as fh:
        json.dump(log, fh, indent=1)
    if args.viz:
        g = torch.Generator().manual_seed(1)
        idx = torch.sort(torch.randperm(args.nsample // 2, generator=g)[: args.nobs]).values
        plot(log, t, data, idx, enc, func, dec, os.path.join(args.out, "latent_ode.png"))
    return log


if __name__ == "__main__":
    main()
