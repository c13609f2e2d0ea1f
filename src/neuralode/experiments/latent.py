"""The latent ODE on irregularly sampled spirals (Chen et al. 2018, §5 and Table 2), against an RNN baseline.

Data (our construction, after the paper's description and its example code): two Archimedean spirals,
r(s) = 0.5 + 0.05 s at angle +s (counter-clockwise) or -s (clockwise), s ∈ [0, 50]. Each of the 1000
sequences, half of each kind, starts at a random point s0 ∈ [0, 30] of its spiral and is sampled at 200
equally spaced times 0.1 apart (so the radius ranges over 0.5 … 3 and one window turns 1.6 times); Gaussian
noise of standard deviation 0.1. The first 100 times are the observed window, the next 100 are for
extrapolation; because start points differ, what one sequence must extrapolate other sequences observe.
Training draws n ∈ {30, 50, 100} of the window's times at random for every sequence (each sequence its own
times). Evaluation on held-out spirals: predictive RMSE against the noisy data at the window times a
sequence did not observe (interpolation; none when n = 100) and at the 100 times after the window
(extrapolation). A perfect predictor scores the noise level, 0.1.
"""

from __future__ import annotations

import os
import time

import torch

from ..models.latent_ode import LatentODE, RNNBaseline
from ._io import progress, pyplot, run_dir, write_csv, write_json

__all__ = ["spiral_dataset", "train_and_evaluate", "table"]

