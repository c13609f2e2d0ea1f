"""Algebraically reversible solvers: every step can be undone exactly from its end state, so a backward pass
can rebuild the forward states from the last one instead of storing them (``gradient="reversible"``).

Two schemes, each a small class with ``init`` (the scheme's state from y0), ``step`` (one step and its local
error vector) and ``back`` (the step undone):

- :class:`ReversibleHeun`, Kidger, Foster, Li & Lyons (2021), "Efficient and accurate gradients for neural
  SDEs", NeurIPS 34, arXiv:2105.13493, the ODE case (no noise increment): state (y, ŷ, f(t, ŷ)), one evaluation
  per step, order 2; error estimate ½(f₁ − f₀)h (the Euler–Heun difference).
- :class:`CoupledRK`, McCallum & Foster (2024), "Efficient, accurate and stable gradients for neural ODEs",
  arXiv:2410.11648: any explicit Runge–Kutta base step Ψ and a coupling λ ∈ (0, 1] drive two states (y, z)
  with y₀ = z₀: y₁ = λy + (1 − λ)z + Ψ_h(t, z), z₁ = z − Ψ_{−h}(t + h, y₁); two base steps per step, the
  base method's order; the error estimate is the base method's for the second sub-step.

Both are weakly stable for strongly dissipative dynamics (reversible Heun's parasitic root grows like e^{h|μ|}
on y' = μy, μ < 0; the coupled scheme damps it only while h|μ| ≲ 1 − λ), and undoing a step amplifies
round-off (by up to 1/λ per step for the coupled scheme): float64 states and a coupling close to 1 suit long
or dissipative solves.

One loop serves the joint solve (one row: the whole state) and per-sample stepping (a row per sample, each
with its own times, steps and accept/reject decisions). It lands a step on every output time (no interpolation
between the stored states), keeps the grid of the attempts that moved some row, and with ``keep_segments``
(joint) gives linear dense output between steps.
"""

from __future__ import annotations

from typing import Sequence

import torch

from .._errors import Status
from .control import StepController, initial_steps, rms_rows
from .tableaus import ButcherTableau

__all__ = ["ReversibleHeun", "CoupledRK", "reversible_loop", "LinearSegment", "ReversibleRun"]


