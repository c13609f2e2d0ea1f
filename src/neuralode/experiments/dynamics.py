"""Learn a system's dynamics from noisy trajectories: a neural vector field, or a hybrid model
``f = f_known(y; θ_phys) + NN(y)`` whose physical parameters are learned along with the network.

Training solves the model over random short windows of the observed trajectories (Chen et al.'s demo). With
irregular observation times the windows are shifted to start at 0 (the systems are autonomous) and solved
together on the union of their time offsets; dense output makes the extra times free.
"""

from __future__ import annotations

import math
import os
import time

import torch

from .. import solve
from ..data.systems import SYSTEMS, System, observe
from ._io import progress, pyplot, run_dir, write_csv, write_json

__all__ = ["train", "NeuralField", "HybridField"]


class NeuralField(torch.nn.Module):
    """dy/dt = MLP(φ(y)), with φ(y) = y³ for the spiral (the demo's feature map) and φ(y) = y otherwise."""

    def __init__(self, dim: int, hidden: int = 50, cubic: bool = False) -> None:
        super().__init__()
        self.cubic = cubic
        self.net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, dim))
        for m in self.net.modules():
            if isinstance(m, torch.nn.Linear):
                torch.nn.init.normal_(m.weight, std=0.1)
                torch.nn.init.zeros_(m.bias)

    def forward(self, t, y):
        return self.net(y**3 if self.cubic else y)


class HybridField(torch.nn.Module):
    """dy/dt = f_known(y; θ_phys) + NN(y). Physical parameters are positive (learned as logarithms); the
    network starts at zero so that training begins from the physics alone."""

    def __init__(self, system: System, init: dict | None = None, hidden: int = 32) -> None:
        super().__init__()
        self.system = system
        init = init or {k: 0.5 * v for k, v in system.params.items()}
        self.names = list(system.params)
        self.log_params = torch.nn.Parameter(torch.tensor([math.log(abs(init[k])) for k in self.names]))
        self.signs = [math.copysign(1.0, system.params[k]) for k in self.names]
        self.net = torch.nn.Sequential(
            torch.nn.Linear(system.dim, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, system.dim)
        )
        torch.nn.init.zeros_(self.net[2].weight)
        torch.nn.init.zeros_(self.net[2].bias)

    def physical(self) -> dict:
        vals = self.log_params.exp()
        return {k: s * vals[i] for i, (k, s) in enumerate(zip(self.names, self.signs))}

    def forward(self, t, y):
        return self.system.field(y, self.physical()) + self.net(y)


def _windows(t: torch.Tensor, ys: torch.Tensor, batch_time: int, batch_size: int):
    """Random windows from ``ys`` (trajectories, n, dim) observed at ``t`` (trajectories, n): initial states,
    the union of time offsets, and for each window the rows of the union at which it was observed."""
    n_traj, n = ys.shape[:2]
    traj = torch.randint(0, n_traj, (batch_size,))
    start = torch.randint(0, n - batch_time, (batch_size,))
    rows = start[:, None] + torch.arange(batch_time)
    offsets = t[traj[:, None], rows] - t[traj, start][:, None]  # (batch, batch_time), first column 0
    union, inverse = torch.unique(offsets.reshape(-1), sorted=True, return_inverse=True)
    return ys[traj, start], union, inverse.view(batch_size, batch_time), ys[traj[:, None], rows]


