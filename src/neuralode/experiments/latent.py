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

The RNN baseline (Chen et al. 2018, §5.1: an RNN given the time differences between observations) gets the
latent ODE's data and budget: both train on the same spirals with the same optimiser, batch and number of
iterations; the RNN's hidden size, learning rate and extrapolation feedback gap are chosen on validation spirals
held out from training and from the test set (:func:`select_rnn`). :func:`compare` reports the RNN at equal
iterations and, trained afresh for as long as the latent ODE trained, at equal wall-clock time.
"""

from __future__ import annotations

import itertools
import math
import os
import time

import torch

from ..models.latent_ode import LatentODE, RNNBaseline
from ._io import progress, pyplot, run_dir, write_csv, write_json

__all__ = ["spiral_dataset", "train_and_evaluate", "select_rnn", "compare", "table"]

# predictive (extrapolation) RMSE at n = 30, 50, 100 observed points, Chen et al. 2018, Table 2
PAPER = {"rnn": {30: 0.3937, 50: 0.3202, 100: 0.1813}, "latent_ode": {30: 0.1642, 50: 0.1502, 100: 0.1346}}
# the RNN's settings searched on validation spirals: 25 hidden units, the recognition RNN's size in the paper's
# example code (torchdiffeq, examples/latent_ode.py: rnn_nhidden = 25), and a wider state; learning rates around
# the latent ODE's 1e-2 (the same example's default)
RNN_GRID = {"hidden": (25, 64), "lr": (3e-3, 1e-2, 3e-2)}
# how often the RNN reads its own predictions back when extrapolating, in multiples of the mean gap between the
# observations it was trained on (0: at every query time); chosen on validation data with the settings above
RNN_FEEDBACK = (0.0, 0.5, 1.0, 2.0)


def feedback_gaps(t: torch.Tensor, n_obs: int, multiples=RNN_FEEDBACK) -> list[float]:
    """The candidate ``feedback_gap`` values of :meth:`RNNBaseline.predict` for sequences observed at n_obs of
    the window's times ``t``: multiples of the mean gap between observations, each rounded to a whole number of
    query steps ``dt`` and given as that number less half a step (so that rounding in the times cannot skip a
    step); 0 means every query time. Distinct values only."""
    window = len(t) // 2
    dt = float(t[1] - t[0])
    mean_gap = float(t[window - 1] - t[0]) / max(n_obs - 1, 1)
    steps = sorted({max(1, round(m * mean_gap / dt)) for m in multiples})
    return [0.0 if k == 1 else round((k - 0.5) * dt, 6) for k in steps]


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


def _split(noisy: torch.Tensor, n_test: int, n_val: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training, validation and test spirals (columns of ``noisy``), disjoint, in that order."""
    n_train = noisy.shape[1] - n_test - n_val
    if n_train < 1 or n_test < 1 or n_val < 0:
        raise ValueError(f"cannot split {noisy.shape[1]} spirals into {n_val} for validation and {n_test} for test")
    return noisy[:, :n_train], noisy[:, n_train : n_train + n_val], noisy[:, n_train + n_val :]


def _make(model: str, latent_dim: int, encoder: str, hidden: int | None):
    if model == "latent_ode":
        return LatentODE(latent_dim=latent_dim, encoder=encoder)
    if model == "rnn":
        return RNNBaseline() if hidden is None else RNNBaseline(hidden=hidden)
    raise ValueError(f"`model` must be 'latent_ode' or 'rnn', got {model!r}")


