"""``method="auto"`` with ``per_sample=True``: every sample of a batch keeps its own time, step size and method,
switching between the explicit pair and rodas4 on its own stiffness estimate (``solvers.auto``).

Each iteration attempts one step for every active sample: the explicit pair's stages for the samples in their
explicit phase and a rodas4 step (per-sample Jacobian blocks and LU factors, per-sample step sizes) for those in
their stiff phase; ``func`` is called on the whole batch with per-sample times (the per-sample contract), a kind
of step being skipped when no sample needs it. The explicit phase interpolates requested times with the pair's
continuous extension; the stiff phase steps onto them, as the joint solver does. Everything is tensor arithmetic
without in-place updates of values that gradients flow through, so backprop differentiates the discrete solve.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .._errors import Status
from .auto import SwitchRule, _Rows
from .control import _MIN_RATIO, StepController, initial_steps, rms_rows
from .implicit import batched_jacobian
from .integrate import IntegrationResult
from .per_sample import (
    Replay,
    _Coefficients,
    _dense_values,
    _stage_list,
    _stages,
    max_steps_failure,
    stall_failure,
    write_outputs,
)
from .rosenbrock import RODAS4, RosenbrockTableau, rosenbrock_stages
from .runge_kutta import RungeKutta, combo, tableau_floats

__all__ = ["integrate_per_sample_auto", "AutoReplay"]

#: the step a sample outside the stiff phase takes in a Rosenbrock attempt (its values are discarded)
_NEGLIGIBLE = 1e-12


def integrate_per_sample_auto(
    func,
    y0: torch.Tensor,
    t_out: Sequence,
    explicit: RungeKutta,
    ctrl_e: StepController,
    ctrl_s: StepController,
    rule: SwitchRule,
    *,
    rtol: float,
    atol: float,
    first_step: float | None = None,
    max_num_steps: int = 100_000,
    tab: RosenbrockTableau = RODAS4,
    trace: list | None = None,
) -> tuple[IntegrationResult, dict]:
    """Integrate a ``(batch, ...)`` state with per-sample steps and per-sample switching. Returns the result
    (``ys``: ``(len(t_out), batch·n)``) and per-sample statistics (``n_steps``, ``n_rejected``, ``nfe``,
    ``calls``, and ``methods``: for each sample the ``(name, t_start, t_end)`` of its phases). ``trace``: a list
    that gets, per attempt, what :class:`AutoReplay` needs to rebuild it (start times, steps, start values,
    acceptances, end times and which samples took a stiff step)."""
    if ctrl_e.beta2 != 0:
        raise ValueError("per-sample stepping uses the integral controller: leave `pcoeff` at 0")
    B = y0.shape[0]
    shape = y0.shape
    y = y0.reshape(B, -1)
    d = y.shape[1]
    dtype, device = y.dtype, y.device
    rows = len(t_out) > 0 and isinstance(t_out[0], (list, tuple))
    T_t = torch.tensor(t_out if rows else [list(t_out)], dtype=torch.float64, device=device).expand(B, -1)
    m = T_t.shape[1]
    direction = 1.0 if float(T_t[0, -1]) >= float(T_t[0, 0]) else -1.0
    co = _Coefficients(explicit, dtype, device)
    S = co.S
    W2 = _Rows(explicit.tableau)(dtype, device)  # (2, S): stiffness estimate's combinations of the stages
    nfe = torch.zeros(B, dtype=torch.long, device=device)
    calls = 0

    def f(t64: torch.Tensor, yy: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        nonlocal calls, nfe
        calls += 1
        nfe = nfe + active.long()
        return func(t64.to(dtype), yy.reshape(shape)).reshape(B, d)

    t = T_t[:, 0].clone()
    t_end = T_t[:, -1].clone()
    every = torch.ones(B, dtype=torch.bool, device=device)
    k0 = f(t, y, every)
    if first_step is None:
        dt = initial_steps(lambda tt, yy: f(tt, yy, every), t, y, k0, direction, explicit.tableau.order, rtol, atol)
    else:
        dt = torch.full_like(t, abs(float(first_step)))
    dt = torch.clamp(dt.detach(), min=ctrl_e.min_step, max=ctrl_e.max_step) * direction

    out = torch.empty(m + 1, B, d, dtype=dtype, device=device)  # (a spare row for writes with nowhere to go)
    out[0] = y
    next_k = torch.ones(B, dtype=torch.long, device=device)
    T_sorted = (direction * T_t).contiguous()
    active = t_end != t
    stiff = torch.zeros(B, dtype=torch.bool, device=device)
    stiff_count = torch.zeros(B, dtype=torch.long, device=device)
    calm_count = torch.zeros(B, dtype=torch.long, device=device)
    n_steps = torch.zeros(B, dtype=torch.long, device=device)
    n_rej = torch.zeros(B, dtype=torch.long, device=device)
    nonfinite_last = torch.zeros(B, dtype=torch.bool, device=device)
    switches: list[tuple[int, float]] = []  # (sample, time) of every switch
    tol_shift = atol / rtol
    eps = float(np.finfo(np.float64).eps)
    gamma, alpha = tab.gamma, tab.alpha
    status, message, t_fail = Status.SUCCESS, "", None
    attempts = 0
    K = torch.empty(max(explicit.rows, S), B, d, dtype=dtype, device=device)
    while bool(active.any()):
        if attempts >= max_num_steps:
            status, t_fail, message = max_steps_failure(active, t, direction, T_t, n_steps, n_rej, max_num_steps)
            break
        attempts += 1
        E_, S_ = active & ~stiff, active & stiff
        # the explicit phase runs to the end (outputs interpolated); the stiff phase steps onto each output time
        target = torch.where(stiff, T_t.gather(1, next_k.clamp(max=m - 1)[:, None])[:, 0], t_end)
        lands = direction * (t + dt - target) >= 0
        dt_try = torch.where(active, torch.where(lands, target - t, dt), torch.zeros_like(dt))
        any_e, any_s = bool(E_.any()), bool(S_.any())
        y1 = y
        ratio = torch.zeros_like(t)
        rho = torch.zeros_like(t)
        if any_e:
            dt_e = torch.where(E_, dt_try, torch.zeros_like(dt_try))
            h_e = dt_e.to(dtype)[:, None]
            K[0] = k0
            y1_e = _stages(f, co, t, y, dt_e, h_e, K, E_, explicit.fsal)
            with torch.no_grad():
                e = torch.tensordot(co.b_err, K[:S], dims=1)
                scale = torch.maximum(y.abs(), y1_e.abs()) + tol_shift
                ratio_e = dt_e.abs() * rms_rows(e / scale) / rtol
                norms = torch.linalg.vector_norm(torch.tensordot(W2, K[:S], dims=1), dim=-1).double()  # (2, B)
                rho_e = torch.where(norms[1] > 0, norms[0] / (norms[1] * dt_e.abs()).clamp(min=1e-300), 0.0)
            y1 = torch.where(E_[:, None], y1_e, y1)
            ratio = torch.where(E_, ratio_e, ratio)
            rho = torch.where(E_, rho_e, rho)
        if any_s:
            # samples outside the stiff phase take a negligible step (their values are discarded): no division
            # by zero and nothing non-finite that a gradient could pick up
            h64 = torch.where(S_, dt_try, torch.full_like(dt_try, direction * _NEGLIGIBLE))
            y1_s, ratio_s, rho_s = _rosenbrock(f, tab, t, y, k0, h64, S_, rtol, tol_shift, eps, gamma, alpha)
            y1 = torch.where(S_[:, None], y1_s, y1)
            ratio = torch.where(S_, ratio_s, ratio)
            rho = torch.where(S_, rho_s, rho)
        finite = torch.isfinite(ratio)
        nonfinite_last = torch.where(active, ~finite, nonfinite_last)
        accept = active & finite & (ratio <= 1.0)
        if ctrl_e.min_step > 0:  # (a step at the floor is accepted whatever its error, as in the joint loop)
            accept = accept | (active & finite & (dt_try.abs() <= ctrl_e.min_step))
        reject = active & ~accept
        t1 = torch.where(lands, target, t + dt_try)

        def values_of(ks, y1=y1, stiff=stiff, dense=(t, dt_e, y, h_e, K) if any_e else None):
            vals = y1[:, None].expand(B, ks.shape[1], d)  # (a stiff-phase step ends on its one output time)
            if dense is not None:
                vals = torch.where(stiff[:, None, None], vals, _dense_values(co, T_t, *dense, ks))
            return vals

        next_k = write_outputs(out, next_k, accept, t1, T_sorted, direction, values_of)
        if trace is not None:
            trace.append((t, dt_try, y, accept, t1, stiff))
        y = torch.where(accept[:, None], y1, y)
        t = torch.where(accept, t1, t)
        # the next step's first stage: the explicit pair's last (first same as last); after a rodas4 step f(t1, y1)
        new_k0 = k0
        if any_e:
            new_k0 = torch.where((accept & E_)[:, None], K[S - 1], new_k0)
        if any_s and bool((accept & S_).any()):
            new_k0 = torch.where((accept & S_)[:, None], f(t, y, accept & S_), new_k0)
        k0 = new_k0
        # step sizes: each sample's integral controller with its current method's order
        r = ratio.clamp(min=_MIN_RATIO)
        # (scalar exponents, as the other loops use: a tensor exponent rounds differently)
        up, down = r ** (-ctrl_e.beta1), r ** (-1.0 / ctrl_e.k)
        if any_s:
            up = torch.where(stiff, r ** (-ctrl_s.beta1), up)
            down = torch.where(stiff, r ** (-1.0 / ctrl_s.k), down)
        grow = torch.where(
            ratio == 0, torch.full_like(r, ctrl_e.ifactor), (ctrl_e.safety * up).clamp(1.0, ctrl_e.ifactor)
        )
        shrink = (ctrl_e.safety * down).clamp(ctrl_e.dfactor, 1.0)
        factor = torch.where(accept, grow, torch.where(finite, shrink, torch.full_like(r, ctrl_e.dfactor)))
        new_dt = (dt_try.abs() * factor).clamp(max=ctrl_e.max_step)
        if ctrl_e.min_step > 0:
            new_dt = torch.where(finite, new_dt.clamp(min=ctrl_e.min_step), new_dt)
        done = accept & lands & (target == t_end)
        # stiffness bookkeeping on accepted steps (the explicit phase judges the step it took, the stiff phase the
        # step it proposes next), then the switches
        h_judged = torch.where(stiff, new_dt, dt_try.abs())
        is_stiff = ~(rho * h_judged <= rule.limit)
        counted = accept & ~done
        stiff_count = torch.where(counted & is_stiff, stiff_count + 1, stiff_count)
        calm_count = torch.where(
            counted, torch.where(is_stiff, torch.zeros_like(calm_count), calm_count + 1), calm_count
        )
        stiff_count = torch.where(~stiff & (calm_count >= rule.reset_after), torch.zeros_like(stiff_count), stiff_count)
        switch = counted & torch.where(stiff, calm_count >= rule.to_explicit, stiff_count >= rule.to_stiff)
        if bool(switch.any()):
            for b in switch.nonzero()[:, 0].tolist():
                switches.append((b, float(t[b])))
            # entering the stiff phase the step grows, leaving it the step shrinks (AutoSwitch's dtfac = 2)
            new_dt = torch.where(switch, (new_dt * torch.where(stiff, 0.5, 2.0)).clamp(max=ctrl_e.max_step), new_dt)
            stiff = stiff ^ switch
            stiff_count = torch.where(switch, torch.zeros_like(stiff_count), stiff_count)
            calm_count = torch.where(switch, torch.zeros_like(calm_count), calm_count)
        dt = torch.where(active, new_dt * direction, dt)
        n_steps += accept.long()
        n_rej += reject.long()
        active = active & ~done
        stalled = stall_failure(
            active, t, dt, nonfinite_last, T_t, rtol, atol, "a tighter tolerance or a smaller max_step may help"
        )
        if stalled is not None:
            status, t_fail, message = stalled
            break
    reached = int(next_k.min()) if status != Status.SUCCESS else m
    res = IntegrationResult(
        out[:reached].reshape(reached, -1), status, message, t_fail, int(n_steps.max()), int(n_rej.max())
    )
    starts, ends = T_t[:, 0].tolist(), t.tolist()
    names = (explicit.tableau.name, tab.name)
    phases: list[list] = [[] for _ in range(B)]
    begun = list(starts)
    mode = [0] * B
    for b, ts in switches:
        phases[b].append((names[mode[b]], begun[b], ts))
        begun[b], mode[b] = ts, 1 - mode[b]
    for b in range(B):
        phases[b].append((names[mode[b]], begun[b], ends[b]))
    stats = {"n_steps": n_steps, "n_rejected": n_rej, "nfe": nfe, "calls": calls, "methods": phases}
    return res, stats


def _rosenbrock(f, tab: RosenbrockTableau, t, y, f0, h64, stiff, rtol, tol_shift, eps, gamma, alpha):
    """One Rosenbrock attempt per sample with per-sample step sizes ``h64`` (B,): the end values, the error
    ratios (``rms(error / scale) / rtol``) and ``‖J‖_∞`` per sample."""
    B, d = y.shape
    dtype = y.dtype
    h = h64.to(dtype)
    grad = torch.is_grad_enabled() and (y.requires_grad or f0.requires_grad)
    J = batched_jacobian(lambda v: f(t, v.view(B, d), stiff).reshape(-1), y.reshape(-1), B, create_graph=grad)
    with torch.no_grad():
        rho = J.detach().abs().sum(-1).amax(-1).double()
    G = -J + torch.diag_embed((1.0 / (h * gamma))[:, None].expand(B, d))
    lu = torch.linalg.lu_factor(G)
    delta = torch.copysign(math.sqrt(torch.finfo(dtype).eps) * t.abs().clamp(min=1.0), h64)
    T = (f(t + delta, y, stiff) - f0) / delta.to(dtype)[:, None]
    Ks = rosenbrock_stages(
        tab,
        y,
        f0,
        T,
        h[:, None],
        lambda i, yi: f(t + alpha[i] * h64, yi, stiff),
        lambda v: torch.linalg.lu_solve(*lu, v[..., None])[..., 0],
    )
    y1 = y
    for mj, kj in zip(tab.m, Ks):
        if mj:
            y1 = y1 + mj * kj
    with torch.no_grad():
        err = sum(ej * kj for ej, kj in zip(tab.e, Ks) if ej)
        scale = torch.maximum(y.abs(), y1.abs()) + tol_shift
        ratio = rms_rows(err / scale) / rtol
    return y1, ratio, rho


class AutoReplay(Replay):
    """:class:`~neuralode.solvers.per_sample.Replay` for the attempts of :func:`integrate_per_sample_auto`: each
    sample's attempt rebuilt with the method it used (the trace records which samples took a stiff step)."""

    def __init__(self, func, shape: torch.Size, explicit: RungeKutta, t_out, trace: list, tab=RODAS4) -> None:
        super().__init__(func, shape, explicit, t_out, trace)
        self.fn = _auto_replay_fn(func, explicit, shape, trace[0][2].dtype, trace[0][2].device, tab)
        self.S1 = explicit.tableau.stages + len(tab.alpha) + 2  # (at most: both kinds of step, Jacobian, ∂f/∂t)

    def __call__(self, a: int, y: torch.Tensor) -> tuple:
        t, dt_try, _, accept, t1, stiff = self.trace[a]
        dt = torch.where(accept, dt_try, torch.zeros_like(dt_try))
        self.calls += self.S1
        M = self.M[a]
        ks = self.next_k[a][:, None] + torch.arange(M, device=y.device)
        self.fn.stiff = stiff
        y_next, values = self.fn(t, dt, y, accept, t1, self.T_t, ks)
        if not M:
            return y_next, None, None, None
        return y_next, values, ks, torch.arange(M, device=y.device) < self.count[a][:, None]