def train(
    *,
    system: str = "spiral",
    hybrid: bool = False,
    iters: int = 2000,
    data_size: int = 1000,
    trajectories: int = 1,
    t_max: float | None = None,
    noise: float = 0.0,
    irregular: bool = False,
    batch_time: int = 10,
    batch_size: int = 20,
    lr: float | None = None,
    method: str = "dopri5",
    gradient: str = "backprop",
    rtol: float = 1e-7,
    atol: float = 1e-9,
    nn_penalty: float = 1.0,
    lr_decay: bool = True,
    eval_every: int = 20,
    seed: int = 0,
    out_dir: str = "runs/dynamics",
    show_progress: bool = True,
    return_model: bool = False,
) -> dict | tuple[dict, torch.nn.Module]:
    """Fit the dynamics of a built-in system (``spiral``, ``pendulum``, ``falling``, ``lotka_volterra``).

    Writes ``metrics.json``, ``metrics.csv``, ``loss.png``, ``trajectories.png`` and ``phase.png`` to
    ``out_dir``. ``final_mae`` is the mean absolute error of the final model's whole predicted trajectory (from
    the clean initial state) against the clean one; ``mae_mean_last_evals`` averages that error over the last
    ``mae_mean_last_evals_count`` (at most 25) evaluations during training, a smoother but older figure.
    ``train_seconds`` is the time spent in optimisation steps, ``eval_seconds`` the time spent in those
    evaluations. For hybrid models the final model's physical parameters are reported beside their true values.
    History records: ``train_loss`` is that iteration's minibatch loss (mean absolute error of its windows against
    the noisy observations, without the network penalty), ``nfe_forward``/``nfe_backward`` that iteration's
    function evaluations, ``trajectory_mae`` the model's error at that iteration, ``train_seconds`` the
    optimisation time so far. With ``return_model`` the trained field is returned too: ``(metrics, field)``.
    """
    if system not in SYSTEMS:
        raise ValueError(f"unknown system {system!r}; built-in systems: {', '.join(SYSTEMS)}")
    sys_ = SYSTEMS[system]
    if hybrid and system == "spiral":
        raise ValueError("the hybrid model needs a system with physical parameters: pendulum, falling, lotka_volterra")
    torch.manual_seed(seed)
    out = run_dir(out_dir)
    gen = torch.Generator().manual_seed(seed + 1)
    y0s = [sys_.y0] + [
        tuple((torch.tensor(sys_.y0) * (0.5 + torch.rand(sys_.dim, generator=gen))).tolist())
        for _ in range(trajectories - 1)
    ]
    data = [
        observe(sys_, data_size, t_max, y0=y0, noise=noise, irregular=irregular, seed=seed + i)
        for i, y0 in enumerate(y0s)
    ]
    t_all = torch.stack([d[0] for d in data])
    clean = torch.stack([d[1] for d in data])
    noisy = torch.stack([d[2] for d in data])
    func = HybridField(sys_) if hybrid else NeuralField(sys_.dim, cubic=system == "spiral")
    lr = lr if lr is not None else (2e-2 if hybrid else 1e-3)
    opt = torch.optim.Adam(func.parameters(), lr=lr) if hybrid else torch.optim.RMSprop(func.parameters(), lr=lr)
    # cosine decay to 5% of the rate: without it the trajectory error keeps swinging (0.1 to 0.7 on the spiral)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iters, eta_min=0.05 * lr) if lr_decay else None
    history = []
    train_seconds = eval_seconds = 0.0
    for it in progress(range(1, iters + 1), total=iters, desc=f"dynamics:{system}", enabled=show_progress):
        start = time.perf_counter()
        y0, union, idx, target = _windows(t_all, noisy, batch_time, batch_size)
        opt.zero_grad()
        sol = solve(func, y0, union, method=method, rtol=rtol, atol=atol, gradient=gradient, dense=False)
        pred = sol.ys[idx, torch.arange(batch_size)[:, None]]  # (batch, batch_time, dim)
        loss = (pred - target).abs().mean()
        total = loss
        if hybrid and nn_penalty > 0:  # make the physics explain what it can
            total = loss + nn_penalty * func.net(target.reshape(-1, sys_.dim)).pow(2).mean()
        total.backward()
        opt.step()
        if sched is not None:
            sched.step()
        train_seconds += time.perf_counter() - start
        if it % eval_every == 0 or it == iters:
            start = time.perf_counter()
            record = {
                "iter": it,
                "train_loss": loss.item(),
                "nfe_forward": sol.stats.nfe,
                "nfe_backward": sol.stats.nfe_backward,
                "train_seconds": train_seconds,
            }
            record["trajectory_mae"] = _trajectory_mae(func, t_all, clean, method, rtol, atol)
            if hybrid:
                record.update({f"learned_{k}": float(v.detach()) for k, v in func.physical().items()})
            history.append(record)
            eval_seconds += time.perf_counter() - start
    start = time.perf_counter()
    final_mae = _trajectory_mae(func, t_all, clean, method, rtol, atol)  # the model this function returns
    eval_seconds += time.perf_counter() - start
    last = history[-25:]
    metrics = {
        "system": system,
        "hybrid": hybrid,
        "iters": iters,
        "noise": noise,
        "irregular": irregular,
        "method": method,
        "gradient": gradient,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "final_mae": final_mae,
        "mae_mean_last_evals": sum(h["trajectory_mae"] for h in last) / len(last),
        "mae_mean_last_evals_count": len(last),
        "history": history,
    }
    if hybrid:
        learned = {k: float(v.detach()) for k, v in func.physical().items()}
        metrics["physical_parameters"] = {
            k: {
                "true": sys_.params[k],
                "learned": learned[k],
                "relative_error": abs(learned[k] - sys_.params[k]) / abs(sys_.params[k]),
            }
            for k in sys_.params
        }
    write_json(os.path.join(out, "metrics.json"), metrics)
    write_csv(os.path.join(out, "metrics.csv"), history)
    _plots(out, sys_, func, t_all[0], clean[0], noisy[0], history, method, rtol, atol)
    return (metrics, func) if return_model else metrics


