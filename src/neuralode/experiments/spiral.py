"""Learn the cubic spiral's vector field from one trajectory (the classic neural-ODE demo).

The model is dy/dt = MLP(y³); training solves it over random windows of the observed trajectory and
minimises the mean absolute error, exactly as Chen et al.'s demo. Every hyperparameter is a keyword.
"""

from __future__ import annotations

import os
import time

import torch

from .. import solve
from ..data.spirals import cubic_spiral_field, cubic_spiral_trajectory
from ._io import progress, pyplot, run_dir, write_csv, write_json


class SpiralField(torch.nn.Module):
    def __init__(self, hidden: int = 50) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.1)
                torch.nn.init.zeros_(m.bias)

    def forward(self, t, y):
        return self.net(y**3)


def train(
    *,
    iters: int = 2000,
    data_size: int = 1000,
    t_max: float = 25.0,
    batch_time: int = 10,
    batch_size: int = 20,
    lr: float = 1e-3,
    method: str = "dopri5",
    gradient: str = "backprop",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    eval_every: int = 20,
    seed: int = 0,
    out_dir: str = "runs/spiral",
    show_progress: bool = True,
) -> dict:
    """Train and write ``metrics.json``, ``metrics.csv``, ``loss.png`` and ``trajectory.png`` to ``out_dir``.

    Returns:
        the metrics, including ``final_mae`` (mean absolute error of the whole predicted trajectory,
        averaged over the last 25 evaluations) and the forward/backward NFE per iteration.
    """
    torch.manual_seed(seed)
    out = run_dir(out_dir)
    t, true_y = cubic_spiral_trajectory(data_size, t_max)
    y0 = true_y[0]
    func = SpiralField()
    opt = torch.optim.RMSprop(func.parameters(), lr=lr)
    history = []
    start = time.perf_counter()
    for it in progress(range(1, iters + 1), total=iters, desc="spiral", enabled=show_progress):
        idx = torch.randint(0, data_size - batch_time, (batch_size,))
        batch_y0 = true_y[idx]
        batch_t = t[:batch_time]
        batch_y = torch.stack([true_y[idx + i] for i in range(batch_time)])
        opt.zero_grad()
        sol = solve(func, batch_y0, batch_t, method=method, rtol=rtol, atol=atol, gradient=gradient, dense=False)
        loss = (sol.ys - batch_y).abs().mean()
        loss.backward()
        opt.step()
        if it % eval_every == 0 or it == iters:
            with torch.no_grad():
                pred = solve(func, y0, t, method=method, rtol=rtol, atol=atol, dense=False).ys
                mae = float((pred - true_y).abs().mean())
            history.append(
                {
                    "iter": it,
                    "train_loss": loss.item(),
                    "trajectory_mae": mae,
                    "nfe_forward": sol.stats.nfe,
                    "nfe_backward": sol.stats.nfe_backward,
                    "seconds": time.perf_counter() - start,
                }
            )
    last = history[-25:]
    metrics = {
        "final_mae": sum(h["trajectory_mae"] for h in last) / len(last),
        "iters": iters,
        "method": method,
        "gradient": gradient,
        "seconds": time.perf_counter() - start,
        "history": history,
    }
    write_json(os.path.join(out, "metrics.json"), metrics)
    write_csv(os.path.join(out, "metrics.csv"), history)
    _plots(out, history, t, true_y, func, y0, method, rtol, atol)
    return metrics


def _plots(out, history, t, true_y, func, y0, method, rtol, atol) -> None:
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([h["iter"] for h in history], [h["trajectory_mae"] for h in history], label="trajectory MAE")
    ax.plot([h["iter"] for h in history], [h["train_loss"] for h in history], label="window loss", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)
    with torch.no_grad():
        pred = solve(func, y0, t, method=method, rtol=rtol, atol=atol, dense=False).ys
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    axes[0].plot(true_y[:, 0], true_y[:, 1], "g-", label="true")
    axes[0].plot(pred[:, 0], pred[:, 1], "b--", label="learned")
    axes[0].set_title("phase portrait")
    axes[0].legend()
    g = torch.linspace(-2, 2, 21)
    yy, xx = torch.meshgrid(g, g, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    with torch.no_grad():
        learned = func(0, pts)
        true = cubic_spiral_field(torch.tensor(0.0), pts)
    axes[1].quiver(pts[:, 0], pts[:, 1], true[:, 0], true[:, 1], color="g", alpha=0.5, label="true field")
    axes[1].quiver(pts[:, 0], pts[:, 1], learned[:, 0], learned[:, 1], color="b", alpha=0.5, label="learned field")
    axes[1].set_title("vector field")
    axes[1].legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trajectory.png"), dpi=110)
    plt.close(fig)