def _fit(
    net,
    model: str,
    t: torch.Tensor,
    train_x: torch.Tensor,
    *,
    n_obs: int,
    iters: int,
    batch_size: int,
    lr: float,
    noise: float,
    seed: int,
    show_progress: bool,
    time_budget: float | None = None,
) -> dict:
    """Train ``net`` in place with Adam and a cosine decay of the rate to 2% of ``lr``: over ``iters`` iterations,
    or with ``time_budget`` over that many seconds of training (the schedule follows the elapsed fraction of the
    budget, so the run anneals fully whatever its speed). Returns the iterations done, training wall and CPU
    seconds (the loop only, no evaluation) and a history of minibatch losses."""
    if time_budget is not None and not time_budget > 0:
        raise ValueError(f"`time_budget` must be a positive number of seconds, got {time_budget}")
    window = len(t) // 2
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    eta_min = 0.02 * lr
    gen = torch.Generator().manual_seed(seed + 1)
    history = []
    steps = range(1, iters + 1) if time_budget is None else itertools.count(1)
    desc = f"{model} n={n_obs}" + ("" if time_budget is None else f" for {time_budget:.0f} s")
    wall = cpu = 0.0
    done = 0
    for it in progress(steps, total=iters if time_budget is None else None, desc=desc, enabled=show_progress):
        frac = (it - 1) / iters if time_budget is None else wall / time_budget  # how much of the budget is spent
        if frac >= 1:
            break
        w0, c0 = time.perf_counter(), time.process_time()
        for group in opt.param_groups:
            group["lr"] = eta_min + (lr - eta_min) * 0.5 * (1 + math.cos(math.pi * frac))
        cols = torch.randint(0, train_x.shape[1], (batch_size,), generator=gen)
        x = train_x[:window, cols]
        mask = _observe(window, n_obs, batch_size, gen).expand_as(x)
        opt.zero_grad()
        record = {}
        if model == "latent_ode":
            # KL annealing over the first fifth of the budget
            kl_weight = min(1.0, (it / iters if time_budget is None else frac) / 0.2)
            elbo, _ = net.elbo(t[:window], x, mask, noise_std=noise, kl_weight=kl_weight)
            loss = -elbo / n_obs
            record["kl_weight"] = kl_weight
        else:
            loss = net.loss(t[:window], x, mask)
        loss.backward()
        opt.step()
        wall += time.perf_counter() - w0
        cpu += time.process_time() - c0
        done = it
        if it % 50 == 0 or (time_budget is None and it == iters):
            history.append({"iter": it, "minibatch_loss": loss.item(), **record, "train_seconds": wall})
    net.eval()
    return {"iters": done, "train_seconds": wall, "train_cpu_seconds": cpu, "history": history}


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
    hidden: int | None = None,
    n_val: int = 0,
    time_budget: float | None = None,
    feedback_gap: float = 0.0,
) -> dict:
    """Train one model (``latent_ode`` or ``rnn``) on n_obs points per sequence; return its test RMSEs.

    The last ``n_test`` spirals are the test set and the ``n_val`` before them are held out for validation
    (neither is trained on). ``hidden`` is the RNN's state size (its default when None) and ``feedback_gap`` how
    often it reads its own predictions back when extrapolating (:meth:`RNNBaseline.predict`). With ``time_budget``
    the model trains for that many seconds instead of ``iters`` iterations. Returned keys: ``iters`` (done),
    ``train_seconds`` / ``train_cpu_seconds`` (the training loop only), ``rmse_interpolation`` /
    ``rmse_extrapolation`` (on the test spirals, against their noisy values), and ``history`` (``minibatch_loss``:
    the training objective on that iteration's minibatch, for the latent ODE the negative KL-annealed ELBO per
    observation, for the RNN the one-step-ahead mean squared error)."""
    torch.manual_seed(seed)
    t, clean, noisy = spiral_dataset(n_spirals, noise=noise, seed=seed)
    window = len(t) // 2
    train_x, _, test_x = _split(noisy, n_test, n_val)
    net = _make(model, latent_dim, encoder, hidden)
    fit = _fit(
        net,
        model,
        t,
        train_x,
        n_obs=n_obs,
        iters=iters,
        batch_size=batch_size,
        lr=lr,
        noise=noise,
        seed=seed,
        show_progress=show_progress,
        time_budget=time_budget,
    )
    ev = evaluate(net, model, t, test_x, window, n_obs, seed, feedback_gap=feedback_gap)
    out = {"model": model, "n_obs": n_obs, "iters": fit["iters"], "lr": lr}
    if model == "rnn":
        out.update(hidden=net.hidden, feedback_gap=feedback_gap)
    out.update(
        train_seconds=fit["train_seconds"], train_cpu_seconds=fit["train_cpu_seconds"], **ev, history=fit["history"]
    )
    out["_net"] = net
    return out


