"""Augmented neural ODEs on concentric circles (Dupont, Doucet & Teh 2019, §4.1).

Points of the disk ‖x‖ < r1 are labelled −1, points of the annulus r2 < ‖x‖ < r3 are labelled +1; the model is
an ODE flow on [0, 1] followed by a linear readout trained by mean squared error. A 2-D flow is a
homeomorphism of the plane: it cannot move the disk out of the annulus, so a plain neural ODE can only
squeeze trajectories past each other, which costs it many function evaluations and leaves the loss high. One
extra zero dimension (augment_dim=1) lets the flow lift the disk over the annulus: low loss at few
evaluations. ``train`` runs both and returns loss, accuracy and NFE per iteration.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from ..nn import ODEBlock
from ._io import progress, pyplot, run_dir, write_csv, write_json

__all__ = ["concentric_circles", "train", "compare"]


def concentric_circles(
    n: int, r1: float = 0.5, r2: float = 1.0, r3: float = 1.5, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` points, half in the disk of radius ``r1`` (label −1), half in the annulus ``r2 < r < r3`` (+1),
    uniform in area."""
    g = generator
    half = n // 2
    r_in = r1 * torch.rand(half, generator=g).sqrt()
    r_out = (r2**2 + (r3**2 - r2**2) * torch.rand(n - half, generator=g)).sqrt()
    r = torch.cat([r_in, r_out])
    phi = 2 * math.pi * torch.rand(n, generator=g)
    x = torch.stack([r * torch.cos(phi), r * torch.sin(phi)], -1)
    y = torch.cat([-torch.ones(half), torch.ones(n - half)])
    return x, y


class _Field(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.out = nn.Linear(hidden, dim)

    def forward(self, t, h):
        return self.out(self.net(h))


class CirclesModel(nn.Module):
    """ODE block (optionally augmented) → linear readout."""

    def __init__(self, augment_dim: int = 0, hidden: int = 32, rtol: float = 1e-3, atol: float = 1e-3) -> None:
        super().__init__()
        dim = 2 + augment_dim
        self.block = ODEBlock(_Field(dim, hidden), augment_dim=augment_dim, rtol=rtol, atol=atol, gradient="adjoint")
        self.readout = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.readout(self.block(x)).squeeze(-1)


def train(
    augment_dim: int, *, iters: int = 400, batch: int = 128, lr: float = 1e-3, seed: int = 0, show_progress=True
) -> dict:
    """Train one model; returns per-iteration loss and NFE, and held-out loss and accuracy."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = CirclesModel(augment_dim)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    hist = []
    start = time.perf_counter()
    name = "augmented" if augment_dim else "plain"
    for it in progress(range(1, iters + 1), total=iters, desc=name, enabled=show_progress):
        x, y = concentric_circles(batch, generator=gen)
        loss = ((model(x) - y) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        nfe_f, nfe_b = model.block.nfe_forward, model.block.nfe_backward
        hist.append({"iter": it, "loss": float(loss.detach()), "nfe_forward": nfe_f, "nfe_backward": nfe_b})
    x, y = concentric_circles(2000, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        pred = model(x)
    tail = hist[-max(1, iters // 10) :]
    return {
        "model": name,
        "augment_dim": augment_dim,
        "parameters": sum(p.numel() for p in model.parameters()),
        "test_loss": float(((pred - y) ** 2).mean()),
        "test_accuracy": float(((pred > 0).float() * 2 - 1 == y).float().mean()),
        "nfe_forward_last10pct": sum(h["nfe_forward"] for h in tail) / len(tail),
        "nfe_backward_last10pct": sum(h["nfe_backward"] for h in tail) / len(tail),
        "seconds": time.perf_counter() - start,
        "history": hist,
        "_model": model,
    }


def compare(*, iters: int = 400, out_dir: str = "runs/augmented", seed: int = 0, show_progress: bool = True) -> dict:
    """Plain vs augmented neural ODE on concentric circles; writes metrics.json, metrics.csv and PNG plots."""
    out = run_dir(out_dir)
    runs = [train(a, iters=iters, seed=seed, show_progress=show_progress) for a in (0, 1)]
    models = {r["model"]: r.pop("_model") for r in runs}
    summary = [{k: v for k, v in r.items() if k != "history"} for r in runs]
    write_json(os.path.join(out, "metrics.json"), {"runs": runs})
    write_csv(os.path.join(out, "metrics.csv"), summary)
    plt = pyplot()
    if plt is not None:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
        for r in runs:
            its = [h["iter"] for h in r["history"]]
            axes[0].plot(its, [h["loss"] for h in r["history"]], label=r["model"])
            axes[1].plot(its, [h["nfe_forward"] for h in r["history"]], label=r["model"])
        axes[0].set_ylabel("training loss (MSE)")
        axes[0].set_yscale("log")
        axes[1].set_ylabel("forward NFE")
        for ax in axes:
            ax.set_xlabel("iteration")
            ax.legend()
        fig.tight_layout()
        fig.savefig(os.path.join(out, "training.png"), dpi=110)
        plt.close(fig)
        _plot_features(plt, models, os.path.join(out, "features.png"))
    return {"runs": summary}


def _plot_features(plt, models: dict, path: str) -> None:
    """Where each model's flow sends the two classes (first two features; the third for the augmented one)."""
    x, y = concentric_circles(600, generator=torch.Generator().manual_seed(7))
    fig = plt.figure(figsize=(10, 4.5))
    for i, (name, model) in enumerate(models.items()):
        with torch.no_grad():
            h = model.block(x)
        if h.shape[1] >= 3:
            ax = fig.add_subplot(1, 2, i + 1, projection="3d")
            ax.scatter(h[:, 0], h[:, 1], h[:, 2], c=y, cmap="coolwarm", s=4)
        else:
            ax = fig.add_subplot(1, 2, i + 1)
            ax.scatter(h[:, 0], h[:, 1], c=y, cmap="coolwarm", s=4)
        ax.set_title(f"{name}: features at t = 1")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