PAPER = {"rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813}, "latent_ode": {30: 0.1642, 50: 0.1502, 100: 0.1346}}


def spiral_dataset(
    n_spirals: int = 1000, n_times: int = 200, dt: float = 0.1, noise: float = 0.1, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(t (n_times,), clean (n_times, n_spirals, 2), noisy)``; even columns clockwise, odd ones not."""
    g = torch.Generator().manual_seed(seed)
    t = torch.arange(n_times, dtype=torch.float32) * dt
    cw = torch.arange(n_spirals) % 2 == 0
    spin = torch.where(cw, -1.0, 1.0)
    s0 = 30.0 * torch.rand(n_spirals, generator=g)
    s = s0[None] + t[:, None]  # position along the spiral
    radius = 0.5 + 0.05 * s
    angle = spin[None] * s
    clean = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], -1)
    noisy = clean + noise * torch.randn(clean.shape, generator=g)
    return t, clean, noisy


def _observe(window: int, n_obs: int, batch: int, generator: torch.Generator) -> torch.Tensor:
    """A (window, batch, 1) mask with n_obs random observed times per sequence (the first always)."""
    scores = torch.rand(window, batch, generator=generator)
    scores[0] = -1.0  # z0 is defined at the window start: every sequence sees it
    idx = scores.argsort(0)[:n_obs]
    mask = torch.zeros(window, batch)
    mask.scatter_(0, idx, 1.0)
    return mask[..., None]


def train_and_evaluate(
    *,
    n_obs: int = 30,
    model: str = "latent_ode",
    iters: int = 5000,
    batch_size: int = 50,
    lr: float = 1e-2,
    n_spirals: int = 1000,
    n_test: int = 200,
    noise: float = 0.1,
    latent_dim: int = 4,
    encoder: str = "gru",
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Train one model (``latent_ode`` or ``rnn``) on n_obs points per sequence; return its test RMSEs."""
    torch.manual_seed(seed)
    t, clean, noisy = spiral_dataset(n_spirals, noise=noise, seed=seed)
    window = len(t) // 2
    train_x, test_x = noisy[:, : n_spirals - n_test], noisy[:, n_spirals - n_test :]
    net = LatentODE(latent_dim=latent_dim, encoder=encoder) if model == "latent_ode" else RNNBaseline()
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.02 * lr)
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    start = time.perf_counter()
    for it in progress(range(1, iters + 1), total=iters, desc=f"{model} n={n_obs}", enabled=show_progress):
        cols = torch.randint(0, train_x.shape[1], (batch_size,), generator=gen)
        x = train_x[:window, cols]
        mask = _observe(window, n_obs, batch_size, gen).expand_as(x)
        opt.zero_grad()
        if model == "latent_ode":
            kl_weight = min(1.0, it / (0.2 * iters))  # KL annealing over the first fifth
            elbo, parts = net.elbo(t[:window], x, mask, noise_std=noise, kl_weight=kl_weight)
            loss = -elbo / n_obs
        else:
            loss = net.loss(t[:window], x, mask)
        loss.backward()
        opt.step()
        sched.step()
        if it % 50 == 0 or it == iters:
            history.append({"iter": it, "loss": loss.item(), "seconds": time.perf_counter() - start})
    net.eval()
    ev = evaluate(net, model, t, test_x, window, n_obs, seed)
    return {
        "model": model,
        "n_obs": n_obs,
        "iters": iters,
        "seconds": time.perf_counter() - start,
        **ev,
        "history": history,
        "_net": net,
    }


@torch.no_grad()
def evaluate(net, model: str, t: torch.Tensor, x: torch.Tensor, window: int, n_obs: int, seed: int) -> dict:
    gen = torch.Generator().manual_seed(seed + 2)
    mask = _observe(window, n_obs, x.shape[1], gen).expand(window, x.shape[1], 2)
    if model == "latent_ode":
        pred = net.predict(t[:window], x[:window], mask, t)
    else:
        full_mask = torch.cat([mask, torch.zeros_like(x[window:])])
        pred = net.predict(t, torch.cat([x[:window], torch.zeros_like(x[window:])]), full_mask)
    err = (pred - x) ** 2
    unobserved = 1 - mask
    interp = (
        float((err[:window] * unobserved).sum() / unobserved.sum().clamp_min(1)) ** 0.5
        if unobserved.sum() > 0
        else float("nan")
    )
    extrap = float(err[window:].mean()) ** 0.5
    return {"rmse_interpolation": interp, "rmse_extrapolation": extrap, "_pred": pred, "_mask": mask}


def table(
    *,
    ns=(30, 50, 100),
    iters: int = 5000,
    out_dir: str = "runs/latent",
    encoder: str = "odernn",
    n_spirals: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """Table 2: RNN and latent ODE at each n; writes results.json, results.csv, table.md and plots."""
    out = run_dir(out_dir)
    rows, nets = [], {}
    for n in ns:
        for model in ("rnn", "latent_ode"):
            r = train_and_evaluate(
                n_obs=n,
                model=model,
                iters=iters,
                encoder=encoder,
                n_spirals=n_spirals,
                n_test=max(1, min(200, n_spirals // 5)),
                seed=seed,
                show_progress=show_progress,
            )
            nets[(model, n)] = (r.pop("_net"), r.pop("_pred"), r.pop("_mask"))
            r["paper_rmse"] = PAPER[model].get(n)
            rows.append(r)
            print(
                f"{model:<10} n={n:<3d} extrapolation RMSE {r['rmse_extrapolation']:.4f} "
                f"interpolation RMSE {r['rmse_interpolation']:.4f} ({r['seconds']:.0f} s)",
                flush=True,
            )
    flat = [{k: v for k, v in r.items() if k != "history"} for r in rows]
    write_json(os.path.join(out, "results.json"), {"rows": rows})
    write_csv(os.path.join(out, "results.csv"), flat)
    lines = ["| model | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for model in ("rnn", "latent_ode"):
        cells = []
        for n in ns:
            r = next(x for x in rows if x["model"] == model and x["n_obs"] == n)
            cells.append(f"{r['rmse_extrapolation']:.4f} (paper {PAPER[model][n]:.4f})")
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write("Predictive RMSE, 100 times past the observed window\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out, nets, ns)
    return {"rows": flat}


def _plot(out: str, nets: dict, ns) -> None:
    plt = pyplot()
    if plt is None:
        return
    t, clean, noisy = spiral_dataset()
    window = len(t) // 2
    n = ns[0]
    fig, axes = plt.subplots(2, 4, figsize=(14, 7))
    for row, model in enumerate(("latent_ode", "rnn")):
        _, pred, mask = nets[(model, n)]
        for k in range(4):
            ax = axes[row, k]
            j = k
            test_clean = clean[:, -pred.shape[1] :]
            test_noisy = noisy[:, -pred.shape[1] :]
            seen = mask[:, j, 0].bool()
            ax.plot(test_clean[:, j, 0], test_clean[:, j, 1], color="0.8", lw=1, label="true")
            ax.plot(test_noisy[:window][seen, j, 0], test_noisy[:window][seen, j, 1], "k.", ms=4, label="observed")
            ax.plot(pred[:window, j, 0], pred[:window, j, 1], "b-", lw=1.2, label="reconstruction")
            ax.plot(pred[window:, j, 0], pred[window:, j, 1], "r-", lw=1.2, label="extrapolation")
            ax.set_title(f"{model}, n={n}")
            ax.set_aspect("equal")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "spirals.png"), dpi=100)
    plt.close(fig)
    net = nets[("latent_ode", n)][0]
    with torch.no_grad():
        z0 = torch.randn(6, net.field.net[0].in_features)
        samples = net.decode(z0, t)
    fig, ax = plt.subplots(figsize=(5, 5))
    for j in range(6):
        ax.plot(samples[:, j, 0], samples[:, j, 1], lw=1)
    ax.set_title("samples from the prior, decoded")
    ax.set_aspect("equal")
    fig.savefig(os.path.join(out, "prior_samples.png"), dpi=100)
    plt.close(fig)