@torch.no_grad()
def evaluate(
    net, model: str, t: torch.Tensor, x: torch.Tensor, window: int, n_obs: int, seed: int, feedback_gap: float = 0.0
) -> dict:
    """RMSE of ``net``'s predictions for the spirals ``x`` (against their noisy values), each observed at n_obs
    random times of the window (drawn from ``seed``): at the window's unobserved times (interpolation) and at
    the times after the window (extrapolation). ``feedback_gap`` is passed to the RNN's ``predict``."""
    gen = torch.Generator().manual_seed(seed + 2)
    mask = _observe(window, n_obs, x.shape[1], gen).expand(window, x.shape[1], 2)
    if model == "latent_ode":
        pred = net.predict(t[:window], x[:window], mask, t)
    else:
        full_mask = torch.cat([mask, torch.zeros_like(x[window:])])
        pred = net.predict(
            t, torch.cat([x[:window], torch.zeros_like(x[window:])]), full_mask, feedback_gap=feedback_gap
        )
    err = (pred - x) ** 2
    unobserved = 1 - mask
    interp = (
        float((err[:window] * unobserved).sum() / unobserved.sum().clamp_min(1)) ** 0.5
        if unobserved.sum() > 0
        else float("nan")
    )
    extrap = float(err[window:].mean()) ** 0.5
    return {"rmse_interpolation": interp, "rmse_extrapolation": extrap, "_pred": pred, "_mask": mask}


def select_rnn(
    *,
    n_obs: int,
    iters: int,
    hidden_sizes=RNN_GRID["hidden"],
    lrs=RNN_GRID["lr"],
    feedback=RNN_FEEDBACK,
    batch_size: int = 50,
    n_spirals: int = 1000,
    n_test: int = 200,
    n_val: int = 100,
    noise: float = 0.1,
    seed: int = 0,
    show_progress: bool = True,
) -> dict:
    """The RNN's hidden size, learning rate and extrapolation feedback gap chosen on held-out validation spirals.

    Each (hidden size, learning rate) of the grid trains for ``iters`` iterations (the latent ODE's budget, same
    optimiser and schedule) on the training spirals; each trained RNN is scored with each ``feedback_gaps``
    candidate (``feedback``: multiples of the mean training gap; ``(0.0,)`` feeds back at every query time) by
    its extrapolation RMSE on the validation spirals; the test spirals are not used. Returns
    ``{"hidden", "lr", "feedback_gap", "validation_rmse_extrapolation", "grid": [...], "_net"}`` with the chosen
    setting's trained network."""
    if n_val < 1:
        raise ValueError("choosing the RNN's settings needs validation spirals: n_val >= 1")
    torch.manual_seed(seed)
    t, _, noisy = spiral_dataset(n_spirals, noise=noise, seed=seed)
    window = len(t) // 2
    train_x, val_x, _ = _split(noisy, n_test, n_val)
    grid, best, best_net = [], None, None
    for hidden in hidden_sizes:
        for lr in lrs:
            torch.manual_seed(seed)
            net = RNNBaseline(hidden=hidden)
            kw = dict(n_obs=n_obs, iters=iters, batch_size=batch_size, lr=lr, noise=noise, seed=seed)
            fit = _fit(net, "rnn", t, train_x, **kw, show_progress=show_progress)
            for gap in feedback_gaps(t, n_obs, feedback):
                # validation masks are drawn from another seed than the test masks
                ev = evaluate(net, "rnn", t, val_x, window, n_obs, seed + 1, feedback_gap=gap)
                score = ev["rmse_extrapolation"]
                row = {
                    "hidden": hidden,
                    "lr": lr,
                    "feedback_gap": gap,
                    "validation_rmse_extrapolation": score,
                    "validation_rmse_interpolation": ev["rmse_interpolation"],
                    "train_seconds": fit["train_seconds"],
                    "train_cpu_seconds": fit["train_cpu_seconds"],
                    "history": fit["history"],
                }
                grid.append(row)
                if math.isfinite(score) and (best is None or score < best["validation_rmse_extrapolation"]):
                    best, best_net = row, net
    if best is None:  # every setting diverged: keep the first so the run still reports
        best, best_net = grid[0], None
    return {
        "hidden": best["hidden"],
        "lr": best["lr"],
        "feedback_gap": best["feedback_gap"],
        "validation_rmse_extrapolation": best["validation_rmse_extrapolation"],
        "grid": grid,
        "_net": best_net,
    }