def _trajectory_mae(func, t_all, clean, method, rtol, atol) -> float:
    errs = []
    with torch.no_grad():
        for i in range(len(t_all)):
            pred = solve(
                func, clean[i, 0], t_all[i], method=method, rtol=rtol, atol=atol, dense=False, on_failure="return"
            ).ys
            if pred.shape[0] < clean.shape[1] or not torch.isfinite(pred).all():
                return float("inf")
            errs.append((pred - clean[i]).abs().mean())
    return float(torch.stack(errs).mean())


def _plots(out, sys_, func, t, clean, noisy, history, method, rtol, atol) -> None:
    plt = pyplot()
    if plt is None:
        return
    its = [h["iter"] for h in history]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot(its, [h["trajectory_mae"] for h in history], label="trajectory MAE")
    ax.plot(its, [h["train_loss"] for h in history], label="minibatch window loss", alpha=0.7)
    ax.set_yscale("log")
    ax.set_xlabel("iteration")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)
    with torch.no_grad():
        pred = solve(func, clean[0], t, method=method, rtol=rtol, atol=atol, dense=False, on_failure="return").ys
    fig, axes = plt.subplots(sys_.dim, 1, figsize=(7, 2.2 * sys_.dim), sharex=True)
    for i, ax in enumerate(axes):
        ax.plot(t, noisy[:, i], ".", ms=2, color="0.6", label="observed")
        ax.plot(t, clean[:, i], "g-", label="true")
        ax.plot(t[: len(pred)], pred[:, i], "b--", label="learned")
        ax.set_ylabel(sys_.labels[i])
    axes[0].legend(loc="upper right")
    axes[-1].set_xlabel("t")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "trajectories.png"), dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 5))
    lo, hi = clean.min(0).values, clean.max(0).values
    pad = 0.15 * (hi - lo)
    g0 = torch.linspace(float(lo[0] - pad[0]), float(hi[0] + pad[0]), 21)
    g1 = torch.linspace(float(lo[1] - pad[1]), float(hi[1] + pad[1]), 21)
    yy, xx = torch.meshgrid(g1, g0, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], -1)
    with torch.no_grad():
        learned = func(torch.zeros(()), pts)
    ax.quiver(pts[:, 0], pts[:, 1], learned[:, 0], learned[:, 1], color="b", alpha=0.4, label="learned field")
    ax.plot(clean[:, 0], clean[:, 1], "g-", label="true trajectory")
    ax.plot(pred[:, 0], pred[:, 1], "b--", label="learned trajectory")
    ax.set_xlabel(sys_.labels[0])
    ax.set_ylabel(sys_.labels[1])
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "phase.png"), dpi=110)
    plt.close(fig)