def _auto_replay_fn(func, explicit: RungeKutta, shape: torch.Size, dtype, device, tab: RosenbrockTableau):
    """One attempt as ``(t, dt, y, accept, t1, T_t, ks) -> (y_next, values)``, the samples in ``.stiff`` by a
    Rosenbrock step, the others by the explicit pair."""
    A, c, b, _ = tableau_floats(explicit.tableau)
    co = _Coefficients(explicit, dtype, device)
    B = shape[0]
    eps = float(np.finfo(np.float64).eps)

    def replay_attempt(t, dt, y, accept, t1, T_t, ks):
        stiff = replay_attempt.stiff

        def F(t64, yy, active=None):
            return func(t64.to(yy.dtype), yy.reshape(shape)).reshape(B, -1)

        y1, dense = y, None
        explicit_ = ~stiff & (dt != 0)
        if bool(explicit_.any()):
            dt_e = torch.where(stiff, torch.zeros_like(dt), dt)
            h = dt_e.to(y.dtype)[:, None]
            K = [F(t, y)]
            y1e = _stage_list(F, A, c, t, dt_e, y, K)
            if not explicit.fsal:
                y1e = y + h * combo(b, K)
            y1 = torch.where(stiff[:, None], y1, y1e)
            if ks.shape[1]:
                dense = _dense_values(co, T_t, t, dt_e, y, h, torch.stack(K[: co.rows_used]), ks)
        stiff_ = stiff & (dt != 0)
        if bool(stiff_.any()):
            direction = 1.0 if float(T_t[0, -1]) >= float(T_t[0, 0]) else -1.0
            h64 = torch.where(stiff_, dt, torch.full_like(dt, direction * _NEGLIGIBLE))
            y1s, _, _ = _rosenbrock(F, tab, t, y, F(t, y), h64, stiff_, 1.0, 0.0, eps, tab.gamma, tab.alpha)
            y1 = torch.where(stiff_[:, None], y1s, y1)
        y_next = torch.where(accept[:, None], y1, y)
        if ks.shape[1] == 0:
            return y_next, None
        values = y1[:, None].expand(-1, ks.shape[1], -1)  # (a stiff step ends on its one output time)
        if dense is not None:
            values = torch.where(stiff[:, None, None], values, dense)
        return y_next, values

    replay_attempt.stiff = None
    return replay_attempt