def compare(
    *,
    n_obs: int = 30,
    iters: int = 5000,
    encoder: str = "odernn",
    n_spirals: int = 1000,
    n_test: int = 200,
    n_val: int = 100,
    rnn_hidden=RNN_GRID["hidden"],
    rnn_lr=RNN_GRID["lr"],
    rnn_feedback=RNN_FEEDBACK,
    noise: float = 0.1,
    seed: int = 0,
    show_progress: bool = True,
) -> tuple[dict, dict, dict]:
    """The latent ODE against the RNN baseline at one n: ``(latent_ode_row, rnn_row, nets)``.

    Both train on the same spirals with the same optimiser (Adam, batch 50, cosine decay) for ``iters``
    iterations; the latent ODE keeps the paper's settings (lr 1e-2), the RNN's hidden size, learning rate and
    extrapolation feedback gap are chosen on validation spirals (:func:`select_rnn`). The RNN row reports the
    chosen RNN at equal
    iterations (``rmse_extrapolation``, ``rmse_interpolation``) and, trained afresh with the same settings for
    as many seconds as the latent ODE trained, at equal wall-clock time (``..._at_latent_ode_wall_time``)."""
    common = dict(n_obs=n_obs, n_spirals=n_spirals, n_test=n_test, n_val=n_val, noise=noise, seed=seed)
    lat = train_and_evaluate(model="latent_ode", iters=iters, encoder=encoder, show_progress=show_progress, **common)
    sel = select_rnn(
        iters=iters,
        hidden_sizes=rnn_hidden,
        lrs=rnn_lr,
        feedback=rnn_feedback,
        show_progress=show_progress,
        **common,
    )
    t, _, noisy = spiral_dataset(n_spirals, noise=noise, seed=seed)
    test_x = _split(noisy, n_test, n_val)[2]
    net = sel["_net"]
    if net is None:  # every setting diverged: report the first one's equal-iteration run
        net = train_and_evaluate(
            model="rnn", iters=iters, hidden=sel["hidden"], lr=sel["lr"], show_progress=show_progress, **common
        )["_net"]
    ev = evaluate(net, "rnn", t, test_x, len(t) // 2, n_obs, seed, feedback_gap=sel["feedback_gap"])
    timed = train_and_evaluate(
        model="rnn",
        iters=iters,
        hidden=sel["hidden"],
        lr=sel["lr"],
        feedback_gap=sel["feedback_gap"],
        time_budget=lat["train_seconds"],
        show_progress=show_progress,
        **common,
    )
    sel_row = next(
        r
        for r in sel["grid"]
        if (r["hidden"], r["lr"], r["feedback_gap"]) == (sel["hidden"], sel["lr"], sel["feedback_gap"])
    )
    rnn = {
        "model": "rnn",
        "n_obs": n_obs,
        "iters": iters,
        "lr": sel["lr"],
        "hidden": sel["hidden"],
        "feedback_gap": sel["feedback_gap"],
        "train_seconds": sel_row["train_seconds"],
        "train_cpu_seconds": sel_row["train_cpu_seconds"],
        "rmse_interpolation": ev["rmse_interpolation"],
        "rmse_extrapolation": ev["rmse_extrapolation"],
        "paper_rmse_extrapolation": PAPER["rnn"].get(n_obs),
        "selected_on": "validation_rmse_extrapolation",
        "validation_rmse_extrapolation": sel["validation_rmse_extrapolation"],
        "latent_ode_train_seconds": lat["train_seconds"],
        "iters_at_latent_ode_wall_time": timed["iters"],
        "train_seconds_at_latent_ode_wall_time": timed["train_seconds"],
        "train_cpu_seconds_at_latent_ode_wall_time": timed["train_cpu_seconds"],
        "rmse_interpolation_at_latent_ode_wall_time": timed["rmse_interpolation"],
        "rmse_extrapolation_at_latent_ode_wall_time": timed["rmse_extrapolation"],
        "selection_grid": [{k: v for k, v in g.items() if k != "history"} for g in sel["grid"]],
        "history": sel_row["history"],
        "history_at_latent_ode_wall_time": timed["history"],
    }
    latent = {k: v for k, v in lat.items() if not k.startswith("_")}
    latent["paper_rmse_extrapolation"] = PAPER["latent_ode"].get(n_obs)
    nets = {"latent_ode": (lat["_net"], lat["_pred"], lat["_mask"]), "rnn": (net, ev["_pred"], ev["_mask"])}
    return latent, rnn, nets


def table(
    *,
    ns=(30, 50, 100),
    iters: int = 5000,
    out_dir: str = "runs/latent",
    encoder: str = "odernn",
    n_spirals: int = 1000,
    seed: int = 0,
    show_progress: bool = True,
    n_val: int | None = None,
    rnn_hidden=RNN_GRID["hidden"],
    rnn_lr=RNN_GRID["lr"],
    rnn_feedback=RNN_FEEDBACK,
) -> dict:
    """Table 2: RNN and latent ODE at each n; writes results.json, results.csv, table.md and plots.

    The last fifth of the spirals (at most 200) is the test set and the ``n_val`` before them (default half
    as many) choose the RNN's settings; see :func:`compare` for the protocol."""
    out = run_dir(out_dir)
    n_test = max(1, min(200, n_spirals // 5))
    n_val = max(1, n_test // 2) if n_val is None else n_val
    rows, nets = [], {}
    for n in ns:
        latent, rnn, got = compare(
            n_obs=n,
            iters=iters,
            encoder=encoder,
            n_spirals=n_spirals,
            n_test=n_test,
            n_val=n_val,
            rnn_hidden=rnn_hidden,
            rnn_lr=rnn_lr,
            rnn_feedback=rnn_feedback,
            seed=seed,
            show_progress=show_progress,
        )
        nets.update({(model, n): v for model, v in got.items()})
        rows += [rnn, latent]
        for g in rnn["selection_grid"]:
            print(
                f"rnn        n={n:<3d} hidden {g['hidden']:<3d} lr {g['lr']:.0e} feedback gap {g['feedback_gap']:.2f}: "
                f"validation extrapolation RMSE {g['validation_rmse_extrapolation']:.4f}",
                flush=True,
            )
        for label, r, sfx in (
            ("latent_ode", latent, ""),
            ("rnn", rnn, ""),
            ("rnn", rnn, "_at_latent_ode_wall_time"),
        ):
            its = r["iters" if not sfx else "iters_at_latent_ode_wall_time"]
            secs = r["train_seconds" if not sfx else "train_seconds_at_latent_ode_wall_time"]
            print(
                f"{label:<10} n={n:<3d} extrapolation RMSE {r['rmse_extrapolation' + sfx]:.4f} "
                f"interpolation RMSE {r['rmse_interpolation' + sfx]:.4f} ({its} iterations, {secs:.0f} s training)",
                flush=True,
            )
    flat = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
    keys = list(dict.fromkeys(k for r in flat for k in r))
    flat = [{k: r.get(k) for k in keys} for r in flat]
    protocol = {
        "rmse": "on held-out test spirals against their noisy values; extrapolation: the 100 times after the window",
        "equal_iterations": "rmse_* of every row: both models trained `iters` iterations, same optimiser and batch",
        "equal_wall_clock": "rnn rows, *_at_latent_ode_wall_time: the RNN trained for the latent ODE's train_seconds",
        "rnn_selection": "RNN hidden size, lr, feedback_gap chosen by extrapolation RMSE on validation spirals",
        "n_test": n_test,
        "n_val": n_val,
    }
    write_json(os.path.join(out, "results.json"), {"protocol": protocol, "rows": rows})
    write_csv(os.path.join(out, "results.csv"), flat)
    lines = ["| model | " + " | ".join(f"n = {n}" for n in ns) + " |", "|---|" + "---|" * len(ns)]
    for label, model, sfx in (
        ("rnn, equal iterations", "rnn", ""),
        ("rnn, equal wall-clock time", "rnn", "_at_latent_ode_wall_time"),
        ("latent_ode", "latent_ode", ""),
    ):
        cells = []
        for n in ns:
            r = next(x for x in rows if x["model"] == model and x["n_obs"] == n)
            paper = PAPER[model].get(n)
            cells.append(f"{r['rmse_extrapolation' + sfx]:.4f}" + ("" if paper is None else f" (paper {paper:.4f})"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    with open(os.path.join(out, "table.md"), "w") as fh:
        fh.write("Predictive RMSE, 100 times past the observed window\n\n" + "\n".join(lines) + "\n")
    print("\n".join(lines))
    _plot(out, nets, ns, spiral_dataset(n_spirals, seed=seed))
    return {"rows": flat}


def _plot(out: str, nets: dict, ns, data) -> None:
    plt = pyplot()
    if plt is None:
        return
    t, clean, noisy = data
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