def _times(h: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each row's step (a (batch,) float64 tensor) times the rows of ``x`` (batch, d)."""
    return h.to(x.dtype)[:, None] * x


class ReversibleHeun:
    """Reversible Heun (Kidger et al. 2021, the ODE case of their reversible scheme). ``F(t (batch,), y (batch,
    d))`` evaluates the field; ``t`` and ``h`` are (batch,) float64 tensors."""

    order = 2

    def init(self, F, t: torch.Tensor, y: torch.Tensor) -> tuple:
        return (y, y, F(t, y))

    def step(self, F, t: torch.Tensor, h: torch.Tensor, s: tuple) -> tuple:
        y, yh, f = s
        yh1 = 2 * y - yh + _times(h, f)
        f1 = F(t + h, yh1)
        y1 = y + _times(0.5 * h, f + f1)
        return (y1, yh1, f1), _times(0.5 * h, f1 - f)

    def back(self, F, t: torch.Tensor, h: torch.Tensor, s1: tuple) -> tuple:
        """The step from ``t`` by ``h`` undone, from its end state ``s1``."""
        y1, yh1, f1 = s1
        yh = 2 * y1 - yh1 - _times(h, f1)
        f = F(t, yh)
        return (y1 - _times(0.5 * h, f + f1), yh, f)


class CoupledRK:
    """McCallum & Foster's reversible scheme around an explicit Runge–Kutta ``base`` with coupling ``lam``."""

    def __init__(self, base: ButcherTableau, lam: float) -> None:
        if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not 0 < lam <= 1:
            raise ValueError(f"option `coupling` must be a number in (0, 1], got {lam!r}")
        self.base, self.lam = base, float(lam)
        self.order = int(base.order)
        self._a = [list(row) for row in base.a]
        self._c, self._b = list(base.c), list(base.b)
        self.has_error = base.b_err is not None
        self._e = list(base.b_err) if self.has_error else None

    def _psi(self, F, t: torch.Tensor, h: torch.Tensor, y: torch.Tensor) -> tuple:
        """The base method's increment y(t + h) − y from y, and its error vector (None without b_err)."""
        K: list[torch.Tensor] = []
        for i, ci in enumerate(self._c):
            yi = y
            for aij, k in zip(self._a[i], K):
                if aij:
                    yi = yi + _times(aij * h, k)
            K.append(F(t + ci * h, yi))
        inc = sum(_times(bi * h, k) for bi, k in zip(self._b, K) if bi)
        err = None if self._e is None else sum(_times(ei * h, k) for ei, k in zip(self._e, K) if ei)
        return inc, err

    def init(self, F, t: torch.Tensor, y: torch.Tensor) -> tuple:
        return (y, y)

    def step(self, F, t: torch.Tensor, h: torch.Tensor, s: tuple) -> tuple:
        y, z = s
        lam = self.lam
        psi, _ = self._psi(F, t, h, z)
        y1 = lam * y + (1 - lam) * z + psi if lam != 1 else y + psi
        back, err = self._psi(F, t + h, -h, y1)
        return (y1, z - back), err

    def back(self, F, t: torch.Tensor, h: torch.Tensor, s1: tuple) -> tuple:
        """The step from ``t`` by ``h`` undone, from its end state ``s1`` (at the times the step used)."""
        y1, z1 = s1
        lam = self.lam
        back, _ = self._psi(F, t + h, -h, y1)
        z = z1 + back
        psi, _ = self._psi(F, t, h, z)
        return ((y1 - (1 - lam) * z - psi) / lam, z)


class LinearSegment:
    """Dense output of one step: linear between its end values."""

    def __init__(self, t0: float, t1: float, y0: torch.Tensor, y1: torch.Tensor) -> None:
        self.t0, self.t1, self.y0, self.y1 = t0, t1, y0, y1

    def __call__(self, ts: Sequence[float]) -> torch.Tensor:
        w = torch.tensor([(float(s) - self.t0) / (self.t1 - self.t0) for s in ts], dtype=self.y0.dtype)
        w = w.to(self.y0.device)[:, None]
        return self.y0[None] + w * (self.y1 - self.y0)[None]


class Records:
    """The attempts that moved some row, ``(t, h, moved, wrote)`` of (batch,) tensors each, stacked in chunks:
    a few bytes per row and attempt rather than four small tensors' overheads per attempt."""

    CHUNK = 256

    def __init__(self) -> None:
        self.chunks: list[tuple] = []
        self.pending: list[tuple] = []

    def append(self, record: tuple) -> None:
        self.pending.append(record)
        if len(self.pending) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.chunks.append(tuple(torch.stack(x) for x in zip(*self.pending)))
            self.pending = []

    def __len__(self) -> int:
        return sum(c[0].shape[0] for c in self.chunks) + len(self.pending)

    def __reversed__(self):
        self._flush()
        for chunk in reversed(self.chunks):
            for i in reversed(range(chunk[0].shape[0])):
                yield tuple(x[i] for x in chunk)

    def nbytes(self) -> int:
        self._flush()
        return sum(x.numel() * x.element_size() for c in self.chunks for x in c)


class ReversibleRun:
    """What :func:`reversible_loop` returns.

    Attributes:
        ys: (outputs reached by every row, batch, d).
        status, message, t_fail: as an integration result's.
        final_state: the scheme's state after the last attempt.
        records: per attempt that moved some row: ``(t, h, moved, wrote)``, each (batch,) — start times, steps,
            which rows took the step, and the output index each row wrote there (−1: none); a :class:`Records`.
        n_steps, n_rejected, nfe: per row, (batch,) int64 (``nfe``: evaluations of the field that row took part in).
        segments: linear dense output (``keep_segments``; one row only).
    """

    def __init__(self, **kw) -> None:
        self.__dict__.update(kw)


def reversible_loop(
    F,
    y0: torch.Tensor,
    marks: torch.Tensor,
    out_index: Sequence[int],
    scheme,
    ctrl: StepController | None,
    *,
    rtol,
    atol,
    norm=None,
    step_size: float | None = None,
    first_step: float | None = None,
    max_num_steps: int = 100_000,
    keep_segments: bool = False,
    evals=None,
) -> ReversibleRun:
    """Solve with a reversible ``scheme`` from ``y0`` (batch, d), every row through its own ``marks`` (batch, m)
    float64 times (``marks[:, 0]`` the start), each landed on by a step; at mark j a row writes output
    ``out_index[j]`` (−1: a mark that is not an output). Fixed steps of at most ``step_size``, or adaptive steps
    chosen by ``ctrl`` (each row its own, with the RMS norm of its error, or ``norm`` of the whole error for one
    row). ``evals()``: the field's evaluation count, for the statistics."""
    B, m = marks.shape
    dev = y0.device
    rows = torch.arange(B, device=dev)
    direction = 1.0 if float(marks[0, -1]) >= float(marks[0, 0]) else -1.0
    idx = torch.as_tensor(list(out_index), device=dev)
    n_out = int(idx.max()) + 1
    t = marks[:, 0].clone()
    k = torch.ones(B, dtype=torch.long, device=dev)
    state = scheme.init(F, t, y0)
    ys = y0.new_zeros((n_out, B, y0.shape[1]))
    ys[0] = y0
    records = Records()
    segments: list | None = [] if keep_segments else None
    n_steps = torch.zeros(B, dtype=torch.long, device=dev)
    n_rej = torch.zeros_like(n_steps)
    nfe = torch.zeros_like(n_steps)
    status, message, t_fail = Status.SUCCESS, "", None
    adaptive = step_size is None
    if adaptive:
        if first_step is not None:
            dt = torch.full((B,), abs(float(first_step)), dtype=torch.float64, device=dev)
        else:
            with torch.no_grad():
                fold = B == 1 and isinstance(rtol, float) and isinstance(atol, float)
                dt = initial_steps(F, t, y0, F(t, y0), direction, scheme.order, rtol, atol, fold_rtol=fold)
        dt = direction * dt.clamp(min=ctrl.min_step, max=ctrl.max_step)
    active = k < m
    attempts = 0
    while bool(active.any()):
        if attempts >= max_num_steps:
            status, t_fail = Status.MAX_STEPS, float(t[active][0])
            message = f"reached max_num_steps={max_num_steps} attempted steps at t={t_fail:.10g}"
            break
        attempts += 1
        target = marks[rows, k.clamp(max=m - 1)]
        before = evals() if evals is not None else 0
        if adaptive:
            lands = direction * (t + dt - target) >= 0
            h = torch.where(lands, target - t, dt)
        else:
            n = torch.ceil((target - t).abs() / step_size * (1 - 1e-12)).clamp(min=1)
            lands = n == 1
            h = (target - t) / n
        h = torch.where(active, h, torch.zeros_like(h))
        # (the proposal, not a step that lands on a mark a few ulps away, must still move t)
        tiny = active & (dt.abs() < 1e-14 * t.abs().clamp(min=1.0)) if adaptive else torch.zeros_like(active)
        if bool(tiny.any()):
            t_fail = float(t[tiny][0])
            status = Status.DT_UNDERFLOW
            message = f"the step size became too small at t={t_fail:.10g} (a singularity, or stiff dynamics?)"
            break
        new, err = scheme.step(F, t, h, state)
        nfe += active.long() * ((evals() - before) if evals is not None else 0)
        y, y1 = state[0], new[0]
        if adaptive:
            with torch.no_grad():
                x = err / (atol + rtol * torch.maximum(y.abs(), y1.abs()))
                if norm is not None and B == 1:
                    ratio = torch.as_tensor(float(norm(x[0])), dtype=torch.float64, device=dev)[None]
                else:
                    ratio = rms_rows(x)
                finite = torch.isfinite(ratio)
                # (NaN: rejected; a step at options['min_step'] is accepted whatever its error, as in the other loops)
                ok = (ratio <= 1.0) | (finite & (h.abs() <= ctrl.min_step))
                r = torch.nan_to_num(ratio, nan=1e10).clamp(min=1e-10)
                grow = (ctrl.safety * r ** (-1.0 / scheme.order)).clamp(max=ctrl.ifactor)
                factor = torch.where(ok, grow.clamp(min=1.0), grow.clamp(min=ctrl.dfactor, max=1.0))
            moved = active & ok
            n_rej += (active & ~ok).long()
            proposal = (h.abs() * factor).clamp(max=ctrl.max_step)
            # (non-finite: below the floor, to a stop)
            proposal = torch.where(finite, proposal.clamp(min=ctrl.min_step), proposal)
            dt = torch.where(active, direction * proposal, dt)
        else:
            moved = active
        if not bool(moved.any()):
            continue
        n_steps += moved.long()
        landed = moved & lands
        wrote = torch.where(landed, idx[k.clamp(max=m - 1)], torch.full_like(k, -1))
        records.append((t, h, moved, wrote))
        t1 = torch.where(lands, target, t + h)
        mv = moved[:, None]
        if segments is not None:
            segments.append(LinearSegment(float(t[0]), float(t1[0]), y[0], y1[0]))
        state = tuple(torch.where(mv, a, b) for a, b in zip(new, state))
        out = landed & (wrote >= 0)
        if bool(out.any()):
            ys.index_put_((wrote[out], rows[out]), state[0][out])
        k = torch.where(landed, k + 1, k)
        t = torch.where(moved, t1, t)
        active = k < m
    reached = n_out if status == Status.SUCCESS else _reached(k, idx)
    return ReversibleRun(
        ys=ys[:reached],
        status=status,
        message=message,
        t_fail=t_fail,
        final_state=state,
        records=records,
        n_steps=n_steps,
        n_rejected=n_rej,
        nfe=nfe,
        segments=segments,
    )


def _reached(k: torch.Tensor, idx: torch.Tensor) -> int:
    """The outputs every row wrote (a failed solve returns those)."""
    passed = idx[: int(k.min())]
    return int(passed.max()) + 1 if passed.numel() else 1
